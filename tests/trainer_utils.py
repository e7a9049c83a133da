"""Shared helpers for trainer tests: a tiny config and metrics reading."""

import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent


def tiny_config(**train):
  """configs/cpu_lm.py shrunk to compile and run in seconds."""
  from configs import cpu_lm
  config = cpu_lm.get_config()
  config.model.update(dict(d_model=32, num_layers=2, num_heads=2, mlp_dim=64, max_seq_len=32,
                           scan_layers=True))  # the scanned path, as on accelerators
  config.data.update(dict(seq_len=32, eval_batches=2))
  config.train.update(dict(steps=40, global_batch_size=8, log_every=10, eval_every=40))
  config.train.update(train)
  config.optimizer.update(dict(learning_rate=3e-2, warmup_steps=5))
  config.checkpoint.update(dict(save_every=10, async_save=True))
  return config


def read_metrics(workdir) -> list[dict]:
  path = pathlib.Path(workdir) / "metrics.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines()]


def losses_by_step(workdir) -> dict[int, float]:
  return {m["step"]: m["train/loss"] for m in read_metrics(workdir) if "train/loss" in m}


def trainer_command(workdir, *overrides) -> list[str]:
  """Command line for the tiny config, as a user would type it."""
  flags = [f"--config.{k}" for k in (
      "model.d_model=32", "model.num_layers=2", "model.num_heads=2", "model.mlp_dim=64",
      "model.max_seq_len=32", "model.scan_layers=True", "data.seq_len=32", "data.eval_batches=2",
      "train.global_batch_size=8", "train.eval_every=0", "optimizer.warmup_steps=5")]
  return [sys.executable, "-m", "trainer.main", "--config", str(REPO / "configs/cpu_lm.py"),
          "--workdir", str(workdir), *flags, *[f"--config.{o}" for o in overrides]]


def trainer_env() -> dict[str, str]:
  """The test environment (compilation cache included) with one CPU device, and the
  checkout on the path (the trainer is not installed), so it runs from any directory."""
  return {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1 "
          "--xla_cpu_enable_concurrency_optimized_scheduler=false",
          "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def run_trainer(workdir, *overrides, timeout=600) -> subprocess.CompletedProcess:
  return subprocess.run(trainer_command(workdir, *overrides), cwd=REPO, env=trainer_env(),
                        capture_output=True, text=True, timeout=timeout)
