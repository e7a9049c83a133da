"""Metrics out: <workdir>/metrics.jsonl, TensorBoard event files, and the console.

metrics.jsonl holds one JSON object per line: {"step": int, "<group>/<name>": float, ...},
e.g. "train/loss", "train/bits_per_byte", "eval/loss", "train/lr"; a non-finite value is
null (strict JSON). Keys are stable; readers should ignore keys they do not know. Only
process 0 writes. "train/loss" is the mean over the steps since the previous log line
(the first line after a resume: since the resume), the other train/ values the logged
step's own. A run that starts at step S (a resume) first drops the records past S, so
each step is in the file once.

A remote workdir (gs://...) cannot be appended to: its files are written in a local
temporary directory and copied up whole after each write.
"""

import contextlib
import json
import logging as logging_std
import math
import pathlib
import shutil
import sys
import tempfile
import time
import uuid
from typing import Optional

from absl import logging
from etils import epath
from tensorboardX.event_file_writer import EventsWriter  # no TensorFlow needed
from tensorboardX.proto.event_pb2 import Event, SessionLog
from tensorboardX.summary import scalar
from tqdm import tqdm

from trainer import paths

# Fixed-width fields, so the bar keeps its width and the line fits 80 columns.
PROGRESS_FORMAT = "{percentage:3.0f}%|{bar:14}| {n_fmt}/{total_fmt} [eta {eta}{postfix}]"


def format_eta(seconds: float | None) -> str:
  """At most 8 columns: H:MM:SS below 100 hours, then days (a first step that compiles
  for a minute can make a long run's first estimate years)."""
  if seconds is None:
    return "?"
  if seconds < 100 * 3600:
    return tqdm.format_interval(seconds)
  days = seconds / 86400
  return f"{days:.0f}d" if days < 1000 else ">999d"


def progress_postfix(metrics: dict[str, float]) -> str:
  """The numbers the progress bar shows after its ETA: the loss and tokens/s."""
  parts = []
  if "train/loss" in metrics:
    parts.append(f"loss {metrics['train/loss']:.4g}")
  if "train/tokens_per_sec" in metrics:
    parts.append(f"{tqdm.format_sizeof(metrics['train/tokens_per_sec'])} tok/s")
  return ", ".join(parts)


class _ProgressBar(tqdm):
  """tqdm with the compact {eta} of format_eta."""

  @property
  def format_dict(self):
    values = super().format_dict
    done, elapsed = values["n"] - values["initial"], values["elapsed"]
    # tqdm's own rule: the smoothed rate when it has one, else the average since start.
    rate = values["rate"] or (done / elapsed if done and elapsed else None)
    values["eta"] = format_eta((values["total"] - values["n"]) / rate if rate else None)
    return values


def drop_records_after(path: pathlib.Path, step: int) -> None:
  """Keep the records of metrics.jsonl up to `step`; a resumed run writes the rest again.

  The kept lines replace the file in one rename (a kill leaves either file whole); a
  line that does not parse (cut short by a kill) goes.
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
  paths.write_whole(path, "".join(kept))


def _writes_to_console(handler: logging_std.Handler) -> bool:
  inner = getattr(handler, "python_handler", handler)  # absl's handler wraps a stream one
  return (isinstance(inner, logging_std.StreamHandler) and
          inner.stream in (sys.stderr, sys.stdout))


class _LogAboveTheBar(logging_std.Handler):
  """Stands in for a console log handler while the bar shows: formats and filters a
  record as that handler does, and prints it with tqdm.write, which clears the bar,
  prints the line and draws the bar again below it."""

  def __init__(self, console: logging_std.Handler):
    super().__init__(console.level)
    self.console = console
    self.filters = console.filters

  def emit(self, record: logging_std.LogRecord) -> None:
    tqdm.write(self.console.format(record), file=sys.stderr)


class EventFile:
  """A TensorBoard event file, written and flushed in the caller's thread.

  tensorboardX's SummaryWriter hands events to a thread through a multiprocessing
  queue; when a run stops on an error, that queue's shutdown could print a traceback
  after the run's own last line. The trainer writes a few scalars per log line, so
  plain synchronous writes cost nothing.
  """

  def __init__(self, directory: pathlib.Path, purge_step: int):
    """`purge_step`: TensorBoard hides the events of earlier runs in this directory from
    this step on (a resumed run redoes them), as metrics.jsonl drops its records."""
    directory.mkdir(parents=True, exist_ok=True)
    # The file's name holds the time in whole seconds; the suffix keeps a restart within
    # the same second from overwriting the previous run's file.
    self._events = EventsWriter(str(directory / "events"), f".{uuid.uuid4().hex[:8]}")
    self._events.write_event(Event(wall_time=time.time(), step=purge_step,
                                   session_log=SessionLog(status=SessionLog.START)))
    self._events.flush()

  def write_scalars(self, step: int, values: dict[str, float]) -> None:
    for name, value in values.items():
      self._events.write_event(Event(wall_time=time.time(), step=step,
                                     summary=scalar(name, value)))
    self._events.flush()

  def close(self) -> None:
    self._events.close()


class MetricsWriter:
  """Appends metrics to metrics.jsonl and TensorBoard; logs a line or a progress bar."""

  def __init__(self, workdir: str, total_steps: int, start_step: int = 0,
               enabled: bool = True, progress_bar: bool | None = None):
    """`start_step`: the step the run starts from (records past it are dropped);
    `progress_bar`: None shows one when stderr is a terminal."""
    self._enabled = enabled
    self._bar = None
    self._latest = {}  # the newest value of each metric, for the bar's postfix
    self._log_handlers = []  # the ones standing in for console handlers
    if not enabled:
      return
    self._remote = epath.Path(workdir) if "://" in str(workdir) else None
    path = (pathlib.Path(tempfile.mkdtemp(prefix="metrics_")) if self._remote else
            pathlib.Path(workdir))
    path.mkdir(parents=True, exist_ok=True)
    if self._remote and (self._remote / "metrics.jsonl").exists():
      (path / "metrics.jsonl").write_bytes((self._remote / "metrics.jsonl").read_bytes())
    drop_records_after(path / "metrics.jsonl", start_step)
    self._local = path
    self._jsonl = open(path / "metrics.jsonl", "a", encoding="utf-8")
    self._tb = EventFile(path / "tensorboard", purge_step=start_step + 1)
    self._upload()
    if progress_bar is None:
      progress_bar = sys.stderr.isatty()
    if progress_bar:
      self._bar = _ProgressBar(total=total_steps, initial=start_step, unit="step",
                               bar_format=PROGRESS_FORMAT, file=sys.stderr)
      # Library warnings (absl logging) would otherwise be written into the bar's line.
      root = logging_std.getLogger()
      for handler in [h for h in root.handlers if _writes_to_console(h)]:
        self._log_handlers.append(_LogAboveTheBar(handler))
        root.removeHandler(handler)
        root.addHandler(self._log_handlers[-1])

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not self._enabled:
      return
    record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
    # Strict JSON has no NaN or Infinity: a non-finite value (a skipped step's) is null.
    self._jsonl.write(json.dumps({k: v if math.isfinite(v) else None
                                  for k, v in record.items()}, allow_nan=False) + "\n")
    self._jsonl.flush()
    self._tb.write_scalars(step, {k: v for k, v in record.items() if k != "step"})
    self._upload()
    summary = ", ".join(f"{k}={v:.4g}" for k, v in record.items() if k != "step")
    if self._bar is None:
      logging.info("step %d: %s", step, summary)
      return
    self._latest.update(record)
    self._bar.set_postfix_str(progress_postfix(self._latest), refresh=False)
    if any(not k.startswith("train/") for k in metrics):  # evals: a line above the bar
      self._bar.write(f"step {step}: {summary}", file=sys.stderr)

  def _upload(self) -> None:
    """A remote workdir: copy this run's files up (metrics.jsonl whole, with the records
    of earlier runs it holds; this run's own TensorBoard file)."""
    if self._remote is None:
      return
    for file in sorted(self._local.rglob("*")):
      if file.is_file():
        target = self._remote / str(file.relative_to(self._local))
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(file.read_bytes())

  def advance(self, step: int) -> None:
    """Move the progress bar to `step` (no-op without a terminal)."""
    if self._bar is not None:
      self._bar.update(step - self._bar.n)

  def close(self) -> None:
    if self._enabled:
      self._jsonl.close()
      self._tb.close()
      if self._remote is not None:
        self._upload()
        shutil.rmtree(self._local, ignore_errors=True)
      if self._bar is not None:
        self._bar.close()
        root = logging_std.getLogger()
        for handler in self._log_handlers:
          root.removeHandler(handler)
          root.addHandler(handler.console)


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
  """Wall time per step between two logging points, evaluations left out."""

  def __init__(self):
    self._last, self._steps = time.perf_counter(), 0

  def tick(self) -> None:
    self._steps += 1

  @contextlib.contextmanager
  def paused(self):
    """The time spent inside (an evaluation) does not count towards the steps'."""
    start = time.perf_counter()
    try:
      yield
    finally:
      self._last += time.perf_counter() - start

  def restart(self) -> None:
    """Count from now, leaving out the steps so far (the first, which compiles)."""
    self._last, self._steps = time.perf_counter(), 0

  def lap(self) -> Optional[float]:
    """Seconds per step since the last lap; None when no step was counted."""
    if not self._steps:
      return None
    now = time.perf_counter()
    per_step = (now - self._last) / self._steps
    self._last, self._steps = now, 0
    return per_step
