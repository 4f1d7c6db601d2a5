"""Host overhead of the training loop: `simcse_jax.train.train` vs a bare Python loop over the
same compiled update and the same batches already on the devices.

    .venv/bin/python benchmarks/bench_loop.py                        # tiny 2-layer model + MiniLM, ~4 min
    .venv/bin/python benchmarks/bench_loop.py --models tiny --rounds 5
    .venv/bin/python benchmarks/bench_loop.py --baseline-rev 51f3d7b # also the loop of that commit

Each measurement runs in its own process (one CPU device) so the two loops share nothing but
the machine; rounds alternate trainer and bare loop (order flipped each round) and the figure
is the median per-round ratio loop_rate / bare_rate (1.0: the loop adds nothing).

- trainer: `train()` with `log_every` = `--log-every`, no evaluation, export or intermediate
  save; its rate is what the trainer itself logs (`steps_per_s` between log steps), the
  median over the log intervals after the first.
- bare: `make_train_step` + ahead-of-time compile with the same config and compiler options
  (`--cpu-onednn`, the default, or `--no-cpu-onednn`, for both loops), the batches taken from
  the same data iterator and placed beforehand, then `for ...: state, meas = step(state, b, key)`
  and one `block_until_ready` at the end.

`--baseline-rev REV` measures the trainer of another commit the same way (its package is
extracted with `git archive` into a temporary folder): today's loop vs the one it replaced.
The tiny model (2 layers, hidden 32, batch 16) is where host overhead dominates; MiniLM
(6 layers, hidden 384, batch 32) is a real step. Every figure is one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WIKI = REPO.parent / "shared" / "data" / "train_samples" / "wiki1m_for_simcse.head11914.txt"
MODELS = {"tiny": {"global_batch_size": 16}, "minilm": {"global_batch_size": 32}}


def emit(figure: str, value, unit: str, **extra) -> None:
    print(json.dumps({"figure": figure, "value": value, "unit": unit, **extra}), flush=True)


def make_tiny_model(folder: Path) -> Path:
    import shutil

    import torch
    import transformers

    from simcse_jax.hf_io import minilm_dir

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64)
    transformers.BertModel(cfg).save_pretrained(folder)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(Path(minilm_dir()) / name, folder / name)
    return folder


# ----------------------------------------------------------------------------- one measurement (a child process)


def worker(args) -> None:
    from simcse_jax.config import TrainConfig

    config = TrainConfig(
        model=args.model_dir, train_file=str(WIKI), data_cache_dir=args.cache, pooler="cls", mlp_only_train=True,
        global_batch_size=args.batch, learning_rate=1e-5, max_steps=args.steps, log_every=args.log_every,
        eval_steps=10**6, save_steps=10**6, sts_dir=None, do_export=False, do_test_eval=False, async_checkpointing=False,
        cpu_onednn=args.cpu_onednn,
    )
    if args.kind == "trainer":
        from simcse_jax.train import train

        with tempfile.TemporaryDirectory() as workdir:
            train(config, workdir, progress=False)
            rates = [json.loads(x)["steps_per_s"] for x in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
        print(json.dumps({"rate": statistics.median(rates[1:-1] or rates[1:])}))
        return

    import jax

    from simcse_jax.data import make_data_iterator
    from simcse_jax.hf_io import load_pretrained, load_tokenizer
    from simcse_jax.optim import make_optimizer
    from simcse_jax.sharding import make_mesh
    from simcse_jax.train_step import init_train_state, make_train_step, objective_config, optim_config
    from simcse_jax.xla_options import compile_with_fallback, compiler_options

    mesh = make_mesh({"data": -1})
    tokenizer = load_tokenizer(args.model_dir)
    data = make_data_iterator(str(WIKI), tokenizer, args.batch, max_seq_length=32, mesh=mesh, cache_dir=args.cache,
                              progress=False)
    optim = optim_config(config, args.steps)
    optimizer = make_optimizer(optim)
    graphdef, state, shardings = init_train_state(load_pretrained(args.model_dir).model, optimizer, mesh)
    # As the trainer builds it: the step derives its dropout key from the base key and its counter.
    step = make_train_step(graphdef, optimizer, mesh, shardings, objective_config(config), optim, fold_in_step=True)
    batches = [next(data) for _ in range(args.steps)]
    key = jax.random.key(0)
    # The trainer's executable: the same compiler options (oneDNN on CPU unless --no-cpu-onednn).
    options = compiler_options(config.cpu_onednn, jax.devices()[0].platform)
    compiled, _ = compile_with_fallback(step.lower(state, batches[0], key), options)
    warm = args.log_every  # as the trainer's first (excluded) interval
    for s in range(warm):
        state, meas = compiled(state, batches[s], key)
    jax.block_until_ready((state, meas))
    t0 = time.perf_counter()
    for s in range(warm, args.steps):
        state, meas = compiled(state, batches[s], key)
    jax.block_until_ready((state, meas))
    print(json.dumps({"rate": (args.steps - warm) / (time.perf_counter() - t0)}))


def measure(kind: str, model_dir: str, batch: int, steps: int, log_every: int, cache: str, package_root: Path,
            cpu_onednn: bool) -> float:
    env = {**os.environ, "PYTHONPATH": str(package_root), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("XLA_FLAGS", None)  # one CPU device
    cmd = [sys.executable, __file__, "--worker", kind, "--model-dir", model_dir, "--batch", str(batch),
           "--steps", str(steps), "--log-every", str(log_every), "--cache", cache,
           "--cpu-onednn" if cpu_onednn else "--no-cpu-onednn"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=package_root, timeout=1800)
    if res.returncode:
        raise RuntimeError(f"{kind} run failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])["rate"]


def extract_revision(rev: str, into: Path) -> Path:
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "simcse_jax"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny,minilm")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tiny-steps", type=int, default=200)
    p.add_argument("--minilm-steps", type=int, default=24)
    p.add_argument("--log-every", type=int, default=0, help="default: steps / 8")
    p.add_argument("--baseline-rev", default=None, help="also measure the trainer of this git revision")
    p.add_argument("--cpu-onednn", action=argparse.BooleanOptionalAction, default=True,
                   help="the update step's oneDNN options, for the trainers (config key cpu_onednn) and the bare loop alike")
    p.add_argument("--worker", choices=("trainer", "bare"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=16, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=100, help=argparse.SUPPRESS)
    p.add_argument("--cache", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        args.kind = args.worker
        worker(args)
        return 0

    sys.path.insert(0, str(REPO))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        loops = {"trainer": REPO}
        if args.baseline_rev:
            (tmp / "baseline").mkdir()
            loops["baseline_trainer"] = extract_revision(args.baseline_rev, tmp / "baseline")
        for name in args.models.split(","):
            if name == "tiny":
                model_dir = str(make_tiny_model(tmp / "tiny"))
            else:
                from simcse_jax.hf_io import minilm_dir

                model_dir = str(minilm_dir())
            steps = args.tiny_steps if name == "tiny" else args.minilm_steps
            log_every = args.log_every or max(1, steps // 8)
            batch = MODELS[name]["global_batch_size"]
            cache = str(tmp / "cache")
            rates = {k: [] for k in ("bare", *loops)}
            for r in range(args.rounds):
                order = ["bare", *loops] if r % 2 == 0 else [*reversed(loops), "bare"]
                for kind in order:
                    root = loops.get(kind, REPO)
                    rates[kind].append(measure("bare" if kind == "bare" else "trainer", model_dir, batch, steps, log_every,
                                               cache, root, args.cpu_onednn))
            tag = {"model": name, "global_batch_size": batch, "steps": steps, "log_every": log_every, "rounds": args.rounds,
                   "cpu_onednn": args.cpu_onednn}
            emit("bare_loop_rate", round(statistics.median(rates["bare"]), 3), "steps/s", **tag)
            for kind in loops:
                ratios = [a / b for a, b in zip(rates[kind], rates["bare"])]
                emit(f"{kind}_rate", round(statistics.median(rates[kind]), 3), "steps/s", **tag)
                emit(f"{kind}_over_bare", round(statistics.median(ratios), 3), "ratio",
                     per_round=[round(x, 3) for x in ratios], **tag,
                     **({"revision": args.baseline_rev} if kind == "baseline_trainer" else {}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
