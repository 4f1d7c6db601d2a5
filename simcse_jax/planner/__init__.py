"""`simcse-jax plan`: the trainer's update step compiled ahead of time for a topology it does not have.

plan.py (the command, memory and the `--max-batch` search), roofline.py (chip table, roofline
bound), topology.py (topology names, libtpu), hlo_collectives.py (collectives and their bytes in
compiled HLO). Nothing in the training core imports this package; it imports the core's builder
(step_builder.py).
"""
