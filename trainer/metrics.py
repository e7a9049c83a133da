"""Metrics out: <workdir>/metrics.jsonl, TensorBoard event files, and the console.

metrics.jsonl holds one JSON object per line: {"step": int, "<group>/<name>": float, ...},
e.g. "train/loss", "train/bits_per_byte", "eval/loss", "train/lr". Keys are stable;
readers should ignore keys they do not know. Only process 0 writes. "train/loss" is the
mean over the steps since the previous log line, the other train/ values the logged
step's own. A run that starts at step S (a resume) first drops the records past S, so
each step is in the file once.
"""

import json
import os
import pathlib
import sys
import time

from absl import logging


def drop_records_after(path: pathlib.Path, step: int) -> None:
  """Keep the records of metrics.jsonl up to `step`; a resumed run writes the rest again.

  The kept lines go to a temporary file that replaces the old one in one rename, so a
  kill leaves either file whole. A line that does not parse (cut short by a kill) goes.
  """
  if not path.exists():
    return
  text = path.read_text(encoding="utf-8")
  kept = []
  for line in text.splitlines():
    try:
      if json.loads(line)["step"] <= step:
        kept.append(line + "\n")
    except (json.JSONDecodeError, KeyError, TypeError):
      continue
  if "".join(kept) != text:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text("".join(kept), encoding="utf-8")
    os.replace(temporary, path)


class MetricsWriter:
  """Appends metrics to metrics.jsonl and TensorBoard; logs a line or a progress bar."""

  def __init__(self, workdir: str, total_steps: int, start_step: int = 0,
               enabled: bool = True):
    """`start_step`: the step the run starts from (records past it are dropped)."""
    self._enabled = enabled
    self._bar = None
    if not enabled:
      return
    path = pathlib.Path(workdir)
    path.mkdir(parents=True, exist_ok=True)
    drop_records_after(path / "metrics.jsonl", start_step)
    self._jsonl = open(path / "metrics.jsonl", "a", encoding="utf-8")
    from tensorboardX import SummaryWriter  # no TensorFlow needed
    # TensorBoard hides the events of earlier runs from this step on, as the jsonl drops them.
    self._tb = SummaryWriter(str(path / "tensorboard"), purge_step=start_step + 1)
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


class MeanSinceLog:
  """Per-step metrics summed on the device between log lines and read as means at log
  time: one small device add per step, and the host waits for nothing until then."""

  def __init__(self, names=("train/loss",)):
    self._names = names
    self._sums, self._count = None, 0

  def add(self, metrics) -> None:
    values = {name: metrics[name] for name in self._names}
    self._sums = values if self._sums is None else {
        name: self._sums[name] + values[name] for name in self._names}
    self._count += 1

  def pop(self) -> dict[str, float]:
    """The means since the last pop, and a fresh start."""
    means = {name: float(total) / self._count for name, total in self._sums.items()}
    self._sums, self._count = None, 0
    return means


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
