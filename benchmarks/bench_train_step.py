"""CPU training-step benchmark: the simcse-jax update vs the PyTorch reference step, side by side.

    .venv/bin/python benchmarks/bench_train_step.py                 # ~2-3 min on 2 cores
    .venv/bin/python benchmarks/bench_train_step.py --pairs 40      # longer, tighter medians
    .venv/bin/python benchmarks/bench_train_step.py --variants default,onednn,rbg,onednn+rbg
    .venv/bin/python benchmarks/bench_train_step.py --threads 1   # 1 thread each (robust on a busy machine)

Setup (the issue's): all-MiniLM-L6-v2 (`load_pretrained(minilm_dir())` / `BertModel`), 64
sentences per step (128 dropout views), sequence length 32 (real wiki1m lines, padded), the
unsupervised SimCSE loss, AdamW with clipping; one CPU device, `torch.set_num_threads(2)`.

Method (../shared/PERF_NOTES.md): both frameworks in ONE process, steps alternated (torch,
then every JAX variant; the order flips each round), ratio per round = torch_time / jax_time,
report the median ratio (>1: JAX faster). Machines here are shared and drift; a ratio of
adjacent steps cancels most of the drift.

JAX variants (each its own compile of `make_train_step`):
  default     no compiler options, threefry dropout keys (what the trainer does today)
  onednn      compiler_options = oneDNN dot fusions on this jit only (PERF_NOTES)
  rbg         `unsafe_rbg` dropout keys (cheaper random bits; masks then depend on the sharding)
  onednn+rbg  both

The process re-executes itself once with the glibc allocator settings of PERF_NOTES
(`GLIBC_TUNABLES`, unless already set or `--no-glibc-tunables`); they apply to both frameworks.
FLOPs are XLA's count for the compiled step (`cost_analysis()['flops']`), against a measured
matmul peak (the best of jitted fp32 2048x2048 matmuls sampled through the run). Every figure
is one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

GLIBC_TUNABLES = "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"
# The same options as simcse_jax.xla_options.CPU_ONEDNN_OPTIONS (not imported: jax must not load before
# this script has set its environment).
ONEDNN_OPTIONS = {"xla_cpu_use_onednn": True, "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}
VARIANTS = {  # name -> (compiler_options, dropout key implementation)
    "default": (None, "threefry2x32"),
    "onednn": (ONEDNN_OPTIONS, "threefry2x32"),
    "rbg": (None, "unsafe_rbg"),
    "onednn+rbg": (ONEDNN_OPTIONS, "unsafe_rbg"),
}
REPO = Path(__file__).resolve().parents[1]
WIKI = REPO.parent / "shared" / "data" / "train_samples" / "wiki1m_for_simcse.head11914.txt"


def emit(figure: str, value, unit: str, **extra) -> None:
    print(json.dumps({"figure": figure, "value": value, "unit": unit, **extra}), flush=True)


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def maybe_reexec_with_glibc_tunables(disabled: bool) -> None:
    """glibc reads GLIBC_TUNABLES at process start only, so set it and exec ourselves once."""
    if disabled or "GLIBC_TUNABLES" in os.environ:
        return
    env = dict(os.environ, GLIBC_TUNABLES=GLIBC_TUNABLES)
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


class MatmulPeak:
    """This machine's practical fp32 matmul peak: the best FLOP/s of a jitted n x n matmul, over
    every sample taken. Sampling again between the timed steps (`sample`) keeps a load spike at
    start-up from understating the peak on a shared machine."""

    def __init__(self, n: int = 2048):
        import jax
        import jax.numpy as jnp

        self.n = n
        self.a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
        self.b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
        self.mm = jax.jit(jnp.dot)
        self.mm(self.a, self.b).block_until_ready()
        self.best_s = float("inf")
        self.samples = 0

    def sample(self, repeats: int = 3) -> None:
        for _ in range(repeats):
            t0 = time.perf_counter()
            self.mm(self.a, self.b).block_until_ready()
            self.best_s = min(self.best_s, time.perf_counter() - t0)
            self.samples += 1

    @property
    def flops(self) -> float:
        # (n, n) . (n, n): n^2 outputs, n multiply-adds each.
        return 2 * self.n**3 / self.best_s


def make_batch(tokenizer, sentences: int, seq: int) -> dict:
    """Unsup batch: `sentences` wiki lines, each twice, padded to `seq`: int32 [B, 2, seq]."""
    import numpy as np

    lines = [x.strip() for x in WIKI.read_text(encoding="utf-8").splitlines() if x.strip()][:sentences]
    if len(lines) < sentences:
        raise SystemExit(f"{WIKI}: only {len(lines)} lines, {sentences} needed")
    enc = tokenizer(lines, padding="max_length", truncation=True, max_length=seq, return_tensors="np")
    one = {
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
        "token_type_ids": enc.get("token_type_ids", np.zeros_like(enc["input_ids"])),
    }
    return {k: np.repeat(v[:, None, :], 2, axis=1).astype(np.int32) for k, v in one.items()}


def build_jax_variant(name, model, batch_np, mesh, total_steps):
    """(compiled step, state, batch, key maker, compile seconds, flops) for one variant."""
    import jax

    from simcse_jax.objective import ObjectiveConfig
    from simcse_jax.optim import OptimConfig, make_optimizer
    from simcse_jax.sharding import batch_sharding
    from simcse_jax.train_step import init_train_state, make_train_step

    options, impl = VARIANTS[name]
    optim = OptimConfig(total_steps=total_steps, learning_rate=3e-5)
    optimizer = make_optimizer(optim)
    graphdef, state, shardings = init_train_state(model, optimizer, mesh)
    objective = ObjectiveConfig(pooler="cls", mlp_only_train=True, temperature=0.05)
    step = make_train_step(graphdef, optimizer, mesh, shardings, objective, optim, compiler_options=options)
    batch = jax.device_put(batch_np, batch_sharding(mesh, 3))
    base = jax.random.key(0, impl=impl)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch, base).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return compiled, state, batch, base, compile_s, float(cost["flops"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=12, help="timed rounds (one torch step + one step per JAX variant)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=64, help="sentences per step (2 views each)")
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads; 1 also makes XLA single-threaded")
    p.add_argument("--variants", default="default,onednn", help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--no-glibc-tunables", action="store_true", help="do not re-exec with GLIBC_TUNABLES")
    args = p.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    maybe_reexec_with_glibc_tunables(args.no_glibc_tunables)
    if args.threads == 1:
        # One thread in both frameworks: on a busy shared machine, two-thread torch (OpenMP
        # barriers) loses more to preemption than XLA's work-stealing pool, biasing the ratio.
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        ).strip()

    import jax
    import torch
    from transformers import BertModel

    from simcse_jax.hf_io import load_pretrained, load_tokenizer, minilm_dir
    from simcse_jax.sharding import make_mesh

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from torch_reference import TorchSimCSEStep, to_torch_batch

    torch.set_num_threads(args.threads)
    setup = {
        "model": "all-MiniLM-L6-v2", "sentences_per_step": args.batch, "views": 2 * args.batch, "seq": args.seq,
        "torch_threads": args.threads, "glibc_tunables": os.environ.get("GLIBC_TUNABLES") == GLIBC_TUNABLES,
        "jax": jax.__version__, "torch": torch.__version__,
    }
    emit("load_average_start", load_average(), "1/5/15 min", **setup)

    peak_meter = MatmulPeak()
    peak_meter.sample(10)

    path = minilm_dir()
    batch_np = make_batch(load_tokenizer(path), args.batch, args.seq)
    total = args.warmup + args.pairs + 10
    model = load_pretrained(path).model
    mesh = make_mesh({"data": 1}, devices=jax.devices()[:1])
    runs = {}
    for name in variants:
        compiled, state, batch, base, compile_s, flops = build_jax_variant(name, model, batch_np, mesh, total)
        runs[name] = {"compiled": compiled, "state": state, "batch": batch, "base": base, "flops": flops, "times": []}
        emit("jax_compile_time", round(compile_s, 2), "s", variant=name, what="lower+compile of the train step")
    emit("jax_step_flops", round(runs[variants[0]]["flops"] / 1e9, 2), "GFLOP", how="XLA cost_analysis of the compiled step")

    bert = BertModel.from_pretrained(str(path), add_pooling_layer=False)
    torch_step = TorchSimCSEStep(bert, learning_rate=3e-5)
    tb = to_torch_batch(batch_np)
    torch_times = []

    def jax_step(run, i):
        key = jax.random.fold_in(run["base"], i)  # the trainer's per-step key, made outside the timing
        t0 = time.perf_counter()
        run["state"], meas = run["compiled"](run["state"], run["batch"], key)
        jax.block_until_ready(meas)
        return time.perf_counter() - t0, float(meas["loss"])

    def torch_one():
        t0 = time.perf_counter()
        loss = torch_step(*tb)
        return time.perf_counter() - t0, float(loss)

    for i in range(args.warmup):
        torch_one()
        for name in variants:
            jax_step(runs[name], i)
    losses = {}
    for r in range(args.pairs):
        i = args.warmup + r
        order = ["torch", *variants]
        for who in order if r % 2 == 0 else order[::-1]:
            if who == "torch":
                t, losses["torch"] = torch_one()
                torch_times.append(t)
            else:
                t, losses[who] = jax_step(runs[who], i)
                runs[who]["times"].append(t)
        peak_meter.sample()

    peak = peak_meter.flops
    emit("matmul_peak", round(peak / 1e9, 1), "GFLOP/s",
         how=f"jitted fp32 2048x2048 jnp.dot, best of {peak_meter.samples} samples spread over the run")

    t_torch = statistics.median(torch_times)
    emit("torch_train_throughput", round(args.batch / t_torch, 2), "sentences/s",
         step_s=round(t_torch, 4), loss=round(losses["torch"], 4), pairs=args.pairs)
    emit("torch_fraction_of_matmul_peak", round(runs[variants[0]]["flops"] / t_torch / peak, 3), "ratio",
         how="the JAX step's XLA FLOP count / torch step time / matmul peak")
    for name in variants:
        run = runs[name]
        t = statistics.median(run["times"])
        ratios = [tt / tj for tt, tj in zip(torch_times, run["times"])]
        emit("jax_train_throughput", round(args.batch / t, 2), "sentences/s", variant=name, step_s=round(t, 4),
             loss=round(losses[name], 4))
        emit("train_step_ratio_torch_over_jax", round(statistics.median(ratios), 3), "x", variant=name,
             min=round(min(ratios), 3), max=round(max(ratios), 3), pairs=len(ratios),
             meaning=">1: the JAX step is faster than PyTorch's")
        emit("jax_achieved_flops", round(run["flops"] / t / 1e9, 1), "GFLOP/s", variant=name)
        emit("jax_fraction_of_matmul_peak", round(run["flops"] / t / peak, 3), "ratio", variant=name)
    emit("load_average_end", load_average(), "1/5/15 min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
