"""Checkpoints: exact resume, kill -9 and SIGTERM safety, resharding, refusal of misfits."""

import json
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from trainer import checkpoint as checkpoint_lib
from trainer import main as trainer_main
from trainer_utils import (REPO, losses_by_step, read_metrics, run_trainer, tiny_config,
                           trainer_command, trainer_env)

# Preconditioner refits at random (p = 0.5) so that resuming must restore the PSGD key.
RANDOM_REFITS = ("optimizer.kron.update_prob_flat_steps=0", "optimizer.kron.update_prob_decay=10",
                 "optimizer.kron.update_prob_floor=0.5")


def committed_steps(workdir) -> list[int]:
  with ocp.CheckpointManager(pathlib.Path(workdir) / "checkpoints") as manager:
    return list(manager.all_steps())


def restore_raw_state(workdir, step: int):
  """The saved train state as numpy arrays (no target: exactly what is on disk)."""
  with ocp.CheckpointManager(pathlib.Path(workdir) / "checkpoints") as manager:
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore()))
  return restored.state


def test_exact_resume_matches_an_uninterrupted_run(tmp_path):
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  common = ("train.steps=16", "train.log_every=1", "checkpoint.save_every=4", *RANDOM_REFITS)
  for args in ((straight, *common), (resumed, *common, "train.stop_at=8"), (resumed, *common)):
    result = run_trainer(*args)
    assert result.returncode == 0, result.stderr[-3000:]
  assert "Starting at step 8" in result.stderr
  assert losses_by_step(straight) == losses_by_step(resumed)  # bitwise: same floats
  a, b = restore_raw_state(straight, 16), restore_raw_state(resumed, 16)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  num_updates = [x for p, x in jax.tree_util.tree_flatten_with_path(a)[0]
                 if "num_updates" in jax.tree_util.keystr(p)]
  assert num_updates and 2 <= int(num_updates[0]) <= 14  # refits happened, not every step


def _final_losses(workdir) -> dict[int, float]:
  """step -> logged loss; a step logged twice (re-run after a kill) must repeat exactly."""
  losses = {}
  for record in read_metrics(workdir):
    if "train/loss" in record:
      assert losses.setdefault(record["step"], record["train/loss"]) == record["train/loss"]
  return losses


@pytest.mark.slow
def test_20_kill_9s_at_random_moments_end_as_an_uninterrupted_run(tmp_path):
  rng = random.Random(0)
  args = ("train.steps=160", "train.log_every=1", "checkpoint.save_every=2", *RANDOM_REFITS)
  spawn = lambda workdir: subprocess.Popen(
      trainer_command(workdir, *args), cwd=REPO, stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE, text=True, env=trainer_env())
  straight = spawn(tmp_path / "straight")
  assert straight.wait(timeout=600) == 0, straight.stderr.read()[-2000:]
  workdir = tmp_path / "killed"
  hog = subprocess.Popen([sys.executable, "-c", "while 1: pass"])  # slow, racy saves
  try:
    for kill in range(20):
      proc = spawn(workdir)
      if kill % 4 == 3:  # anywhere in start-up (imports, restore, compile), up to the
        # first new step: a warm compilation cache starts a run in a few seconds
        logged, deadline = len(_logged_steps(workdir)), time.time() + rng.uniform(0.0, 8.0)
        while time.time() < deadline and len(_logged_steps(workdir)) == logged:
          time.sleep(0.02)
      else:  # while training: with a save every 2 steps, often mid-save
        target = len(_logged_steps(workdir)) + rng.randint(1, 3)
        deadline = time.time() + 120
        while len(_logged_steps(workdir)) < target and time.time() < deadline:
          time.sleep(0.02)
        # Up to about a step more (steps take 0.01 to 0.1 s here): counted in steps, not
        # seconds, so that 20 kills never outlast the run on a fast machine.
        time.sleep(rng.uniform(0.0, 0.1))
      proc.send_signal(signal.SIGKILL)
      stderr = proc.communicate()[1]
      assert proc.returncode == -signal.SIGKILL, stderr[-2000:]  # killed, not finished
      assert "Traceback" not in stderr, stderr[-3000:]
  finally:
    hog.kill()
  final = subprocess.run(trainer_command(workdir, *args), cwd=REPO, capture_output=True,
                         text=True, env=trainer_env(), timeout=600)
  assert final.returncode == 0, final.stderr[-2000:]
  assert committed_steps(workdir)[-1] == 160
  assert _final_losses(workdir) == _final_losses(tmp_path / "straight")  # bitwise
  a, b = restore_raw_state(tmp_path / "straight", 160), restore_raw_state(workdir, 160)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("signum, code, said", [(signal.SIGTERM, 0, "preempted (SIGTERM)"),
                                                  (signal.SIGINT, 130, "Ctrl-C")])
def test_sigterm_and_ctrl_c_save_the_current_step_and_exit(tmp_path, signum, code, said):
  proc = subprocess.Popen(trainer_command(tmp_path, "train.steps=100000", "train.log_every=1",
                                          "checkpoint.save_every=100000"),
                          cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True, env=trainer_env())
  deadline = time.time() + 120
  while len(_logged_steps(tmp_path)) < 5 and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signum)
  _, stderr = proc.communicate(timeout=120)
  assert proc.returncode == code, stderr[-2000:]
  last_logged = max(_logged_steps(tmp_path))
  assert committed_steps(tmp_path)[-1] == last_logged >= 5
  assert said in stderr and "Traceback" not in stderr


def test_save_on_8_devices_restore_on_4_and_1(tmp_path):
  meshes = {"eight": (8, (2, 2, 2)), "four": (4, (2, 1, 2)), "one": (1, (1, 1, 1))}
  config = tiny_config(steps=8, stop_at=4, log_every=1, eval_every=0)
  config.mesh.shape = meshes["eight"][1]
  trainer_main.train(config, str(tmp_path / "eight"))  # saves step 4 and stops
  for name in ("four", "one"):
    shutil.copytree(tmp_path / "eight", tmp_path / name)
  config.train.stop_at = 0
  losses = {}
  for name, (devices, shape) in meshes.items():  # each resumes step 4 on its own mesh
    config.mesh.shape = shape
    state, _ = trainer_main.train(config, str(tmp_path / name), devices=jax.devices()[:devices])
    assert len(state.params["embed"]["table"].sharding.device_set) == devices
    losses[name] = losses_by_step(tmp_path / name)
  for name in ("four", "one"):
    np.testing.assert_allclose([losses[name][s] for s in range(5, 9)],
                               [losses["eight"][s] for s in range(5, 9)], rtol=2e-4)


def test_checkpoint_of_another_model_shape_is_refused(tmp_path):
  trainer_main.train(tiny_config(steps=2, eval_every=0), str(tmp_path),
                     devices=jax.devices()[:1])
  wider = tiny_config(steps=4, eval_every=0)
  wider.model.d_model = 64
  with pytest.raises(checkpoint_lib.CheckpointMismatchError) as error:
    trainer_main.train(wider, str(tmp_path), devices=jax.devices()[:1])
  message = str(error.value)
  assert "config model.d_model: checkpoint has 32, this run has 64" in message
  assert "(320, 32)" in message and "(320, 64)" in message


def test_init_from_another_runs_params(tmp_path):
  source, _ = trainer_main.train(tiny_config(steps=3, eval_every=0), str(tmp_path / "a"),
                                 devices=jax.devices()[:1])
  config = tiny_config(steps=1, eval_every=0)
  config.optimizer.update(dict(name="adamw", learning_rate=1e-30, warmup_steps=0))
  config.checkpoint.update(dict(init_from=str(tmp_path / "a"), init_what="params"))
  tuned, _ = trainer_main.train(config, str(tmp_path / "b"), devices=jax.devices()[:1])
  for x, y in zip(jax.tree.leaves(source.params), jax.tree.leaves(tuned.params)):
    np.testing.assert_allclose(x, y, atol=1e-12)


def test_init_from_a_directory_without_checkpoints_names_the_setting(tmp_path):
  (tmp_path / "empty").mkdir()
  config = tiny_config(steps=1, eval_every=0)
  config.checkpoint.init_from = str(tmp_path / "empty")
  with pytest.raises(checkpoint_lib.CheckpointRestoreError,
                     match=r"checkpoint.init_from=.*empty.*No complete checkpoint"):
    trainer_main.train(config, str(tmp_path / "run"), devices=jax.devices()[:1])


def _logged_steps(workdir) -> list[int]:
  path = pathlib.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  steps = []
  for line in path.read_text().splitlines():
    try:
      steps.append(json.loads(line)["step"])
    except json.JSONDecodeError:  # a line being written
      pass
  return steps
