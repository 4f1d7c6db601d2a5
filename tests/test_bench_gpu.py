"""benchmarks/bench_gpu.py as a specification: what it measures, how it computes MFU, and that its
CPU mode (`--tiny`) runs every peer, the PyTorch ones included.

The GPU figures themselves come from a GPU machine (benchmarks/gpu_check.sh); here the script's
arithmetic is pinned to issue 22's published figures, and the PyTorch matmul-cosine peer is checked
to compute the reference's loss.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertModel

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import bench_gpu  # noqa: E402
from torch_reference import TorchSimCSEStep, flops_per_token_train  # noqa: E402

TINY_BERT = BertConfig(**bench_gpu.bert_config_kwargs(tiny=True))


def run_bench(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    # One CPU device (the 8 simulated ones of conftest would only slow the children down) and no
    # TPU probing by a libtpu that happens to be installed.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_gpu.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def records(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def step_records(recs: list[dict]) -> dict[str, dict]:
    return {r["peer"]: r for r in recs if r["figure"] == "train_step"}


# ----------------------------------------------------------------------------- arithmetic


def test_model_flops_are_issue_22s_bert_base_count():
    # 6 x non-embedding matmul weights x tokens (+ attention): 16.93 TFLOP per step at batch 512, seq 32.
    per_step = flops_per_token_train(12, 768, 3072, 32) * 2 * 512 * 32
    assert per_step == pytest.approx(16.93e12, rel=1e-3)


def test_mfu_against_the_datasheet_peak_and_the_measured_ceiling():
    # Issue 22: jax pipelined at batch 512, 56.1 ms per step -> MFU 0.305 of 989 TFLOP/s.
    rec = {"figure": "train_step", "value": 9120.0, "model_flops_per_step": 16.93e12, "step_ms_pipelined": 56.1, "devices": 1}
    bench_gpu.add_mfu(rec, peak_tflops=989.0, ceiling_tflops=790.0)
    assert rec["mfu_peak"] == pytest.approx(0.305, abs=5e-4)
    assert rec["mfu_ceiling"] == pytest.approx(16.93e12 / 0.0561 / 790e12, rel=1e-3)
    # Per device: the same step time on 4 devices is a quarter of the utilisation.
    rec4 = bench_gpu.add_mfu({**rec, "devices": 4}, peak_tflops=989.0, ceiling_tflops=None)
    assert rec4["mfu_peak"] == pytest.approx(rec["mfu_peak"] / 4, rel=1e-3) and rec4["mfu_ceiling"] is None


@pytest.mark.parametrize("kind, peak", [("NVIDIA H200", 989.0), ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
                                        ("NVIDIA A100-SXM4-80GB", 312.0), ("cpu", None), ("TPU v5 lite", None)])
def test_datasheet_peak_by_device_name(kind, peak):
    assert bench_gpu.datasheet_peak_tflops(kind) == peak


def test_jax_is_compared_with_the_fastest_torch_peer_per_batch():
    recs = [{"figure": "train_step", "peer": p, "global_batch": b, "value": v} for p, b, v in
            [("jax", 64, 300.0), ("torch", 64, 100.0), ("torch_compile_matmul", 64, 200.0),
             ("jax", 4096, 900.0), ("torch", 4096, None), ("torch_matmul", 4096, 600.0)]]
    assert bench_gpu.jax_vs_best_torch(recs) == {64: {"best_torch_peer": "torch_compile_matmul", "ratio": 1.5},
                                                 4096: {"best_torch_peer": "torch_matmul", "ratio": 1.5}}


def test_timing_windows_count_every_dispatched_step():
    calls = []
    per_step = bench_gpu.time_pipelined(lambda: calls.append(1), lambda _: None, steps=7, rounds=3)
    assert len(calls) == 21 and per_step >= 0
    calls.clear()
    bench_gpu.time_blocking(lambda: calls.append(1), lambda _: None, steps=5)
    assert len(calls) == 5


# ----------------------------------------------------------------------------- the PyTorch peers


def test_matmul_cosine_peer_computes_the_reference_loss():
    torch.manual_seed(0)
    bert = BertModel(TINY_BERT, add_pooling_layer=False)
    ids = torch.randint(5, TINY_BERT.vocab_size, (6, 2, 16))  # views of different text: a loss far from 0
    batch = (ids, torch.ones_like(ids), torch.zeros_like(ids))
    losses = {}
    for cosine in ("broadcast", "matmul"):
        step = TorchSimCSEStep(copy.deepcopy(bert), cosine=cosine)  # same seed: the same fresh MLP
        step.bert.eval()  # no dropout: both see the same embeddings
        step.mlp.eval()
        with torch.no_grad():
            losses[cosine] = step.loss(*batch)
    assert float(losses["broadcast"]) > 0.1
    np.testing.assert_allclose(float(losses["matmul"]), float(losses["broadcast"]), rtol=1e-5)


def test_unknown_cosine_is_refused():
    with pytest.raises(ValueError, match="cosine"):
        TorchSimCSEStep(BertModel(TINY_BERT, add_pooling_layer=False), cosine="dot")


# ----------------------------------------------------------------------------- the script on CPU


def test_tiny_run_on_cpu_reports_every_peer(tmp_path):
    """jax and an eager PyTorch peer time their steps; a torch.compile that cannot compile in any
    mode is a record with its reasons, not a crash; the JSON and markdown outputs agree. (The
    reference peer `torch` differs from `torch_matmul` by its cosine alone, checked above.)"""
    res = run_bench("--tiny", "--batch-sizes", "8", "--steps", "2", "--rounds", "1", "--warmup", "1",
                    "--peers", "jax,torch_matmul,torch_compile", "--torch-compile-modes", "no-such-mode",
                    "--peak-tflops", "2.0", "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    recs = records(res.stdout)
    ceiling = next(r for r in recs if r["figure"] == "matmul_ceiling")
    assert ceiling["value"] > 0 and ceiling["size"] == 512 and ceiling["dtype"] == "bfloat16"

    steps = step_records(recs)
    assert set(steps) == {"jax", "torch_matmul", "torch_compile"}
    for peer in ("jax", "torch_matmul"):
        r = steps[peer]
        assert r["value"] > 0 and r["global_batch"] == 8 and r["views"] == 16, r
        assert r["step_ms_pipelined"] > 0 and r["step_ms_blocking"] > 0
        assert r["value"] == pytest.approx(8 / (r["step_ms_pipelined"] / 1e3), rel=1e-3)
        assert r["model_flops_per_step"] == flops_per_token_train(2, 64, 128, 32) * 16 * 32
        assert r["mfu_peak"] == pytest.approx(r["model_tflops_per_s"] / 2.0, rel=1e-2)
        assert r["mfu_ceiling"] == pytest.approx(r["model_tflops_per_s"] / ceiling["value"], rel=1e-2)
    assert steps["jax"]["xla_flops_per_step"] > 0 and steps["jax"]["compile_s"] > 0

    failed = steps["torch_compile"]
    assert failed["value"] is None
    assert "Unrecognized mode=no-such-mode" in failed["compile_failures"]["no-such-mode"]
    assert "torch.compile failed in every mode" in failed["error"]

    ratio = next(r for r in recs if r["figure"] == "jax_vs_best_torch")
    assert ratio["global_batch"] == 8 and ratio["best_torch_peer"] == "torch_matmul"
    assert ratio["value"] == pytest.approx(steps["jax"]["value"] / steps["torch_matmul"]["value"], rel=1e-2)

    doc = json.loads((tmp_path / "bench_gpu.json").read_text())
    assert doc["meta"]["peak_tflops"] == 2.0 and doc["meta"]["ceiling_tflops"] == ceiling["value"]
    assert [r.get("peer") for r in doc["records"]] == [None, "jax", "torch_matmul", "torch_compile"]
    table = (tmp_path / "bench_gpu.md").read_text()
    for peer in steps:
        assert f"| {peer} | 8 |" in table
    assert "no-such-mode" in table


def test_default_batch_sizes_are_64_512_4096():
    _, args = bench_gpu.parse_args([])
    assert args.batch_sizes == "64,512,4096" and args.matmul_size == 8192
    assert args.peers.split(",") == list(bench_gpu.PEERS)
    _, tiny = bench_gpu.parse_args(["--tiny"])
    assert tiny.batch_sizes == "8,64" and tiny.matmul_size == 512


def test_unknown_peer_is_one_line_error():
    res = run_bench("--tiny", "--peers", "jax,tensorflow")
    assert res.returncode == 2 and "--peers: unknown ['tensorflow']" in res.stderr


@pytest.mark.slow
def test_torch_compile_falls_back_to_the_next_mode(tmp_path):
    """A mode that fails is recorded and the next one is timed (a real inductor compile on CPU)."""
    res = run_bench("--tiny", "--batch-sizes", "8", "--steps", "2", "--rounds", "1", "--warmup", "1",
                    "--peers", "torch_compile_matmul", "--torch-compile-modes", "no-such-mode,default")
    assert res.returncode == 0, res.stderr[-3000:]
    r = step_records(records(res.stdout))["torch_compile_matmul"]
    assert r["value"] > 0 and r["compile_mode"] == "default" and r["compile_s"] > 0
    assert list(r["compile_failures"]) == ["no-such-mode"]
