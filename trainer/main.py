r"""Train a model from a config file: `python -m trainer.main --config configs/cpu_lm.py`.

    python -m trainer.main --config configs/cpu_lm.py --workdir runs/cpu_lm \
        --config.optimizer.learning_rate=1e-3

The run reads top to bottom: config -> mesh, model, optimizer, shardings (setup.py) ->
data -> restore or init -> the loop (metrics, eval, checkpoints). Re-running the same
command in the same workdir resumes from the latest checkpoint.
"""

import json
import logging as logging_std
import math
import os
import pathlib

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from trainer import checkpoint as checkpoint_lib
from trainer import data as data_lib
from trainer import distributed, dry_run, hardware
from trainer import setup as setup_lib
from trainer import step as step_lib
from trainer import validate
from trainer.metrics import MeanSinceLog, MetricsWriter, StepTimer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and config go here.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Only check that the config fits its target "
                             "devices: memory per device, ahead-of-time compile (dry_run.py).")
_TOPOLOGY = flags.DEFINE_string("topology", None, "The dry run's target TPU topology, e.g. "
                                "'v5p:2x2x2'; '' for the local devices. Default: "
                                "config.dry_run.topology.")


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
  validate.check_run(config, workdir)  # config, workdir and data splits, before any build
  logging.info("Process %d/%d, %d devices (%s)", jax.process_index(), jax.process_count(),
               jax.device_count(), jax.devices()[0].device_kind)

  # --------------------------- mesh, model, optimizer, shardings (checks config first)
  run = setup_lib.build_setup(config, devices)
  mesh, total_steps = run.mesh, config.train.steps
  logging.info("Model: %s, %.2fM params, %.3g training FLOPs/token; mesh %s",
               config.model.name, run.num_params / 1e6, run.flops_per_token,
               dict(mesh.shape))
  if is_main:
    pathlib.Path(workdir).mkdir(parents=True, exist_ok=True)
    (pathlib.Path(workdir) / "config.json").write_text(config.to_json_best_effort(indent=2))

  # -------------------------------------------------------------------- data
  train_iter = data_lib.make_train_iterator(config.data, config.train.global_batch_size,
                                            jax.process_index(), jax.process_count())

  def to_global(local_batch):
    return {k: jax.make_array_from_process_local_data(run.batch_sharding, np.asarray(v))
            for k, v in local_batch.items()}

  # ------------------------------------------------------- state: init or restore
  checkpointer = checkpoint_lib.Checkpointer(
      workdir, save_every=config.checkpoint.save_every,
      max_to_keep=config.checkpoint.max_to_keep, keep_every=config.checkpoint.keep_every,
      async_save=config.checkpoint.async_save)
  config_dict = json.loads(config.to_json_best_effort())
  latest = checkpointer.latest_step()
  with jax.set_mesh(mesh):
    if latest is not None:
      state = checkpointer.restore(latest, run.abstract_state, train_iter, config_dict)
    else:
      state = run.init_state()
      if config.checkpoint.init_from:
        loaded = checkpoint_lib.restore_for_init(
            config.checkpoint.init_from, run.abstract_state._asdict(),
            config.checkpoint.init_what)
        state = state._replace(**loaded)
  start_step = int(state.step)
  logging.info("Starting at step %d of %d", start_step, total_steps)

  def evaluate(params) -> dict[str, float]:
    eval_iter = data_lib.make_eval_iterator(config.data, config.train.global_batch_size,
                                            jax.process_index(), jax.process_count())
    sums = np.array([jax.device_get(run.eval_step(params, to_global(b))) for b in eval_iter])
    loss = float(sums[:, 0].sum() / max(sums[:, 1].sum(), 1.0))
    metrics = {"eval/loss": loss}
    if config.data.tokenizer == "bytes":
      metrics["eval/bits_per_byte"] = loss / math.log(2)
    return metrics

  # ---------------------------------------------------------------- the loop
  writer = MetricsWriter(workdir, total_steps, start_step=start_step, enabled=is_main)
  loss_since_log = MeanSinceLog(("train/loss",))
  peak_flops = hardware.peak_flops_per_device(config.train.peak_flops_per_device)
  tokens_per_step = config.train.global_batch_size * config.data.seq_len
  preemption = checkpoint_lib.PreemptionWatch()
  timer, step, last, previous = StepTimer(), start_step, {}, None
  stop_reason, failed = None, False
  with jax.set_mesh(mesh):
    while step < total_steps:
      state, metrics = run.train_step(state, to_global(next(train_iter)))
      loss_since_log.add(metrics)
      step += 1
      timer.tick()
      writer.advance(step)
      if step % config.train.log_every == 0 or step == total_steps:
        metrics = jax.device_get(metrics)
        metrics.update(loss_since_log.pop())  # the mean, not the last batch's
        seconds = timer.lap()
        metrics.update({"train/step_time": seconds,
                        "train/tokens_per_sec": tokens_per_step / seconds})
        if peak_flops:
          metrics["train/mfu"] = (run.flops_per_token * tokens_per_step / seconds /
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
      # Skipped steps in a row as of the previous step: reading that count waits only
      # for it, so this step stays queued ahead of the host (the last step reads its own).
      watched = metrics if step == total_steps else previous
      previous = metrics
      limit = config.train.max_nonfinite_steps
      if watched and int(watched["train/skipped_in_a_row"]) >= limit:
        failed = True
        stop_reason = (f"{limit} steps in a row had a non-finite "
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
  if len(argv) > 1:  # absl hands over the words that are not flags
    raise app.UsageError(
        f"Unexpected arguments {argv[1:]}: every setting is a flag, e.g. "
        f"--config.{argv[1].lstrip('-')} for {argv[1]!r}.")
  if _DRY_RUN.value:
    return dry_run.main(_CONFIG.value, _TOPOLOGY.value)
  if _WORKDIR.value is None:
    raise app.UsageError("--workdir is required.")
  _quiet_library_logs()
  train(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
