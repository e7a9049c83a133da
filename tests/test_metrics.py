"""metrics.jsonl format, resumes, TensorBoard files, the progress bar and the plot script."""

import importlib.util
import json
import logging as logging_std
import math
import re
import struct
import subprocess
import sys
import threading

import jax.numpy as jnp
import pytest
from absl import logging
from tensorboardX.proto.event_pb2 import Event, SessionLog
from tqdm import tqdm

from trainer import metrics, paths
from trainer.metrics import (PROGRESS_FORMAT, MeanSinceLog, MetricsWriter, StepTimer,
                             format_eta, progress_postfix)
from trainer_utils import REPO


def test_metrics_jsonl_tensorboard_and_plot(tmp_path):
  for run, scale in (("a", 1.0), ("b", 2.0)):
    writer = MetricsWriter(str(tmp_path / run), total_steps=3)
    for step in (1, 2, 3):
      writer.write(step, {"train/loss": scale / step})
    writer.write(3, {"eval/loss": scale})
    writer.close()
  lines = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
  assert json.loads(lines[0]) == {"step": 1, "train/loss": 1.0}
  assert json.loads(lines[-1]) == {"step": 3, "eval/loss": 1.0}
  assert list((tmp_path / "a" / "tensorboard").glob("events.out.tfevents.*"))
  output = tmp_path / "curves.png"
  subprocess.run([sys.executable, "scripts/plot_metrics.py", str(tmp_path / "a"),
                  str(tmp_path / "b"), "-o", str(output)], cwd=REPO, check=True)
  assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _tensorboard_events(directory) -> list[Event]:
  """Every event in a directory's TensorBoard files, read back from their TFRecord
  framing (length, its CRC, the serialized Event, its CRC)."""
  events = []
  for path in directory.glob("events.out.tfevents.*"):
    data, i = path.read_bytes(), 0
    while i < len(data):
      (length,) = struct.unpack("<Q", data[i:i + 8])
      events.append(Event.FromString(data[i + 12:i + 12 + length]))
      i += 12 + length + 4
  return events


def test_tensorboard_files_hold_every_run_and_hide_what_a_resume_redoes(tmp_path):
  threads = threading.active_count()
  writer = MetricsWriter(str(tmp_path), total_steps=3)
  for step in (1, 2, 3):
    writer.write(step, {"train/loss": 10.0 + step})
  assert threading.active_count() == threads  # written in this thread: nothing to shut down
  writer.close()
  # Resumed from step 2 at once (the same second: both files must survive).
  writer = MetricsWriter(str(tmp_path), total_steps=3, start_step=2)
  writer.write(3, {"train/loss": 23.0})
  writer.close()
  events = _tensorboard_events(tmp_path / "tensorboard")
  scalars = sorted((e.step, v.tag, v.simple_value) for e in events for v in e.summary.value)
  assert scalars == [(1, "train/loss", 11.0), (2, "train/loss", 12.0),
                     (3, "train/loss", 13.0), (3, "train/loss", 23.0)]
  # TensorBoard drops the earlier events from a restart's START step on.
  starts = sorted(e.step for e in events if e.session_log.status == SessionLog.START)
  assert starts == [1, 3]


def _plot_script():
  spec = importlib.util.spec_from_file_location("plot_metrics", REPO / "scripts" / "plot_metrics.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_a_resumed_run_writes_each_step_once(tmp_path):
  writer = MetricsWriter(str(tmp_path), total_steps=6)
  for step in range(1, 7):
    writer.write(step, {"train/loss": 10.0 + step})
  writer.close()
  with open(tmp_path / "metrics.jsonl", "a", encoding="utf-8") as f:
    f.write('{"step": 7, "train/lo')  # a line cut short by a kill
  # The run resumes from a checkpoint at step 4 and redoes steps 5 and 6.
  writer = MetricsWriter(str(tmp_path), total_steps=6, start_step=4)
  for step in (5, 6):
    writer.write(step, {"train/loss": 20.0 + step})
  writer.close()
  records = [json.loads(line) for line in
             (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
  assert [r["train/loss"] for r in records] == [11.0, 12.0, 13.0, 14.0, 25.0, 26.0]
  assert not list(tmp_path.glob("*.tmp"))


def test_a_remote_workdir_gets_every_record_as_it_is_written(tmp_path, monkeypatch):
  """gs:// paths (through etils.epath, here onto a local "bucket"): metrics.jsonl and
  the TensorBoard file arrive after each write, a resume drops the records past its
  start there too, and nothing lands on the local disk under the URL's name."""
  from etils import epath
  bucket, cwd = tmp_path / "bucket", tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  monkeypatch.setattr(epath, "Path", lambda url: bucket / str(url).split("://", 1)[1])
  remote = bucket / "b" / "run"
  steps = lambda: [(r["step"], r["train/loss"]) for r in map(
      json.loads, (remote / "metrics.jsonl").read_text().splitlines())]

  writer = MetricsWriter("gs://b/run", total_steps=3, progress_bar=False)
  for step in (1, 2):
    writer.write(step, {"train/loss": 10.0 + step})
  assert steps() == [(1, 11.0), (2, 12.0)]  # before close: a killed run keeps them
  assert [e.step for e in _tensorboard_events(remote / "tensorboard")
          if e.summary.value] == [1, 2]
  writer.close()
  writer = MetricsWriter("gs://b/run", total_steps=3, start_step=1, progress_bar=False)
  writer.write(2, {"train/loss": 22.0})
  writer.close()
  assert steps() == [(1, 11.0), (2, 22.0)]
  assert len(list((remote / "tensorboard").iterdir())) == 2  # one file per run
  assert not list(cwd.iterdir())


def test_step_time_leaves_out_evaluations(monkeypatch):
  clock = [100.0]
  monkeypatch.setattr(metrics.time, "perf_counter", lambda: clock[0])
  timer = StepTimer()
  for _ in range(4):
    clock[0] += 0.5  # a step
    timer.tick()
    if _ == 1:
      with timer.paused():
        clock[0] += 30.0  # an evaluation between steps
  assert timer.lap() == 0.5
  clock[0] += 2.0
  timer.tick()
  assert timer.lap() == 2.0  # the next lap starts where this one ended
  assert timer.lap() is None  # no step since
  clock[0] += 9.0  # a first step that compiles
  timer.restart()
  clock[0] += 0.5
  timer.tick()
  assert timer.lap() == 0.5


def test_plot_reads_records_in_step_order_last_one_winning(tmp_path):
  records = [(1, 5.0), (2, 4.0), (3, 3.0), (2, 4.5), (3, 3.5), (4, 2.0)]
  (tmp_path / "metrics.jsonl").write_text("".join(
      json.dumps({"step": s, "train/loss": v}) + "\n" for s, v in records) +
      json.dumps({"step": 5, "eval/loss": 1.0}) + "\n")
  steps, values = _plot_script().read_series(str(tmp_path), "train/loss")
  assert steps == [1, 2, 3, 4] and values == [5.0, 4.5, 3.5, 2.0]


def test_mean_since_log_averages_on_device_and_restarts():
  means = MeanSinceLog(("train/loss",))
  for loss in (1.0, 2.0, 6.0):
    means.add({"train/loss": jnp.float32(loss), "train/grad_norm": jnp.float32(0.0)})
  assert means.pop() == {"train/loss": 3.0}
  means.add({"train/loss": jnp.float32(5.0)})
  assert means.pop() == {"train/loss": 5.0}


@pytest.mark.parametrize("steps", [600, 1_000_000])
def test_progress_line_fits_80_columns(steps):
  widest = max(
      len(tqdm.format_meter(n, steps, 10.0, bar_format=PROGRESS_FORMAT, eta=format_eta(eta),
                            postfix=progress_postfix({"train/loss": loss,
                                                      "train/tokens_per_sec": rate})))
      for n in (0, 1, steps // 3, steps)
      for eta in (None, 0.0, 59.0, 99 * 3600.0, 40 * 86400.0, 1e12)
      for loss in (5.5451, 12.345, 12345.6, 1.2345e-4, float("nan"))
      for rate in (0.5, 12345.0, 9.99e8, 1e12))
  assert widest <= 80


def test_progress_bar_keeps_eval_lines_and_warnings_out_of_its_line(tmp_path, capsys):
  root = logging_std.getLogger()
  console = logging_std.StreamHandler(sys.stderr)  # as absl's handler is under app.run
  root.addHandler(console)
  try:
    writer = MetricsWriter(str(tmp_path), total_steps=10, progress_bar=True)
    writer.advance(1)
    writer.write(1, {"train/loss": 2.5, "train/tokens_per_sec": 1e4})
    logging.warning("a library warning")
    writer.write(1, {"eval/loss": 2.75})
    writer.advance(2)
    writer.close()
  finally:
    root.removeHandler(console)
  assert console not in root.handlers  # close() put it back, and we took it out
  # tqdm redraws its line after \r; a printed line ends with \n.
  pieces = re.split(r"[\r\n]", capsys.readouterr().err)
  bars = [p for p in pieces if "%|" in p]
  assert bars and all(len(p) <= 80 for p in bars)
  assert any("loss 2.5, 10.0k tok/s" in p for p in bars)
  assert not any("warning" in p or "eval/loss" in p for p in bars)
  assert "a library warning" in pieces and "step 1: eval/loss=2.75" in pieces


def test_write_whole_leaves_the_old_file_when_the_new_one_cannot_be_written(tmp_path):
  """As on a full disk: the write of the replacement fails, the old file is untouched."""
  path = tmp_path / "config.json"
  path.write_text("old")
  (tmp_path / "config.json.tmp").mkdir()  # the replacement's write fails
  with pytest.raises(OSError):
    paths.write_whole(path, "new")
  assert path.read_text() == "old"
  (tmp_path / "config.json.tmp").rmdir()
  paths.write_whole(path, "new")
  assert path.read_text() == "new" and not (tmp_path / "config.json.tmp").exists()
  written = path.stat().st_ino  # a rewrite would rename a new file over it
  paths.write_whole(path, "new")  # unchanged: not written again (a remote copy costs)
  assert path.stat().st_ino == written


def test_a_non_finite_value_is_written_as_null_and_plotted_as_a_gap(tmp_path):
  writer = MetricsWriter(str(tmp_path), total_steps=3, progress_bar=False)
  writer.write(1, {"train/loss": 2.5})
  writer.write(2, {"train/loss": float("nan"), "train/grad_norm": float("inf")})
  writer.close()

  def strict(constant):  # what json.loads accepts for NaN / Infinity, which strict readers reject
    raise ValueError(constant)
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  records = [json.loads(line, parse_constant=strict) for line in lines]
  assert records[1] == {"step": 2, "train/loss": None, "train/grad_norm": None}
  steps, values = _plot_script().read_series(str(tmp_path), "train/loss")
  assert steps == [1, 2] and values[0] == 2.5 and math.isnan(values[1])
