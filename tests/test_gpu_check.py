"""benchmarks/gpu_check.sh as a specification: one command that runs every GPU phase from a source
checkout with PYTHONPATH=. and data packed by benchmarks/pack_device_data.py. Here it runs in its
TINY=1 mode on the CPU (the same phases at toy sizes); on a GPU machine the same script gives the
figures in benchmarks/README.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_launch_scripts import SHELLCHECK, needs_shellcheck

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
PHASES = ["env", "bench", "bert", "train_b512", "demo_bf16", "demo_fp32", "train_b64", "summary"]


def clean_env(**extra: str) -> dict[str, str]:
    """The variables a user's shell has; none of the test session's (XLA_FLAGS with 8 simulated
    devices, the compile cache folder), so the script sets up what it needs itself."""
    keep = ("PATH", "HOME", "LANG", "TMPDIR")
    return {**{k: os.environ[k] for k in keep if k in os.environ}, "JAX_PLATFORMS": "cpu", **extra}


def test_script_parses_and_lints():
    assert SCRIPT.read_text().startswith("#!/usr/bin/env bash\n")
    res = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


@needs_shellcheck
def test_shellcheck():
    res = subprocess.run([SHELLCHECK, "-x", str(SCRIPT)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_missing_input_folder_is_one_line_before_anything_runs(tmp_path):
    out = tmp_path / "out"
    res = subprocess.run(["bash", str(SCRIPT)], env=clean_env(STS_DIR=str(tmp_path / "nope"), OUT=str(out), PYTHON=sys.executable),
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert res.stderr.strip() == f"gpu_check: STS_DIR: folder {tmp_path / 'nope'} does not exist"
    assert not out.exists()


@pytest.mark.slow
def test_tiny_mode_runs_every_phase_from_packed_data(tmp_path):
    """pack_device_data.py, then TINY=1 gpu_check.sh with the venv's python and nothing but
    PYTHONPATH=. (set by the script): every phase exits 0, the summary has every run, and the
    output folder holds at most 8 files (what the device tool brings back)."""
    data = tmp_path / "device_data"
    pack = subprocess.run([sys.executable, str(REPO / "benchmarks" / "pack_device_data.py"), "--out", str(data)],
                          env=clean_env(PYTHONPATH=str(REPO)), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert pack.returncode == 0, pack.stderr
    assert {p.name for p in data.iterdir()} == {"minilm", "sts", "train_samples"}
    assert not (data / "sts" / "_variants").exists()

    out, work = tmp_path / "out", tmp_path / "work"
    env = clean_env(TINY="1", PYTHON=sys.executable, OUT=str(out), WORK=str(work), DATA_DIR=str(data))
    res = subprocess.run(["bash", str(SCRIPT)], env=env, cwd=REPO, capture_output=True, text=True, timeout=1200)
    log = (out / "gpu_check.log").read_text() if (out / "gpu_check.log").is_file() else res.stdout
    assert res.returncode == 0, log[-5000:] + res.stderr[-2000:]
    assert f"minilm={data / 'minilm'}" in log  # the packed copy, not the installed package

    phases = [line.split("\t") for line in (out / "phases.tsv").read_text().splitlines()[1:]]
    assert [p[0] for p in phases] == PHASES
    assert all(p[1] == "0" for p in phases), phases

    summary = json.loads((out / "summary.json").read_text())
    runs = {r["run"]: r for r in summary["runs"]}
    assert set(runs) == {"train_b512", "train_b64", "demo_bf16", "demo_fp32"}
    assert all(r["status"] == "completed" and r["sentences_per_s"] > 0 for r in runs.values()), runs
    assert runs["train_b512"]["exported"] and len(runs["train_b512"]["sts_test"]) == 8  # 7 tasks + Avg.
    assert runs["demo_bf16"]["compute_dtype"] == "bfloat16" and runs["demo_bf16"]["exported"]
    assert runs["demo_fp32"]["compute_dtype"] == "float32" and runs["demo_fp32"]["exported"]
    peers = {r["peer"]: r for r in summary["bench"]["records"] if r["figure"] == "train_step"}
    assert set(peers) == {"jax", "torch", "torch_matmul", "torch_compile_matmul"}
    assert all(r["value"] > 0 for r in peers.values()), peers

    md = (out / "summary.md").read_text()
    assert "TINY: toy sizes, not GPU figures" in md
    for name in PHASES[:-1] + ["torch_compile_matmul"]:
        assert f"| {name} |" in md
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and all(p.is_file() for p in out.iterdir()), files
