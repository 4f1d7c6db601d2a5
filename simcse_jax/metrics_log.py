"""What a run shows and records: a progress bar, metrics as JSON lines, TensorBoard events.

Only the lead process (process 0) writes; the others keep the same calls as no-ops. On resume,
`metrics.jsonl` is cut back to the resumed step so that steps a crashed run logged after its
last checkpoint are not recorded twice.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


class MetricsLog:
    def __init__(self, workdir: Path, *, enabled: bool = True, truncate_after: int | None = None):
        self.enabled = enabled
        self.path = Path(workdir) / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        if truncate_after is not None and self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= truncate_after]
            self.path.write_text("".join(line + "\n" for line in kept))
        try:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(str(Path(workdir) / "tensorboard"))
        except ImportError:  # TensorBoard events are optional; JSON lines are always written
            self.writer = None

    def write(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), "time": round(time.time(), 3), **{k: float(v) for k, v in values.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k if "/" in k else f"train/{k}", float(v), int(step))

    def message(self, text: str) -> None:
        if self.enabled:
            print(text, file=sys.stderr, flush=True)

    def progress(self, total: int, initial: int, sentences_per_step: int) -> Progress | None:
        return Progress(total, initial, sentences_per_step) if self.enabled else None

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


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
