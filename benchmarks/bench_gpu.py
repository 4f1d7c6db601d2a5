"""Accelerator benchmark: BERT-base SimCSE update step, bf16, large global batches, JAX vs PyTorch.

    python benchmarks/bench_gpu.py --batch-sizes 512,1024,2048 --steps 20
    python benchmarks/bench_gpu.py --peak-tflops 989 --skip-torch          # JAX only
    python benchmarks/bench_gpu.py --tiny --batch-sizes 8 --steps 2         # CPU smoke test

Needs a CUDA jax (`pip install -U "jax[cuda12]"`) and a CUDA torch on the same machine. No
download: both models are random-init `transformers.BertConfig()` (BERT-base: 12 layers, hidden
768) with the same shapes, so the figures measure speed, not quality. Setup per batch size B:
B sentences -> 2B dropout views of `--seq` tokens, the unsupervised SimCSE loss, clipping and
AdamW; JAX: `make_train_step` with bf16 compute (fp32 params and optimizer state) over a mesh of
all local devices (data parallel); PyTorch: `torch_reference.TorchSimCSEStep` under
`torch.autocast(bfloat16)` on one GPU (fused AdamW).

Per batch size and framework one JSON line: sentences/s (median step time over `--steps`
steps after warm-up) and model FLOPs utilisation, MFU = model FLOPs per step / step time /
(devices * --peak-tflops). Model FLOPs are the standard count (3 x forward matmul FLOPs,
`torch_reference.flops_per_token_train`), the same for both frameworks; XLA's own count is
reported beside it. A batch size that runs out of memory prints a line with `"value": null`.
Each (framework, batch size) runs in its own child process, so neither framework's allocator
(JAX preallocates most of the GPU; PyTorch caches what it took) starves the other.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from torch_reference import TorchSimCSEStep, flops_per_token_train  # noqa: E402


def emit(figure: str, value, unit: str, **extra) -> None:
    print(json.dumps({"figure": figure, "value": value, "unit": unit, **extra}), flush=True)


def bert_config_kwargs(tiny: bool) -> dict:
    if tiny:  # the CPU smoke test: same code path, seconds instead of minutes
        return dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=1000)
    return {}  # transformers.BertConfig() defaults are bert-base-uncased's architecture


def random_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """[B, 2, seq] int32: random tokens after [CLS], the same sentence in both views, no padding."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000 if vocab > 2000 else 5, vocab, size=(batch, seq), dtype=np.int32)
    ids[:, 0] = 101 if vocab > 101 else 1
    one = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    return {k: np.repeat(v[:, None], 2, axis=1) for k, v in one.items()}


def time_steps(step_fn, steps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        step_fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step_fn()
        times.append(time.perf_counter() - t0)
    return times


def is_oom(e: Exception) -> bool:
    text = f"{type(e).__name__}: {e}"
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower() or "OutOfMemory" in text


def bench_jax(batch_np, args, model_flops, peak, tag) -> None:
    import jax
    from flax import nnx

    from simcse_jax.encoder import Encoder, EncoderConfig
    from simcse_jax.objective import ObjectiveConfig
    from simcse_jax.optim import OptimConfig, make_optimizer
    from simcse_jax.sharding import batch_sharding, make_mesh
    from simcse_jax.train_step import init_train_state, make_train_step

    cfg = EncoderConfig(compute_dtype=args.dtype, **bert_config_kwargs(args.tiny))
    model = Encoder(cfg, rngs=nnx.Rngs(0))
    mesh = make_mesh({"data": -1})
    optim = OptimConfig(total_steps=args.steps + args.warmup + 1, learning_rate=3e-5)
    optimizer = make_optimizer(optim)
    graphdef, state, shardings = init_train_state(model, optimizer, mesh)
    del model
    objective = ObjectiveConfig(pooler="cls", mlp_only_train=True, temperature=0.05)
    step = make_train_step(graphdef, optimizer, mesh, shardings, objective, optim)
    batch = jax.device_put(batch_np, batch_sharding(mesh, 3))
    base = jax.random.key(0)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch, base).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    box = {"state": state, "i": 0}

    def one():
        box["i"] += 1
        box["state"], meas = compiled(box["state"], batch, jax.random.fold_in(base, box["i"]))
        jax.block_until_ready(meas)

    t = statistics.median(time_steps(one, args.steps, args.warmup))
    n_dev = len(jax.devices())
    sentences = batch_np["input_ids"].shape[0]
    emit("jax_train_throughput", round(sentences / t, 1), "sentences/s", step_s=round(t, 5), compile_s=round(compile_s, 1),
         devices=n_dev, device_kind=jax.devices()[0].device_kind, **tag)
    emit("jax_mfu", float(f"{model_flops / t / (n_dev * peak):.4g}"), "ratio", xla_flops_per_step=float(cost.get("flops", 0.0)),
         model_flops_per_step=model_flops, devices=n_dev, **tag)


def bench_torch(batch_np, args, model_flops, peak, tag) -> None:
    import torch
    from transformers import BertConfig, BertModel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    bert = BertModel(BertConfig(**bert_config_kwargs(args.tiny)), add_pooling_layer=False)
    step = TorchSimCSEStep(bert, device=device, amp_dtype=torch.bfloat16, fused_adamw=device == "cuda")
    tb = tuple(torch.from_numpy(batch_np[k].astype(np.int64)).to(device) for k in ("input_ids", "attention_mask", "token_type_ids"))

    def one():
        step(*tb)
        if device == "cuda":
            torch.cuda.synchronize()

    t = statistics.median(time_steps(one, args.steps, args.warmup))
    sentences = batch_np["input_ids"].shape[0]
    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    emit("torch_train_throughput", round(sentences / t, 1), "sentences/s", step_s=round(t, 5), devices=1,
         device_kind=name, attn=getattr(bert.config, "_attn_implementation", None), **tag)
    emit("torch_mfu", float(f"{model_flops / t / peak:.4g}"), "ratio", model_flops_per_step=model_flops, devices=1, **tag)
    one = step = bert = None  # free the model before the JAX run
    if device == "cuda":
        torch.cuda.empty_cache()


def run_one(args, framework: str, b: int) -> None:
    """One framework at one global batch size, in this process."""
    from transformers import BertConfig

    bc = BertConfig(**bert_config_kwargs(args.tiny))
    per_token = flops_per_token_train(bc.num_hidden_layers, bc.hidden_size, bc.intermediate_size, args.seq)
    tag = {"global_batch": b, "views": 2 * b, "seq": args.seq, "model": "tiny-bert" if args.tiny else "bert-base",
           "peak_tflops": args.peak_tflops}
    batch_np = random_batch(b, args.seq, bc.vocab_size)
    model_flops = per_token * 2 * b * args.seq  # 2 views per sentence
    fn = bench_jax if framework == "jax" else bench_torch
    try:
        fn(batch_np, args, model_flops, args.peak_tflops * 1e12, tag)
    except Exception as e:  # an OOM at one size should not hide the other sizes
        if not is_oom(e):
            raise
        emit(f"{framework}_train_throughput", None, "sentences/s", error=f"out of memory: {str(e)[:300]}", **tag)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", default="512,1024,2048", help="global sentences per step, comma list")
    p.add_argument("--steps", type=int, default=20, help="timed steps per batch size and framework")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--dtype", default="bfloat16", help="JAX compute dtype")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="per-device dense bf16 peak (H100/H200 SXM: 989)")
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--skip-jax", action="store_true")
    p.add_argument("--tiny", action="store_true", help="a 2-layer toy BERT (CPU smoke test of this script)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: "framework:batch" in a child
    args = p.parse_args(argv)
    if args.one:
        framework, b = args.one.split(":")
        run_one(args, framework, int(b))
        return 0
    try:
        sizes = [int(x) for x in args.batch_sizes.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--batch-sizes: expected a comma list of integers, got {args.batch_sizes!r}") from None

    # Every (framework, batch size) runs in a fresh child process: JAX preallocates most of the
    # GPU's memory and PyTorch's caching allocator keeps what it took, so sharing one process
    # would starve whichever runs second.
    passthrough = list(argv if argv is not None else sys.argv[1:])
    failed = 0
    for b in sizes:
        for name, skip in (("jax", args.skip_jax), ("torch", args.skip_torch)):
            if skip:
                continue
            res = subprocess.run([sys.executable, __file__, *passthrough, "--one", f"{name}:{b}"],
                                 stdout=subprocess.PIPE, text=True)
            sys.stdout.write(res.stdout)
            sys.stdout.flush()
            if res.returncode:
                failed += 1
                emit(f"{name}_train_throughput", None, "sentences/s", global_batch=b,
                     error=f"child process exited with {res.returncode} (its stderr is above)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
