"""What a run shows and records: a progress bar, metrics as JSON lines, TensorBoard events.

Only the lead process (process 0) writes; the others keep the same calls as no-ops. On resume,
`metrics.jsonl` is cut back to the resumed step so that steps a crashed run logged after its
last checkpoint are not recorded twice.

A gs:// workdir is an object store: no append (opening for append overwrites), no rename, no
real folders. There the writer keeps every line in memory and *rewrites the whole
metrics.jsonl with one PUT* at each flush (at most every `flush_every_s` seconds on `write`,
and on `flush()` / `close()`): readers always see a complete file holding every line so far,
and a crash loses at most the lines since the last flush. One object per flush was the other
choice; it was rejected because every reader (studies/report.py, `cat`, pandas) would then have to
list and join the pieces. The file stays small (one line per `log_every` steps: ~250 bytes, so
10,000 lines are 2.5 MB per PUT). TensorBoard events are written by tensorboardX into a local
temporary folder and each event file that grew is uploaded whole at each flush (tensorboardX
file names plus a unique suffix: a resumed run adds a file and overwrites none).
A local workdir is written as before: appended line by line, events written in place.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from simcse_jax import paths

DEFAULT_FLUSH_EVERY_S = 30.0  # object-store PUTs per minute stay ~2 while a lost crash tail stays short


class MetricsLog:
    def __init__(self, workdir, *, enabled: bool = True, truncate_after: int | None = None,
                 flush_every_s: float = DEFAULT_FLUSH_EVERY_S):
        self.enabled = enabled
        self.remote = paths.is_remote(workdir)
        self.workdir = paths.as_path(workdir)
        self.path = self.workdir / "metrics.jsonl"
        self.writer = None
        self.flush_every_s = flush_every_s
        self._lines: list[str] = []  # remote: every line of the run, rewritten whole at each flush
        self._last_flush = time.monotonic()
        self._dirty = False
        self._tb_local: Path | None = None  # remote: where tensorboardX writes before each sync
        self._tb_sizes: dict[str, int] = {}
        if not enabled:
            return
        if self.remote:
            if self.path.is_file():
                self._lines = self.path.read_text().splitlines()
            if truncate_after is not None:
                self._lines = _kept(self._lines, truncate_after)
                self._dirty = True
                self.flush()
        elif truncate_after is not None and self.path.is_file():
            kept = _kept(self.path.read_text().splitlines(), truncate_after)
            self.path.write_text("".join(line + "\n" for line in kept))
        try:
            from tensorboardX import SummaryWriter
        except ImportError:  # TensorBoard events are optional; JSON lines are always written
            return
        if self.remote:
            self._tb_local = Path(tempfile.mkdtemp(prefix="simcse_tensorboard_"))
            # tensorboardX names a file by the second and host only; the suffix keeps a restart within
            # the same second from replacing the previous run's events in the bucket.
            self.writer = SummaryWriter(str(self._tb_local), filename_suffix=f".{self._tb_local.name}")
        else:
            self.writer = SummaryWriter(str(self.workdir / "tensorboard"))

    def write(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "time": round(time.time(), 3), **{k: float(v) for k, v in values.items()}}
        line = json.dumps(record)
        if self.remote:
            self._lines.append(line)
            self._dirty = True
        else:
            with self.path.open("a") as f:
                f.write(line + "\n")
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k if "/" in k else f"train/{k}", float(v), int(step))
        if self.remote and time.monotonic() - self._last_flush >= self.flush_every_s:
            self.flush()

    @property
    def records(self) -> list[dict]:
        """Every line of the run so far (also the resumed part), parsed; the lead process only."""
        lines = self._lines if self.remote else (self.path.read_text().splitlines() if self.path.is_file() else [])
        return [json.loads(line) for line in lines if line.strip()]

    def flush(self) -> None:
        """Local: TensorBoard events to disk. gs://: metrics.jsonl rewritten whole and grown event files uploaded."""
        if not self.enabled:
            return
        if self.writer is not None:
            self.writer.flush()
        if not self.remote:
            return
        if self._dirty:
            paths.write_text_atomic(self.path, "".join(line + "\n" for line in self._lines))
            self._dirty = False
        if self._tb_local is not None:
            for f in sorted(p for p in self._tb_local.rglob("*") if p.is_file()):
                rel = f.relative_to(self._tb_local).as_posix()
                size = f.stat().st_size
                if self._tb_sizes.get(rel) != size:
                    paths.upload_file(f, f"{self.workdir}/tensorboard/{rel}")
                    self._tb_sizes[rel] = size
        self._last_flush = time.monotonic()

    def message(self, text: str) -> None:
        if self.enabled:
            print(text, file=sys.stderr, flush=True)

    def progress(self, total: int, initial: int, sentences_per_step: int) -> Progress | None:
        return Progress(total, initial, sentences_per_step) if self.enabled else None

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()  # flushes the events; the flush below uploads them (gs://)
            self.writer = None
        self.flush()
        if self._tb_local is not None:
            shutil.rmtree(self._tb_local, ignore_errors=True)
            self._tb_local = None


def _kept(lines: list[str], truncate_after: int) -> list[str]:
    return [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= truncate_after]


class Progress:
    """tqdm bar: steps/s and ETA from tqdm; loss, accuracy and sentences/s in the postfix.

    `advance()` moves the bar at every step (host only); `show(meas)` updates the figures when the
    trainer has fetched them (log steps), so the bar never makes the host wait for the devices.
    """

    def __init__(self, total: int, initial: int, sentences_per_step: int):
        from tqdm.auto import tqdm

        self.sentences_per_step = sentences_per_step
        self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True)

    def advance(self) -> None:
        self.bar.update(1)

    def show(self, meas: dict) -> None:
        post = {"loss": f"{meas['loss']:.4f}", "acc": f"{meas['accuracy']:.3f}", "lr": f"{meas['learning_rate']:.2e}"}
        rate = self.bar.format_dict.get("rate")
        if rate:
            post["sent/s"] = f"{rate * self.sentences_per_step:.1f}"
        self.bar.set_postfix(post, refresh=False)

    def close(self) -> None:
        self.bar.close()
