r"""Train a model from a config file: `python -m trainer.main --config configs/cpu_lm.py`.

    python -m trainer.main --config configs/cpu_lm.py --workdir runs/cpu_lm \
        --config.optimizer.learning_rate=1e-3

The run reads top to bottom: config -> mesh -> model -> optimizer -> checkpoint ->
data -> jitted step -> the loop (metrics, eval, checkpoints). Re-running the same
command in the same workdir resumes from the latest checkpoint.
"""

import json
import logging as logging_std
import math
import os
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from ml_collections import config_flags

import models
import psgd
from trainer import checkpoint as checkpoint_lib
from trainer import data as data_lib
from trainer import distributed, hardware
from trainer import mesh as mesh_lib
from trainer import optim
from trainer import step as step_lib
from trainer.metrics import MetricsWriter, StepTimer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and config go here.")


def _check_batch(config, mesh, rules) -> None:
  """Batch settings that cannot work, before anything is compiled."""
  batch, micro = config.train.global_batch_size, config.train.microbatches
  dp = mesh_lib.data_parallel_size(mesh, rules)
  if micro < 1 or batch % micro:
    raise ValueError(f"train.global_batch_size={batch} must be divisible by "
                     f"train.microbatches={micro}.")
  if (batch // micro) % dp:
    raise ValueError(f"train.global_batch_size / train.microbatches = {batch // micro} must "
                     f"be divisible by the data-parallel size {dp} (mesh axes "
                     f"{mesh_lib.batch_axes(rules)} of mesh {dict(mesh.shape)}).")
  if batch % jax.process_count():
    raise ValueError(f"train.global_batch_size={batch} must be divisible by the "
                     f"{jax.process_count()} processes.")


def _check_divisible(abstract_params, param_specs, mesh) -> None:
  """Every sharded dim must divide by its mesh axes; say which param and rule if not."""
  flat_specs = jax.tree.leaves(param_specs, is_leaf=lambda x: isinstance(x, P))
  for (path, leaf), spec in zip(jax.tree_util.tree_flatten_with_path(abstract_params)[0],
                                flat_specs):
    for size, entry in zip(leaf.shape, spec):
      axes = mesh_lib.axis_names(entry)
      parts = math.prod(mesh.shape[a] for a in axes)
      if size % parts:
        raise ValueError(
            f"Parameter {jax.tree_util.keystr(path)} of shape {leaf.shape} has a dim of size "
            f"{size} sharded over mesh axes {axes} ({parts} ways), which does not divide it. "
            "Pick sizes divisible by the mesh (e.g. pad model.vocab_size), or map that "
            "logical axis to None in mesh.rules.")


def _opt_state_specs(config, tx, abstract_params, param_specs, mesh):
  abstract_state = jax.eval_shape(tx.init, abstract_params)
  if config.optimizer.name == "kron":
    return psgd.state_partition_specs(abstract_state, abstract_params, param_specs, mesh)
  # optax baselines: moments mirror the params, everything else is a scalar.
  return optax.tree_map_params(tx, lambda _, spec: spec, abstract_state, param_specs,
                               transform_non_params=lambda _: P(),
                               is_leaf=lambda x: isinstance(x, P))


def _quiet_library_logs() -> None:
  """Keep Orbax's and TFDS's INFO chatter out of the run log (warnings still show)."""
  class Filter(logging_std.Filter):
    def filter(self, record):
      noisy = any(part in record.pathname for part in ("/orbax/", "/tensorflow_datasets/"))
      return record.levelno >= logging_std.WARNING or not noisy
  logging.get_absl_handler().addFilter(Filter())


def train(config, workdir: str, devices=None) -> tuple[step_lib.TrainState, dict]:
  """Run (or resume) the training `config` describes in `workdir`; returns the final
  state and the last metrics written. `devices` defaults to all (tests pass fewer)."""
  # ------------------------------------------------------------- start, logging
  distributed.initialize(config.distributed)
  is_main = jax.process_index() == 0
  workdir = os.path.expanduser(workdir)
  if is_main:
    pathlib.Path(workdir).mkdir(parents=True, exist_ok=True)
    (pathlib.Path(workdir) / "config.json").write_text(config.to_json_best_effort(indent=2))
  logging.info("Process %d/%d, %d devices (%s)", jax.process_index(), jax.process_count(),
               jax.device_count(), jax.devices()[0].device_kind)
  optim.check_config(config.optimizer)

  # ----------------------------------------------------------------------- mesh
  mesh = mesh_lib.make_mesh(config.mesh.axes, config.mesh.shape, devices)
  rules = tuple(tuple(rule) for rule in config.mesh.rules)
  _check_batch(config, mesh, rules)

  # ------------------------------------------------- model (abstract) and shardings
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    abstract_model = nnx.eval_shape(lambda: models.build(config.model, nnx.Rngs(config.seed)))
  graphdef, abstract_params_state, rest = nnx.split(abstract_model, nnx.Param, ...)
  abstract_params = nnx.to_pure_dict(abstract_params_state)
  param_specs = nnx.to_pure_dict(models.partition_specs(abstract_params_state, rules))
  _check_divisible(abstract_params, param_specs, mesh)
  if data_lib.vocab_size(config.data) > config.model.vocab_size:
    raise ValueError(f"model.vocab_size={config.model.vocab_size} is smaller than the "
                     f"tokenizer's {data_lib.vocab_size(config.data)} tokens.")
  num_params = models.param_count(abstract_params)
  flops_per_token = models.flops_per_token(config.model, config.data.seq_len)
  logging.info("Model: %s, %.2fM params, %.3g training FLOPs/token", config.model.name,
               num_params / 1e6, flops_per_token)

  # ------------------------------------------------------------------ optimizer
  total_steps = config.train.steps
  tx, schedule = optim.make_optimizer(
      config.optimizer, total_steps,
      scanned_layers=nnx.to_pure_dict(models.scanned_mask(abstract_params_state)),
      weight_decay_mask=nnx.to_pure_dict(models.weight_decay_mask(abstract_params_state)))
  opt_specs = _opt_state_specs(config, tx, abstract_params, param_specs, mesh)
  state_specs = step_lib.TrainState(step=P(), params=param_specs, opt_state=opt_specs,
                                    rng=P(), nonfinite_in_a_row=P())
  state_shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), state_specs,
                                 is_leaf=lambda x: isinstance(x, P))

  # ------------------------------------------------------- state: init or restore
  def fresh_state():
    with nnx.logical_axis_rules(rules):
      model = models.build(config.model, nnx.Rngs(config.seed))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return step_lib.TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params),
                               rng=jax.random.PRNGKey(config.seed + 1),
                               nonfinite_in_a_row=jnp.int32(0))

  init_state = jax.jit(fresh_state, out_shardings=state_shardings)
  abstract_state = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      jax.eval_shape(init_state), state_shardings)
  checkpointer = checkpoint_lib.Checkpointer(
      workdir, save_every=config.checkpoint.save_every,
      max_to_keep=config.checkpoint.max_to_keep, keep_every=config.checkpoint.keep_every,
      async_save=config.checkpoint.async_save)
  config_dict = json.loads(config.to_json_best_effort())

  # -------------------------------------------------------------------- data
  train_iter = data_lib.make_train_iterator(config.data, config.train.global_batch_size,
                                            jax.process_index(), jax.process_count())
  batch_sharding = NamedSharding(mesh, P(mesh_lib.batch_axes(rules) or None))

  def to_global(local_batch):
    return {k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(v))
            for k, v in local_batch.items()}

  latest = checkpointer.latest_step()
  with jax.set_mesh(mesh):
    if latest is not None:
      state = checkpointer.restore(latest, abstract_state, train_iter, config_dict)
    else:
      state = init_state()
      if config.checkpoint.init_from:
        loaded = checkpoint_lib.restore_for_init(
            config.checkpoint.init_from, abstract_state._asdict(), config.checkpoint.init_what)
        state = state._replace(**loaded)
  start_step = int(state.step)
  logging.info("Starting at step %d of %d", start_step, total_steps)

  # ------------------------------------------------------------ jitted steps
  loss_fn = step_lib.make_loss_fn(graphdef, rest)
  train_step = jax.jit(
      step_lib.make_train_step(loss_fn, tx, schedule, config.train.microbatches),
      in_shardings=(state_shardings, batch_sharding), out_shardings=(state_shardings, None),
      donate_argnums=(0,))
  eval_step = jax.jit(step_lib.make_eval_step(graphdef, rest),
                      in_shardings=(state_shardings.params, batch_sharding))

  def evaluate(params) -> dict[str, float]:
    eval_iter = data_lib.make_eval_iterator(config.data, config.train.global_batch_size,
                                            jax.process_index(), jax.process_count())
    sums = np.array([jax.device_get(eval_step(params, to_global(b))) for b in eval_iter])
    loss = float(sums[:, 0].sum() / max(sums[:, 1].sum(), 1.0))
    metrics = {"eval/loss": loss}
    if config.data.tokenizer == "bytes":
      metrics["eval/bits_per_byte"] = loss / math.log(2)
    return metrics

  # ---------------------------------------------------------------- the loop
  writer = MetricsWriter(workdir, total_steps, enabled=is_main)
  peak_flops = hardware.peak_flops_per_device(config.train.peak_flops_per_device)
  tokens_per_step = config.train.global_batch_size * config.data.seq_len
  preemption = checkpoint_lib.PreemptionWatch()
  timer, step, last = StepTimer(), start_step, {}
  stop_reason, failed = None, False
  with jax.set_mesh(mesh):
    while step < total_steps:
      state, metrics = train_step(state, to_global(next(train_iter)))
      step += 1
      timer.tick()
      writer.advance(step)
      if step % config.train.log_every == 0 or step == total_steps:
        metrics = jax.device_get(metrics)
        seconds = timer.lap()
        metrics.update({"train/step_time": seconds,
                        "train/tokens_per_sec": tokens_per_step / seconds})
        if peak_flops:
          metrics["train/mfu"] = (flops_per_token * tokens_per_step / seconds /
                                  (peak_flops * jax.device_count()))
        if config.data.tokenizer == "bytes":
          metrics["train/bits_per_byte"] = metrics["train/loss"] / math.log(2)
        writer.write(step, metrics)
        last.update(metrics)
      if config.train.eval_every and (step % config.train.eval_every == 0 or
                                      step == total_steps):
        eval_metrics = evaluate(state.params)
        writer.write(step, eval_metrics)
        last.update(eval_metrics)
      if int(state.nonfinite_in_a_row) >= config.train.max_nonfinite_steps:
        failed = True
        stop_reason = (f"{config.train.max_nonfinite_steps} steps in a row had a non-finite "
                       "loss or gradient; the checkpoint holds the last good state. Lower "
                       "optimizer.learning_rate or check the data.")
      elif preemption.requested():
        stop_reason = "preempted (SIGTERM)"
      elif step == config.train.stop_at:
        stop_reason = "reached train.stop_at"
      if stop_reason:
        checkpointer.save(step, state, train_iter, config_dict, force=True)
        break
      checkpointer.save(step, state, train_iter, config_dict,
                        force=step == total_steps)

  # ------------------------------------------------------------------- finish
  checkpointer.close()
  preemption.close()
  writer.close()
  if failed:
    raise SystemExit(f"Stopped at step {step}: {stop_reason}")
  if stop_reason:
    logging.info("Saved step %d and stopped: %s", step, stop_reason)
  else:
    logging.info("Done: %d steps, checkpoints in %s", step, checkpointer.directory)
  return state, last


def main(argv):
  del argv
  if _WORKDIR.value is None:
    raise app.UsageError("--workdir is required.")
  _quiet_library_logs()
  train(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
