"""metrics.jsonl format, TensorBoard files, and the plotting script."""

import json
import subprocess
import sys

import jax.numpy as jnp

from trainer.metrics import MeanSinceLog, MetricsWriter
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


def test_mean_since_log_averages_on_device_and_restarts():
  means = MeanSinceLog(("train/loss",))
  for loss in (1.0, 2.0, 6.0):
    means.add({"train/loss": jnp.float32(loss), "train/grad_norm": jnp.float32(0.0)})
  assert means.pop() == {"train/loss": 3.0}
  means.add({"train/loss": jnp.float32(5.0)})
  assert means.pop() == {"train/loss": 5.0}
