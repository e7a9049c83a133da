"""The trainer end to end on CPU: training, meshes, config errors."""

import math

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import psgd
from trainer import checkpoint as checkpoint_lib
from trainer import main as trainer_main
from trainer_utils import losses_by_step, read_metrics, run_trainer, tiny_config


def test_tiny_config_trains_end_to_end(tmp_path):
  state, last = trainer_main.train(tiny_config(), str(tmp_path), devices=jax.devices()[:1])
  losses = losses_by_step(tmp_path)
  assert int(state.step) == 40 and sorted(losses) == [10, 20, 30, 40]
  start = math.log(257)  # a uniform guess over the byte tokens
  assert losses[40] < 0.7 * start
  assert last["eval/loss"] < 0.75 * start
  assert 0 < last["train/precond_update_rate"] <= 1
  assert (tmp_path / "tensorboard").is_dir() and (tmp_path / "config.json").is_file()
  assert (tmp_path / "checkpoints" / "40").is_dir()
  # The first step compiles; its time is left out of the first record's step time.
  step_time = {r["step"]: r["train/step_time"] for r in read_metrics(tmp_path)
               if "train/step_time" in r}
  assert step_time[10] < 3 * max(step_time[20], step_time[30], step_time[40])


def test_mesh_of_8_devices_matches_one_device(tmp_path):
  config = tiny_config(steps=4, log_every=1, eval_every=0)
  single, _ = trainer_main.train(config, str(tmp_path / "one"), devices=jax.devices()[:1])
  config.mesh.shape = (2, 2, 2)  # data x fsdp x tensor
  sharded, _ = trainer_main.train(config, str(tmp_path / "eight"))
  one, eight = losses_by_step(tmp_path / "one"), losses_by_step(tmp_path / "eight")
  np.testing.assert_allclose([eight[s] for s in range(1, 5)], [one[s] for s in range(1, 5)],
                             rtol=2e-4)
  # Params follow their logical axes; PSGD factors are spread over the mesh.
  assert sharded.params["embed"]["table"].sharding.spec == P("tensor", "fsdp")
  up = sharded.params["blocks"]["layers"]["mlp"]["up"]
  assert up.sharding.spec == P(None, "fsdp", "tensor")
  assert up.addressable_shards[0].data.shape == (2, 16, 32)
  kron = [s for s in jax.tree.leaves(sharded.opt_state,
                                     is_leaf=lambda x: isinstance(x, psgd.KronState))
          if isinstance(s, psgd.KronState)][0]
  dense = [f for f in jax.tree.leaves(kron.factors) if f.ndim == 3]
  assert dense and all(f.addressable_shards[0].data.size < f.size for f in dense)


def test_shard_local_kron_keeps_factors_with_their_shards_and_refuses_another_mesh(tmp_path):
  config = tiny_config(steps=4, log_every=1, eval_every=0)
  config.mesh.shape = (2, 2, 2)  # data x fsdp x tensor
  config.optimizer.kron.shard_local = True
  state, _ = trainer_main.train(config, str(tmp_path))
  assert all(np.isfinite(loss) for loss in losses_by_step(tmp_path).values())
  kron = [s for s in jax.tree.leaves(state.opt_state,
                                     is_leaf=lambda x: isinstance(x, psgd.KronState))
          if isinstance(s, psgd.KronState)][0]
  # up (2 layers, 32, 64) over fsdp x tensor: 2 x 2 shards of (16, 32) per layer, batch
  # ordered (shards, layers); each device holds its own shard's factors, for both layers.
  left = kron.factors[0]["blocks"]["layers"]["mlp"]["up"]
  assert left.shape == (8, 16, 16) and left.sharding.spec == P(("fsdp", "tensor"), None, None)
  assert left.addressable_shards[0].data.shape == (2, 16, 16)
  # The factors' shapes follow the mesh, so another mesh cannot take the checkpoint.
  config.mesh.shape = (1, 8, 1)
  config.train.steps = 6
  with pytest.raises(checkpoint_lib.CheckpointMismatchError,
                     match=r"(?s)opt_state.*shard_local=True cuts the PSGD factors by the mesh"):
    trainer_main.train(config, str(tmp_path))


@pytest.mark.parametrize("override, setting", [
    (dict(mesh=dict(shape=(3, 1, 1))), "mesh.shape"),
    (dict(mesh=dict(shape=(8, 1, 1)), train=dict(global_batch_size=12)),
     "global_batch_size"),
    (dict(train=dict(microbatches=3)), "microbatches"),
    (dict(optimizer=dict(name="adamm")), "optimizer.name"),
    (dict(model=dict(num_heads=3)), "model.num_heads"),
])
def test_config_errors_fail_before_compiling(tmp_path, override, setting):
  config = tiny_config()
  for section, values in override.items():
    config[section].update(values)
  with pytest.raises(ValueError, match=setting):
    trainer_main.train(config, str(tmp_path))
  assert not (tmp_path / "checkpoints").exists()


def test_misspelt_config_key_fails_naming_it(tmp_path):
  result = run_trainer(tmp_path, "train.stepz=3")
  assert result.returncode != 0
  assert "stepz" in result.stderr


def test_nonfinite_steps_are_skipped_then_the_run_stops(tmp_path):
  config = tiny_config(steps=20, log_every=1, eval_every=0, max_nonfinite_steps=3)
  config.optimizer.learning_rate = 1e30  # diverges within a few steps
  config.optimizer.grad_clip_norm = 0.0
  config.checkpoint.save_every = 1  # every step is due: only the finite ones are saved
  with pytest.raises(trainer_main.NonFiniteError, match="non-finite"):
    trainer_main.train(config, str(tmp_path), devices=jax.devices()[:1])
  metrics = read_metrics(tmp_path)
  skipped = [m["train/skipped"] for m in metrics if "train/skipped" in m]
  assert skipped[-3:] == [1.0, 1.0, 1.0]
  first_skipped = min(m["step"] for m in metrics if m.get("train/skipped") == 1.0)
  kept = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
  aside = [p.name for p in (tmp_path / "checkpoints_aside").iterdir()]
  assert kept and max(kept) < first_skipped
  assert len(aside) == 1 and str(first_skipped - 1) in aside[0]  # where they started


def test_microbatches_accumulate_to_the_full_batch_gradient(tmp_path):
  losses = {}
  for micro in (1, 2):
    config = tiny_config(steps=3, log_every=1, eval_every=0, microbatches=micro)
    trainer_main.train(config, str(tmp_path / str(micro)), devices=jax.devices()[:1])
    losses[micro] = losses_by_step(tmp_path / str(micro))
  np.testing.assert_allclose([losses[2][s] for s in (1, 2, 3)],
                             [losses[1][s] for s in (1, 2, 3)], rtol=1e-4)


def test_logged_loss_is_the_mean_since_the_last_log_line(tmp_path):
  every_step = tiny_config(steps=4, log_every=1, eval_every=0)
  trainer_main.train(every_step, str(tmp_path / "1"), devices=jax.devices()[:1])
  every_other = tiny_config(steps=4, log_every=2, eval_every=0)
  trainer_main.train(every_other, str(tmp_path / "2"), devices=jax.devices()[:1])
  per_step, logged = losses_by_step(tmp_path / "1"), losses_by_step(tmp_path / "2")
  assert sorted(logged) == [2, 4]
  for step in (2, 4):
    assert logged[step] != per_step[step]  # not the last batch's
    np.testing.assert_allclose(logged[step], (per_step[step - 1] + per_step[step]) / 2,
                               rtol=1e-5)
