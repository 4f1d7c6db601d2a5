"""Multi-host training on one machine: `simcse-jax launch-local` runs 2 processes x 4 CPU devices,
coordinated by `jax.distributed` with gloo CPU collectives, against 1 process x 8 devices.

What a pod does and these runs check: each host feeds only its own rows of the global batch
(`jax.make_array_from_process_local_data`), gradients are reduced across processes, only
process 0 writes logs and exports while every process writes its shards of each checkpoint, and
a SIGTERM delivered to one host makes every host save the same step.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from simcse_jax.config import TrainConfig
from simcse_jax.studies.launch_local import DEVICE_COUNT_FLAG, child_env, launch
from simcse_jax.train import train

REPO = Path(__file__).resolve().parents[1]
STEPS = 16
RUN_TIMEOUT_S = 300  # one launched run; normally ~30 s (two jax start-ups and a tiny model)


@pytest.fixture(scope="module")
def config(tiny_model_dir, train_samples_dir, tmp_path_factory) -> TrainConfig:
    # Dropout on (the model's 0.1): equal losses need equal dropout masks on both layouts too.
    return TrainConfig(
        model=str(tiny_model_dir), compute_dtype="float32",
        train_file=str(train_samples_dir / "wiki1m_for_simcse.head11914.txt"),
        data_cache_dir=str(tmp_path_factory.mktemp("data_cache")),
        pooler="cls", mlp_only_train=True, global_batch_size=16, learning_rate=1e-3, max_steps=STEPS,
        eval_steps=100, save_steps=100, log_every=1, sts_dir=None, do_export=False, do_test_eval=False, seed=3,
        mesh_data=-1, preemption_check_steps=4,  # the hosts vote on a SIGTERM every 4 steps
    )


@pytest.fixture(scope="module")
def config_file(config, tmp_path_factory) -> Path:
    """The config as a `configs/`-style file for the launched processes."""
    path = tmp_path_factory.mktemp("configs") / "multihost.py"
    path.write_text(
        "import json\nfrom simcse_jax.config import TrainConfig\n\n\n"
        f"def get_config(arg=None):\n    return TrainConfig(**json.loads({json.dumps(json.dumps(config.__dict__))}))\n"
    )
    return path


@pytest.fixture(scope="module")
def one_process(config, tmp_path_factory) -> dict[int, float]:
    """The reference: this process, 8 devices (conftest), mesh data=8. Also fills the token cache."""
    workdir = tmp_path_factory.mktemp("one_process")
    assert train(config, workdir, progress=False)["status"] == "completed"
    return step_losses(workdir)


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory) -> Path:
    # Every 2-process run compiles the same update step: the later ones load it from disk.
    return tmp_path_factory.mktemp("jax_cache")


def step_losses(workdir) -> dict[int, float]:
    out = {}
    for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            assert record["step"] not in out, f"step {record['step']} logged twice: more than one process writes"
            out[record["step"]] = record["loss"]
    return out


def launch_args(config_file, workdir, *overrides, launcher=()) -> list[str]:
    return [sys.executable, "-m", "simcse_jax.cli", "launch-local", "--num-processes", "2", "--devices-per-process", "4",
            "--timeout", str(RUN_TIMEOUT_S), "--pids-file", str(Path(workdir) / "launch_pids.json"), *launcher, "--",
            "train", "--config", str(config_file), "--workdir", str(workdir), "--no-progress", *overrides]


def launch_env(compile_cache) -> dict[str, str]:
    return {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(compile_cache)}


def run_launcher(config_file, workdir, compile_cache, *overrides, launcher=()) -> subprocess.CompletedProcess:
    Path(workdir).mkdir(parents=True, exist_ok=True)
    return subprocess.run(launch_args(config_file, workdir, *overrides, launcher=launcher), env=launch_env(compile_cache),
                          cwd=REPO, capture_output=True, text=True, timeout=RUN_TIMEOUT_S + 30)


def assert_close(losses: dict[int, float], reference: dict[int, float], steps) -> None:
    for step in steps:
        assert abs(losses[step] - reference[step]) <= 1e-5, (step, losses[step], reference[step])


def written_by_both_processes(step_dir: Path) -> bool:
    """orbax writes one array-metadata file per process that saved its shards of a step."""
    return {p.name for p in (step_dir / "params" / "array_metadatas").iterdir()} == {"process_0", "process_1"}


# ----------------------------------------------------------------------------- the launcher itself


def test_child_env_gives_each_process_its_devices_and_the_coordinator():
    env = child_env({"XLA_FLAGS": f"--xla_cpu_foo=1 {DEVICE_COUNT_FLAG}=8", "PATH": "/bin"},
                    process_id=1, num_processes=2, devices=4, port=5555)
    assert env["XLA_FLAGS"].split() == ["--xla_cpu_foo=1", f"{DEVICE_COUNT_FLAG}=4"]  # the inherited 8 is replaced
    assert (env["SIMCSE_COORDINATOR"], env["SIMCSE_NUM_PROCESSES"], env["SIMCSE_PROCESS_ID"]) == ("127.0.0.1:5555", "2", "1")
    assert env["JAX_PLATFORMS"] == "cpu" and env["PATH"] == "/bin"


def test_a_failing_process_stops_the_others_and_sets_the_exit_status(tmp_path):
    # Process 1 fails at once; process 0 would otherwise sleep (as a trainer would wait in a collective).
    script = ("import os, sys, time; pid = os.environ['SIMCSE_PROCESS_ID']; print('hello from', pid, flush=True); "
              "sys.exit(3) if pid == '1' else time.sleep(120)")
    out = io.StringIO()
    t0 = time.monotonic()
    status = launch(["probe"], num_processes=2, devices_per_process=1, out=out, program=[sys.executable, "-c", script],
                    pids_file=tmp_path / "pids.json", grace=1.0)
    assert status == 3
    assert time.monotonic() - t0 < 30  # process 0 was terminated after the grace period, not waited for
    text = out.getvalue()
    assert "[p0] hello from 0" in text and "[p1] hello from 1" in text
    pid1 = json.loads((tmp_path / "pids.json").read_text())["p1"]
    assert f"[launch] process 1 (pid {pid1}) exited with status 3" in text
    assert "[launch] they did not stop within 1 s: stopping the other processes" in text
    pids = json.loads((tmp_path / "pids.json").read_text())
    assert set(pids) == {"launcher", "p0", "p1"}
    assert not Path(f"/proc/{pids['p0']}").exists()


def test_timeout_kills_every_process():
    out = io.StringIO()
    status = launch(["probe"], num_processes=2, devices_per_process=1, out=out, timeout=1.0,
                    program=[sys.executable, "-c", "import time; time.sleep(120)"])
    assert status == 124 and "timeout after 1 s" in out.getvalue()


def test_sigterm_to_the_launcher_reaches_every_process():
    # Each child reports the signal and exits 0, as the trainer does after its preemption save.
    script = ("import os, signal, sys, time\n"
              "def stop(signum, frame):\n"
              "    print('got', signal.Signals(signum).name, flush=True); sys.exit(0)\n"
              "signal.signal(signal.SIGTERM, stop)\n"
              "print('ready', flush=True)\n"
              "time.sleep(120)\n"
              "sys.exit(5)\n")
    out = io.StringIO()

    def signal_launcher_when_ready():
        deadline = time.monotonic() + 60
        while out.getvalue().count("ready") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)  # launch() runs in this thread's process: its handler forwards

    threading.Thread(target=signal_launcher_when_ready, daemon=True).start()
    t0 = time.monotonic()
    status = launch(["probe"], num_processes=2, devices_per_process=1, out=out, timeout=90,
                    program=[sys.executable, "-c", script])
    assert status == 0 and time.monotonic() - t0 < 60, out.getvalue()
    assert "[p0] got SIGTERM" in out.getvalue() and "[p1] got SIGTERM" in out.getvalue()


# ----------------------------------------------------------------------------- training on 2 hosts


@pytest.mark.slow
def test_two_processes_give_the_losses_of_one(config_file, one_process, compile_cache, tmp_path):
    res = run_launcher(config_file, tmp_path, compile_cache, "--set", "do_export=true")
    assert res.returncode == 0, res.stdout[-5000:]
    out = res.stdout
    assert "[p0] mesh {'data': 8, 'fsdp': 1, 'tensor': 1} | 8 devices, 4 on each of 2 host(s)" in out
    assert "[p1] mesh" not in out  # process 1 computes, process 0 reports
    losses = step_losses(tmp_path)  # also: every step logged once
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert_close(losses, one_process, range(1, STEPS + 1))
    results = json.loads((tmp_path / "results.json").read_text())
    assert (results["processes"], results["devices"], results["steps"]) == (2, 8, STEPS)
    assert (tmp_path / "export" / "model.safetensors").is_file()  # gathered, written by process 0
    assert written_by_both_processes(tmp_path / "checkpoints" / "latest" / str(STEPS))


@pytest.mark.slow
def test_sigterm_to_one_process_saves_the_same_step_on_both_and_resumes(config_file, one_process, compile_cache, tmp_path):
    proc = subprocess.Popen(launch_args(config_file, tmp_path), env=launch_env(compile_cache), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        metrics, deadline = tmp_path / "metrics.jsonl", time.monotonic() + RUN_TIMEOUT_S
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
            assert proc.poll() is None, proc.stdout.read()[-5000:]
            assert time.monotonic() < deadline, "the 2-process run did not reach step 2"
            time.sleep(0.05)
        second = json.loads((tmp_path / "launch_pids.json").read_text())["p1"]
        os.kill(second, signal.SIGTERM)  # one host is preempted; process 0 hears nothing
        out, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out[-5000:]  # both processes exited cleanly
    saved = [int(p.name) for p in (tmp_path / "checkpoints" / "latest").iterdir() if p.name.isdigit()]
    assert len(saved) == 1 and 2 <= saved[0] < STEPS, (saved, out[-3000:])
    stop = saved[0]
    print(f"process 1 was signalled after step 2 was logged; both processes saved step {stop}")
    assert f"[p0] preempted: saved step {stop} in" in out
    step_dir = tmp_path / "checkpoints" / "latest" / str(stop)
    assert (step_dir / "commit_success.txt").is_file() and written_by_both_processes(step_dir)
    assert max(step_losses(tmp_path)) == stop  # process 0 stopped at the step it saved

    res = run_launcher(config_file, tmp_path, compile_cache)
    assert res.returncode == 0, res.stdout[-5000:]
    assert f"resumed from step {stop} (" in res.stdout
    losses = step_losses(tmp_path)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert_close(losses, one_process, range(1, STEPS + 1))


@pytest.mark.slow
def test_sigkill_of_one_process_stops_the_other_in_bounded_time_and_the_rerun_resumes(
        config_file, one_process, compile_cache, tmp_path):
    """A host dies (SIGKILL to process 1): process 0 notices within host_heartbeat_timeout_s, says
    which process was lost and where the run can resume, and exits; the launcher names the dead
    child and its signal; rerunning the same command resumes with the losses of an unbroken run."""
    heartbeat_s = 5
    overrides = ("--set", "save_steps=2", "--set", f"host_heartbeat_timeout_s={heartbeat_s}")
    proc = subprocess.Popen(launch_args(config_file, tmp_path, *overrides, launcher=("--grace", "60")),
                            env=launch_env(compile_cache), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        first_save, deadline = tmp_path / "checkpoints" / "latest" / "2", time.monotonic() + RUN_TIMEOUT_S
        while not first_save.is_dir():  # complete (orbax renames a step folder only when it is)
            assert proc.poll() is None, proc.stdout.read()[-5000:]
            assert time.monotonic() < deadline, "the 2-process run did not save step 2"
            time.sleep(0.05)
        second = json.loads((tmp_path / "launch_pids.json").read_text())["p1"]
        os.kill(second, signal.SIGKILL)
        killed = time.monotonic()
        out, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
        detected_s = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    print(f"SIGKILL to process 1 -> launcher exit in {detected_s:.1f} s (host_heartbeat_timeout_s={heartbeat_s})")
    assert proc.returncode == 128 + signal.SIGKILL, out[-5000:]  # the first failure's status
    # The bound: the timeout, one check interval, and the exit; far below the launcher's grace.
    assert heartbeat_s <= detected_s < heartbeat_s + 25, (detected_s, out[-3000:])
    assert f"[launch] process 1 (pid {second}) was killed by SIGKILL" in out
    lost = [line for line in out.splitlines() if "lost process 1 of 2" in line]
    assert lost and lost[0].startswith("[p0] error: process 0: lost process 1 of 2: no heartbeat for "), out[-3000:]
    saved = max(int(p.name) for p in (tmp_path / "checkpoints" / "latest").iterdir() if p.name.isdigit())
    assert f"The last complete checkpoint is step {saved} in {tmp_path / 'checkpoints' / 'latest'}; rerun" in lost[0]
    assert "[launch] process 0 (pid" in out and "exited with status 75" in out  # it stopped by itself

    res = run_launcher(config_file, tmp_path, compile_cache, *overrides)
    assert res.returncode == 0, res.stdout[-5000:]
    assert f"resumed from step {saved} (" in res.stdout
    losses = step_losses(tmp_path)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert_close(losses, one_process, range(1, STEPS + 1))


@pytest.mark.slow
def test_the_ring_loss_across_two_hosts_gives_the_dense_losses_of_one(config, config_file, compile_cache, tmp_path):
    """Key blocks travel around a ring that crosses the process boundary (ppermute over gloo), with
    gradient caching on: the 2-process ring run logs the losses of a 1-process dense run with the
    same chunks (chunking changes the dropout masks, so the reference caches gradients too)."""
    dense = tmp_path / "dense_one_process"
    assert train(config.replace(grad_cache_chunk_size=8), dense, progress=False)["status"] == "completed"
    overrides = ("--set", "contrastive_impl=ring", "--set", "contrastive_block_size=1", "--set", "grad_cache_chunk_size=8")
    ring = tmp_path / "ring_two_processes"
    res = run_launcher(config_file, ring, compile_cache, *overrides)
    assert res.returncode == 0, res.stdout[-5000:]
    assert json.loads((ring / "config.json").read_text())["contrastive_impl"] == "ring"
    losses = step_losses(ring)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert_close(losses, step_losses(dense), range(1, STEPS + 1))
