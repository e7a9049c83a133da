"""Metrics out: <workdir>/metrics.jsonl, TensorBoard event files, and the console.

metrics.jsonl holds one JSON object per line: {"step": int, "<group>/<name>": float, ...},
e.g. "train/loss", "train/bits_per_byte", "eval/loss", "train/lr". Keys are stable;
readers should ignore keys they do not know. Only process 0 writes.
"""

import json
import pathlib
import sys
import time

from absl import logging


class MetricsWriter:
  """Appends metrics to metrics.jsonl and TensorBoard; logs a line or a progress bar."""

  def __init__(self, workdir: str, total_steps: int, enabled: bool = True):
    self._enabled = enabled
    self._bar = None
    if not enabled:
      return
    path = pathlib.Path(workdir)
    path.mkdir(parents=True, exist_ok=True)
    self._jsonl = open(path / "metrics.jsonl", "a", encoding="utf-8")
    from tensorboardX import SummaryWriter  # no TensorFlow needed
    self._tb = SummaryWriter(str(path / "tensorboard"))
    if sys.stderr.isatty():
      from tqdm import tqdm
      self._bar = tqdm(total=total_steps, unit="step", dynamic_ncols=True)

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not self._enabled:
      return
    record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    for name, value in record.items():
      if name != "step":
        self._tb.add_scalar(name, value, step)
    self._tb.flush()
    summary = ", ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "step")
    if self._bar is not None:
      self._bar.set_postfix_str(summary, refresh=False)
    else:
      logging.info("step %d: %s", step, summary)

  def advance(self, step: int) -> None:
    """Move the progress bar to `step` (no-op without a terminal)."""
    if self._bar is not None:
      self._bar.n = step
      self._bar.refresh()

  def close(self) -> None:
    if self._enabled:
      self._jsonl.close()
      self._tb.close()
      if self._bar is not None:
        self._bar.close()


class StepTimer:
  """Wall time per step between two logging points."""

  def __init__(self):
    self._last, self._steps = time.perf_counter(), 0

  def tick(self) -> None:
    self._steps += 1

  def lap(self) -> float:
    now = time.perf_counter()
    per_step = (now - self._last) / max(self._steps, 1)
    self._last, self._steps = now, 0
    return per_step
