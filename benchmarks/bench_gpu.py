"""Accelerator benchmark: the BERT-base SimCSE update step as users get it, against what they would pick instead.

    python benchmarks/bench_gpu.py --out benchmarks/gpu_out                      # 64,512,4096: all peers
    python benchmarks/bench_gpu.py --peers jax --batch-sizes 512 --peak-tflops 989
    python benchmarks/bench_gpu.py --tiny --steps 3 --out /tmp/b                  # CPU smoke test (batch 8, 64)

Needs a CUDA jax (`pip install -e '.[cuda13]'`, README "On a GPU") and a CUDA torch on the same
machine. No download: both frameworks build a random-init `transformers.BertConfig()` (BERT-base:
12 layers, hidden 768) of the same shapes, so the figures measure speed, not quality. Per global
batch B: B sentences -> 2B dropout views of `--seq` tokens, the unsupervised SimCSE loss, clipping
and AdamW, bf16 compute with fp32 parameters and optimiser state.

Peers (`--peers`, default all):
- `jax`: simcse-jax's update step built as the trainer builds it (`make_train_step` with in-step
  dropout keys, `compile_train_step` with the trainer's compiler options), data parallel over all
  local devices;
- `torch`: the reference step exactly (`torch_reference.TorchSimCSEStep`: broadcast cosine
  [B,1,H] x [1,B,H]), eager, `torch.autocast(bfloat16)`, fused AdamW, one device;
- `torch_matmul`: the same with the cosine as normalise-then-matmul (no [B, B, H] tensor);
- `torch_compile`, `torch_compile_matmul`: `torch.compile` of either loss. The modes in
  `--torch-compile-modes` are tried in order and the first that compiles and runs is timed; the
  ones that failed are recorded with their error. The default skips `max-autotune` (GEMM
  autotuning costs minutes at BERT-base and cuBLAS already serves these bf16 shapes) and starts
  with `reduce-overhead` (CUDA graphs: the launch overhead that dominates small batches).

Timing: after `--warmup` steps, `pipelined` dispatches `--steps` steps and then blocks once, the
way the trainer dispatches (it reads measurements only at log steps); the figure is the median over
`--rounds` such windows. `blocking` waits for every step (what this script reported before; it
adds one host-device round trip per step). Both use the same batch every step.

MFU: model FLOPs per step (`torch_reference.flops_per_token_train`: 6 x non-embedding matmul
weights x tokens plus the attention matmuls; 16.93 TFLOP at BERT-base, batch 512, seq 32) over the
pipelined step time, against (a) the datasheet's dense bf16 peak per device (`--peak-tflops`, else
looked up by device name in DATASHEET_PEAK_BF16_TFLOPS) and (b) the bf16 matmul ceiling measured in
this run (`--matmul-size`^3, best of rounds). XLA's own FLOP count of the step is reported beside.

Each (peer, batch size) runs in its own child process: JAX preallocates most of the GPU and
PyTorch's caching allocator keeps what it took, so sharing one process would starve whichever runs
second; an out-of-memory size gives a record with `"value": null` and the reason. Every record is
one JSON line on stdout; `--out DIR` also writes DIR/bench_gpu.json and DIR/bench_gpu.md (a table),
rewritten after every child so that an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from torch_reference import TorchSimCSEStep, flops_per_token_train  # noqa: E402

PEERS = {
    "jax": "simcse-jax update step (the trainer's), bf16 compute, fp32 params",
    "torch": "PyTorch eager, the reference step (broadcast cosine), autocast bf16, fused AdamW",
    "torch_matmul": "PyTorch eager, matmul cosine, autocast bf16, fused AdamW",
    "torch_compile": "torch.compile of the reference step (broadcast cosine)",
    "torch_compile_matmul": "torch.compile, matmul cosine",
}
# Dense (no sparsity) bf16 tensor-core peaks per device from the vendors' datasheets, TFLOP/s. The
# first entry whose name occurs in the device kind wins (so "H100 PCIe" before "H100").
DATASHEET_PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H200", 989.0),
    ("H100", 989.0),
    ("H800", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
)


def datasheet_peak_tflops(device_kind: str) -> float | None:
    """The dense bf16 peak of a device by its name (jax's device_kind / torch's device name)."""
    for name, tflops in DATASHEET_PEAK_BF16_TFLOPS:
        if name.lower() in device_kind.lower():
            return tflops
    return None


def record(figure: str, value, unit: str, **extra) -> dict:
    return {"figure": figure, "value": value, "unit": unit, **extra}


def emit(rec: dict) -> None:
    print(json.dumps(rec), flush=True)


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


def time_pipelined(dispatch, sync, steps: int, rounds: int) -> float:
    """Seconds per step when `steps` steps are dispatched back to back and waited for once; the
    median over `rounds` windows."""
    per_step = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(steps):
            out = dispatch()
        sync(out)
        per_step.append((time.perf_counter() - t0) / steps)
    return statistics.median(per_step)


def time_blocking(dispatch, sync, steps: int) -> float:
    """Seconds per step when every step is waited for: the median over `steps` steps."""
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        sync(dispatch())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def timings(dispatch, sync, args) -> dict:
    for _ in range(args.warmup):
        sync(dispatch())
    pipelined = time_pipelined(dispatch, sync, args.steps, args.rounds)
    blocking = time_blocking(dispatch, sync, args.steps)
    return {"step_ms_pipelined": round(pipelined * 1e3, 3), "step_ms_blocking": round(blocking * 1e3, 3)}


def is_oom(e: BaseException) -> bool:
    text = f"{type(e).__name__}: {e}"
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower() or "OutOfMemory" in text


def first_line(e: BaseException, limit: int = 300) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:limit] if text else ''}"


# ----------------------------------------------------------------------------- children


def bench_matmul(args) -> dict:
    """The bf16 matmul ceiling of this device in this run: the best of `rounds` windows of
    back-to-back [n, n] x [n, n] products (device 0)."""
    import jax
    import jax.numpy as jnp

    n = args.matmul_size
    ka, kb = jax.random.split(jax.random.key(0))
    # Random data: zeros run faster on some GPUs (less switching power), which is not a ceiling.
    a = jax.random.normal(ka, (n, n), jnp.bfloat16)
    b = jax.random.normal(kb, (n, n), jnp.bfloat16)
    matmul = jax.jit(lambda x, y: x @ y)  # [n, n] x [n, n] -> [n, n], bf16 out, fp32 accumulation
    matmul(a, b).block_until_ready()
    reps = max(1, args.matmul_reps)
    best = float("inf")
    for _ in range(max(3, args.rounds)):
        t0 = time.perf_counter()
        for _ in range(reps):
            out = matmul(a, b)
        out.block_until_ready()
        best = min(best, (time.perf_counter() - t0) / reps)
    return record("matmul_ceiling", round(2 * n**3 / best / 1e12, 3), "TFLOP/s", size=n, dtype="bfloat16",
                  ms=round(best * 1e3, 4), device_kind=jax.devices()[0].device_kind, platform=jax.devices()[0].platform)


def bench_jax(batch_np, args) -> dict:
    import jax
    from flax import nnx

    from simcse_jax.encoder import Encoder, EncoderConfig
    from simcse_jax.objective import ObjectiveConfig
    from simcse_jax.optim import OptimConfig, make_optimizer
    from simcse_jax.sharding import batch_sharding, make_mesh
    from simcse_jax.step_builder import compile_train_step
    from simcse_jax.train_step import init_train_state, make_train_step
    from simcse_jax.xla_options import compiler_options

    cfg = EncoderConfig(compute_dtype=args.dtype, **bert_config_kwargs(args.tiny))
    model = Encoder(cfg, rngs=nnx.Rngs(0))
    mesh = make_mesh({"data": -1})
    optim = OptimConfig(total_steps=10**6, learning_rate=3e-5)
    optimizer = make_optimizer(optim)
    graphdef, state, shardings = init_train_state(model, optimizer, mesh)
    del model
    objective = ObjectiveConfig(pooler="cls", mlp_only_train=True, temperature=0.05)
    # As train.py builds it: the step derives its dropout key from the base key and its counter.
    step = make_train_step(graphdef, optimizer, mesh, shardings, objective, optim, fold_in_step=True)
    batch = jax.device_put(batch_np, batch_sharding(mesh, 3))
    base = jax.random.key(0)
    platform_name = jax.devices()[0].platform
    compiled, info = compile_train_step(step, state, batch, compiler_options(True, platform_name))
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    box = {"state": state}

    def dispatch():
        box["state"], meas = compiled(box["state"], batch, base)
        return meas

    t = timings(dispatch, jax.block_until_ready, args)
    return dict(t, compile_s=info["compile_seconds"], step_peak_memory_mib=info.get("step_peak_memory_mib"),
                xla_flops_per_step=float((cost or {}).get("flops", 0.0)), devices=jax.device_count(),
                device_kind=jax.devices()[0].device_kind, platform=platform_name, jax=jax.__version__)


def bench_torch(batch_np, args, *, cosine: str, compile_modes: list[str] | None) -> dict:
    import torch
    from transformers import BertConfig, BertModel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tb = tuple(torch.from_numpy(batch_np[k].astype(np.int64)).to(device) for k in ("input_ids", "attention_mask", "token_type_ids"))

    def sync(_):
        if device == "cuda":
            torch.cuda.synchronize()

    def build(mode):
        torch.manual_seed(0)
        bert = BertModel(BertConfig(**bert_config_kwargs(args.tiny)), add_pooling_layer=False)
        return TorchSimCSEStep(bert, device=device, amp_dtype=torch.bfloat16, fused_adamw=device == "cuda",
                               cosine=cosine, compile_mode=mode)

    extra: dict = {}
    if compile_modes is None:
        step = build(None)
    else:  # the first mode that compiles and runs one step; the others' errors are recorded
        failures, step = {}, None
        for mode in compile_modes:
            t0 = time.perf_counter()
            try:
                step = build(mode)
                sync(step(*tb))  # compiles (forward, and backward through AOTAutograd)
            except Exception as e:
                if is_oom(e):
                    raise
                failures[mode] = first_line(e)
                step = None
                torch._dynamo.reset()
                continue
            extra.update(compile_mode=mode, compile_s=round(time.perf_counter() - t0, 1))
            break
        if failures:
            extra["compile_failures"] = failures
        if step is None:
            raise CompileFailed(failures)

    t = timings(lambda: step(*tb), sync, args)
    name = torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu"
    return dict(t, **extra, devices=1, device_kind=name, platform=device, torch=torch.__version__,
                attn=getattr(step.bert.config, "_attn_implementation", None))


class CompileFailed(Exception):
    def __init__(self, failures: dict):
        super().__init__("; ".join(f"{m}: {why}" for m, why in failures.items()) or "no compile mode given")
        self.failures = failures


def run_one(args, peer: str, b: int) -> dict:
    """One peer at one global batch size, in this process: its train_step record."""
    from transformers import BertConfig

    bc = BertConfig(**bert_config_kwargs(args.tiny))
    per_token = flops_per_token_train(bc.num_hidden_layers, bc.hidden_size, bc.intermediate_size, args.seq)
    tag = {"peer": peer, "global_batch": b, "views": 2 * b, "seq": args.seq, "model": "tiny-bert" if args.tiny else "bert-base",
           "dtype": args.dtype if peer == "jax" else "bfloat16",
           "model_flops_per_step": per_token * 2 * b * args.seq}  # 2 views per sentence
    batch_np = random_batch(b, args.seq, bc.vocab_size)
    modes = [m for m in args.torch_compile_modes.split(",") if m.strip()]
    try:
        if peer == "jax":
            figures = bench_jax(batch_np, args)
        else:
            cosine = "matmul" if peer.endswith("_matmul") else "broadcast"
            figures = bench_torch(batch_np, args, cosine=cosine, compile_modes=modes if "compile" in peer else None)
    except CompileFailed as e:
        return record("train_step", None, "sentences/s", **tag, error=f"torch.compile failed in every mode: {e}",
                      compile_failures=e.failures)
    except Exception as e:  # an OOM at one size should not hide the other sizes
        if not is_oom(e):
            raise
        return record("train_step", None, "sentences/s", **tag, error=f"out of memory: {first_line(e)}")
    per_s = lambda ms: float(f"{b / (ms / 1e3):.5g}")
    return record("train_step", per_s(figures["step_ms_pipelined"]), "sentences/s", **tag,
                  sentences_per_s_blocking=per_s(figures["step_ms_blocking"]), **figures)


# ----------------------------------------------------------------------------- the parent


def add_mfu(rec: dict, peak_tflops: float | None, ceiling_tflops: float | None) -> dict:
    """MFU of a train_step record (pipelined time) against the datasheet peak and the measured
    matmul ceiling, per device."""
    if rec.get("figure") != "train_step" or rec.get("value") is None:
        return rec
    achieved = rec["model_flops_per_step"] / (rec["step_ms_pipelined"] / 1e3) / rec["devices"]  # FLOP/s per device
    rec["model_tflops_per_s"] = float(f"{achieved / 1e12:.4g}")
    rec["mfu_peak"] = None if not peak_tflops else float(f"{achieved / (peak_tflops * 1e12):.4g}")
    rec["mfu_ceiling"] = None if not ceiling_tflops else float(f"{achieved / (ceiling_tflops * 1e12):.4g}")
    return rec


def jax_vs_best_torch(records: list[dict]) -> dict[int, dict]:
    """Per batch size: jax's sentences/s over the fastest torch peer's (acceptance 2 of issue 22)."""
    out = {}
    for b in sorted({r["global_batch"] for r in records if r.get("figure") == "train_step"}):
        rows = [r for r in records if r.get("figure") == "train_step" and r["global_batch"] == b and r.get("value")]
        jax_row = next((r for r in rows if r["peer"] == "jax"), None)
        torch_rows = [r for r in rows if r["peer"] != "jax"]
        if jax_row and torch_rows:
            best = max(torch_rows, key=lambda r: r["value"])
            out[b] = {"best_torch_peer": best["peer"], "ratio": round(jax_row["value"] / best["value"], 3)}
    return out


def markdown_table(meta: dict, records: list[dict]) -> str:
    def cell(v, fmt="{}"):
        return "–" if v is None else fmt.format(v)

    lines = [
        f"# bench_gpu.py ({meta['model']}, seq {meta['seq']}, {meta['device_kind']}, {meta['when']})",
        "",
        f"Datasheet peak {cell(meta['peak_tflops'])} TFLOP/s per device ({meta['peak_source']}); measured bf16 "
        f"{meta['matmul_size']}^3 matmul ceiling {cell(meta['ceiling_tflops'])} TFLOP/s. Pipelined: {meta['steps']} steps "
        f"dispatched, then one wait (median of {meta['rounds']}); blocking: a wait after every step. Load average "
        f"{meta['load_average_start']} -> {meta.get('load_average_end', '?')}.",
        "",
        "| peer | batch | pipelined ms | sentences/s | MFU (peak) | MFU (ceiling) | blocking ms | compile s | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        if r.get("figure") != "train_step":
            continue
        note = r.get("error") or (f"mode {r['compile_mode']}" if r.get("compile_mode") else "")
        if r.get("compile_failures") and r.get("value") is not None:
            note += "; failed: " + ", ".join(r["compile_failures"])
        lines.append(f"| {r['peer']} | {r['global_batch']} | {cell(r.get('step_ms_pipelined'))} | {cell(r.get('value'), '{:,.0f}')} | "
                     f"{cell(r.get('mfu_peak'), '{:.3f}')} | {cell(r.get('mfu_ceiling'), '{:.3f}')} | {cell(r.get('step_ms_blocking'))} | "
                     f"{cell(r.get('compile_s'))} | {note.replace('|', '/')[:160]} |")
    ratios = jax_vs_best_torch(records)
    if ratios:
        lines += ["", "| batch | jax / fastest torch peer (sentences/s) | that peer |", "|---|---|---|"]
        lines += [f"| {b} | {v['ratio']:.2f}x | {v['best_torch_peer']} |" for b, v in ratios.items()]
    return "\n".join(lines) + "\n"


def write_outputs(out_dir: Path, meta: dict, records: list[dict]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {"meta": meta, "records": records, "jax_vs_best_torch": jax_vs_best_torch(records)}
    (out_dir / "bench_gpu.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out_dir / "bench_gpu.md").write_text(markdown_table(meta, records))


def child_records(args_list: list[str]) -> tuple[list[dict], int]:
    """Runs this script as a child with `args_list`; its JSON records and exit status (its stderr
    passes through)."""
    res = subprocess.run([sys.executable, __file__, *args_list], stdout=subprocess.PIPE, text=True)
    recs = []
    for line in res.stdout.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            sys.stdout.write(line + "\n")  # not a record (a library's print): keep it visible
            continue
        if isinstance(rec, dict) and "figure" in rec:
            recs.append(rec)
    return recs, res.returncode


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", default=None,
                   help="global sentences per step, comma list; default 64,512,4096 (64: the paper's BERT-base), --tiny 8,64")
    p.add_argument("--peers", default=",".join(PEERS), help=f"comma list of {', '.join(PEERS)}")
    p.add_argument("--steps", type=int, default=30, help="steps per timing window")
    p.add_argument("--rounds", type=int, default=3, help="pipelined windows (median) and matmul windows (best)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--dtype", default="bfloat16", help="JAX compute dtype")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="per-device dense bf16 peak; default: looked up by device name (H200/H100 SXM: 989)")
    p.add_argument("--matmul-size", type=int, default=None, help="n of the n^3 bf16 ceiling matmul (default 8192, --tiny 512)")
    p.add_argument("--matmul-reps", type=int, default=10, help="matmuls per ceiling window")
    p.add_argument("--torch-compile-modes", default="reduce-overhead,default",
                   help="torch.compile modes, tried in order (max-autotune, max-autotune-no-cudagraphs, reduce-overhead, default)")
    p.add_argument("--tiny", action="store_true", help="a 2-layer toy BERT (CPU smoke test of this script)")
    p.add_argument("--out", default=None, help="folder for bench_gpu.json and bench_gpu.md")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: "peer:batch" or "matmul" in a child
    args = p.parse_args(argv)
    if args.matmul_size is None:
        args.matmul_size = 512 if args.tiny else 8192
    if args.batch_sizes is None:
        args.batch_sizes = "8,64" if args.tiny else "64,512,4096"
    return p, args


def main(argv=None) -> int:
    argv = list(argv if argv is not None else sys.argv[1:])
    p, args = parse_args(argv)
    if args.one:
        if args.one == "matmul":
            emit(bench_matmul(args))
        else:
            peer, b = args.one.split(":")
            emit(run_one(args, peer, int(b)))
        return 0
    try:
        sizes = [int(x) for x in args.batch_sizes.split(",") if x.strip()]
    except ValueError:
        p.error(f"--batch-sizes: expected a comma list of integers, got {args.batch_sizes!r}")
    peers = [x.strip() for x in args.peers.split(",") if x.strip()]
    unknown = [x for x in peers if x not in PEERS]
    if unknown:
        p.error(f"--peers: unknown {unknown}; choose from {', '.join(PEERS)}")
    if not peers or not sizes:
        p.error("--peers and --batch-sizes must name something")

    meta = {"model": "tiny-bert" if args.tiny else "bert-base", "seq": args.seq, "steps": args.steps, "rounds": args.rounds,
            "warmup": args.warmup, "matmul_size": args.matmul_size, "peers": {k: PEERS[k] for k in peers},
            "torch_compile_modes": args.torch_compile_modes, "when": time.strftime("%Y-%m-%d %H:%M"),
            "python": platform.python_version(), "device_kind": "?", "peak_tflops": args.peak_tflops,
            "peak_source": "--peak-tflops" if args.peak_tflops else "datasheet table", "ceiling_tflops": None,
            "load_average_start": round(os.getloadavg()[0], 2)}
    records: list[dict] = []
    out_dir = Path(args.out) if args.out else None
    failed = 0

    def take(recs: list[dict]) -> None:
        for rec in recs:
            records.append(add_mfu(rec, meta["peak_tflops"], meta["ceiling_tflops"]))
            emit(rec)
        if out_dir is not None:
            write_outputs(out_dir, meta, records)

    # The ceiling first, so that every step record carries its MFU as it arrives.
    recs, rc = child_records([*argv, "--one", "matmul"])
    ceiling = next((r for r in recs if r["figure"] == "matmul_ceiling"), None)
    if ceiling is not None:
        meta.update(ceiling_tflops=ceiling["value"], device_kind=ceiling["device_kind"])
        if meta["peak_tflops"] is None:
            meta["peak_tflops"] = datasheet_peak_tflops(ceiling["device_kind"])
            if meta["peak_tflops"] is None:
                meta["peak_source"] = f"unknown device {ceiling['device_kind']!r}: pass --peak-tflops"
    if rc:
        failed += 1
        recs.append(record("matmul_ceiling", None, "TFLOP/s", error=f"child process exited with {rc} (its stderr is above)"))
    take(recs)
    for b in sizes:
        for peer in peers:
            recs, rc = child_records([*argv, "--one", f"{peer}:{b}"])
            if rc or not recs:
                failed += 1
                recs = [record("train_step", None, "sentences/s", peer=peer, global_batch=b,
                               error=f"child process exited with {rc} (its stderr is above)")]
            take(recs)
    meta["load_average_end"] = round(os.getloadavg()[0], 2)
    if out_dir is not None:
        write_outputs(out_dir, meta, records)
    emit(record("load_average", [meta["load_average_start"], meta["load_average_end"]], "1-min load at start, end"))
    ratios = jax_vs_best_torch(records)
    for b, v in ratios.items():
        emit(record("jax_vs_best_torch", v["ratio"], "x (sentences/s)", global_batch=b, best_torch_peer=v["best_torch_peer"]))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
