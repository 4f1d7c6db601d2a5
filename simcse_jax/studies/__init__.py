"""Studies built on the trainer: `simcse-jax sweep` (a grid of runs, each planned and trained in
its own process), `report` (their table and plots) and `launch-local` (N local processes as one
multi-host job). Nothing in the training core imports this package; it runs `simcse_jax.cli`.
"""
