"""The summary of one benchmarks/gpu_check.sh run: OUT/summary.md (tables) and OUT/summary.json.

    python benchmarks/gpu_check_summary.py --write-env /tmp/gpu_check.XXXX/env.json   # first: versions, devices
    python benchmarks/gpu_check_summary.py --out benchmarks/gpu_check_out --work /tmp/gpu_check.XXXX

Reads OUT/phases.tsv (each phase's exit status and seconds), OUT/bench_gpu.json (bench_gpu.py),
WORK/env.json and WORK/<run>/results.json of the trainer runs. Trainer MFU uses the same model
FLOPs as bench_gpu.py (torch_reference.flops_per_token_train, from the run's model config.json) and
the peak bench_gpu.py resolved.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from torch_reference import flops_per_token_train  # noqa: E402

RUNS = ("train_b512", "train_b64", "demo_bf16", "demo_fp32")


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_phases(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = [line.split("\t") for line in path.read_text().splitlines()[1:] if line.strip()]
    return [{"phase": r[0], "exit": int(r[1]), "seconds": int(r[2])} for r in rows]


def model_flops_per_sentence(model_dir: str | None, seq: int) -> float | None:
    """Model FLOPs of one training sentence (two dropout views of `seq` tokens) for a BERT folder."""
    cfg = read_json(Path(model_dir) / "config.json") if model_dir else None
    if not cfg:
        return None
    per_token = flops_per_token_train(cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"], seq)
    return per_token * 2 * seq


def write_env(path: Path) -> dict:
    """Versions of the libraries gpu_check.sh needs and the devices jax and torch see. Importing
    them all is also the check that the image has them."""
    import platform

    import flax
    import jax
    import optax
    import orbax.checkpoint  # noqa: F401  (the trainer's checkpoints)
    import torch
    import transformers

    info = {"python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
            "transformers": transformers.__version__, "torch": torch.__version__, "devices": [str(d) for d in jax.devices()],
            "device_kind": jax.devices()[0].device_kind, "torch_cuda": torch.cuda.is_available()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(info) + "\n")
    return info


def run_row(name: str, work: Path, peak_tflops: float | None, ceiling_tflops: float | None) -> dict:
    res = read_json(work / name / "results.json") or {}
    config = read_json(work / name / "config.json") or {}
    row = {"run": name, "status": res.get("status"), "steps": res.get("steps"), "global_batch": res.get("global_batch_size"),
           "compute_dtype": res.get("compute_dtype"), "sentences_per_s": res.get("sentences_per_s"),
           "compile_seconds": res.get("compile_seconds"), "train_seconds": res.get("train_seconds"),
           "exported": bool(res.get("export_dir")), "devices": res.get("devices")}
    if row["sentences_per_s"] and row["global_batch"]:
        row["steps_per_s"] = round(row["sentences_per_s"] / row["global_batch"], 2)
    flops = model_flops_per_sentence(config.get("model"), config.get("max_seq_length", 32))
    if flops and row["sentences_per_s"]:
        achieved = row["sentences_per_s"] * flops / (row["devices"] or 1)  # model FLOP/s per device
        for key, tflops in (("mfu_peak", peak_tflops), ("mfu_ceiling", ceiling_tflops)):
            row[key] = float(f"{achieved / (tflops * 1e12):.4g}") if tflops else None
    sts_test = (res.get("sts_test") or {}).get("paper")
    if sts_test:
        row["sts_test"] = sts_test
    if res.get("best_dev_stsb") is not None:
        row["best_dev_stsb"] = res["best_dev_stsb"]
    return row


def sts_avg(scores: dict | None):
    if not scores:
        return None
    return scores.get("Avg.", scores.get("avg", list(scores.values())[-1]))


def cell(v, fmt="{}"):
    return "–" if v is None else fmt.format(v)


def summary_markdown(env: dict, phases: list[dict], bench_md: str | None, runs: list[dict], tiny: bool) -> str:
    lines = [f"# gpu_check ({'TINY: toy sizes, not GPU figures' if tiny else env.get('device_kind', '?')})", ""]
    if env:
        lines += [f"python {env.get('python')}, jax {env.get('jax')}, flax {env.get('flax')}, torch {env.get('torch')}, "
                  f"transformers {env.get('transformers')}; devices: {', '.join(env.get('devices', []))}", ""]
    lines += ["| phase | exit | seconds |", "|---|---|---|"]
    lines += [f"| {p['phase']} | {p['exit']} | {p['seconds']} |" for p in phases]
    lines += ["", f"Total {sum(p['seconds'] for p in phases)} s.", ""]
    lines += ["## Trainer runs (`simcse-jax train`; sentences/s: median of the logged intervals after the first)", "",
              "| run | dtype | batch | steps | sentences/s | steps/s | MFU (peak) | MFU (ceiling) | compile s | best dev STS-B "
              "| STS test avg | status |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['run']} | {cell(r['compute_dtype'])} | {cell(r['global_batch'])} | {cell(r['steps'])} | "
                     f"{cell(r['sentences_per_s'], '{:,.0f}')} | {cell(r.get('steps_per_s'))} | {cell(r.get('mfu_peak'), '{:.3f}')} | "
                     f"{cell(r['compile_seconds'])} | {cell(sts_avg(r.get('sts_test')), '{:.2f}')} | {cell(r['status'])} |")
    demo = {r["run"]: r.get("sts_test") for r in runs if r["run"].startswith("demo") and r.get("sts_test")}
    if demo:
        tasks = list(next(iter(demo.values())))
        lines += ["", "## MiniLM demo, STS test (Spearman x 100, evaluated in float32)", "",
                  "| run | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
        lines += [f"| {name} | " + " | ".join(f"{s.get(t, float('nan')):.2f}" for t in tasks) + " |" for name, s in demo.items()]
    if bench_md:
        lines += ["", "## Update step (bench_gpu.py)", "", bench_md.split("\n", 2)[2].strip()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path)
    p.add_argument("--work", type=Path)
    p.add_argument("--write-env", type=Path, help="write versions and devices to this file (gpu_check.sh's first phase)")
    args = p.parse_args(argv)
    if args.write_env:
        print(json.dumps(write_env(args.write_env)))
        return 0
    if not (args.out and args.work):
        p.error("--out and --work are required (or --write-env FILE)")
    env = read_json(args.work / "env.json") or {}
    phases = read_phases(args.out / "phases.tsv")
    bench = read_json(args.out / "bench_gpu.json") or {}
    meta = bench.get("meta", {})
    runs = [run_row(name, args.work, meta.get("peak_tflops"), meta.get("ceiling_tflops")) for name in RUNS if (args.work / name).is_dir()]
    tiny = meta.get("model") == "tiny-bert"
    bench_md = (args.out / "bench_gpu.md").read_text() if (args.out / "bench_gpu.md").is_file() else None
    text = summary_markdown(env, phases, bench_md, runs, tiny)
    (args.out / "summary.md").write_text(text)
    (args.out / "summary.json").write_text(json.dumps({"env": env, "phases": phases, "runs": runs, "bench": bench}, indent=1) + "\n")
    print(text)
    return 0  # a report: gpu_check.sh decides the exit status from phases.tsv


if __name__ == "__main__":
    sys.exit(main())
