"""Training progress and metrics: a tqdm bar, ``metrics.jsonl`` and TensorBoard.

Only the main process (``jax.process_index() == 0``) writes; the others get a
writer that does nothing, so the loop never branches on the process.
"""
from __future__ import annotations

import json
import os
import time
from typing import Mapping

from tqdm.auto import tqdm


class MetricWriter:
    """Writes one JSON line and one TensorBoard scalar per metric per logged step.

    Args:
      workdir: metrics go to ``workdir/metrics.jsonl`` and ``workdir/tensorboard/``.
      total_steps: the run's last step (for the progress bar).
      initial_step: the step the run starts (or resumes) from.
      enabled: False on non-main processes.
      progress: show the tqdm bar.
    """

    def __init__(self, workdir: str, total_steps: int, initial_step: int = 0,
                 enabled: bool = True, progress: bool = True):
        self.enabled = enabled
        self._tb = None
        self._bar = None
        self._last = (time.perf_counter(), initial_step)
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._jsonl_path = os.path.join(workdir, "metrics.jsonl")
        from tensorboardX import SummaryWriter  # lazy: heavy import

        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        if progress:
            self._bar = tqdm(total=total_steps, initial=initial_step, desc="train", dynamic_ncols=True)

    def write(self, step: int, metrics: Mapping[str, float]) -> dict[str, float]:
        """Log ``metrics`` at ``step`` (after that step ran); adds ``steps_per_s``."""
        now = time.perf_counter()
        then, last_step = self._last
        self._last = (now, step)
        record = {k: float(v) for k, v in metrics.items()}
        if step > last_step and now > then:
            record["steps_per_s"] = (step - last_step) / (now - then)
        if not self.enabled:
            return record
        # One write() of one line on an O_APPEND file: a reader never sees half a record.
        line = json.dumps({"step": step, **record}) + "\n"
        with open(self._jsonl_path, "a", encoding="utf-8") as f:
            f.write(line)
        for key, value in record.items():
            self._tb.add_scalar(key, value, step)
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix({k: f"{record[k]:.4g}" for k in ("loss", "steps_per_s") if k in record})
        return record

    def message(self, text: str) -> None:
        """Print a line without breaking the progress bar."""
        if self.enabled:
            (self._bar.write if self._bar is not None else print)(text)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
    """The records of ``workdir/metrics.jsonl`` (for tests and reports)."""
    path = os.path.join(workdir, "metrics.jsonl")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
