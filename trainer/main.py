r"""Train a model from a config file: `python -m trainer.main --config configs/cpu_lm.py`.

    python -m trainer.main --config configs/cpu_lm.py --workdir runs/cpu_lm \
        --config.optimizer.learning_rate=1e-3

The run reads top to bottom: config -> mesh, model, optimizer, shardings (setup.py) ->
data -> restore or init -> the loop (metrics, eval, checkpoints). Re-running the same
command in the same workdir resumes from the latest checkpoint that restores intact.
Exit status: 0 done or preempted (SIGTERM), 1 a stop the log line explains (non-finite
steps, a failed save, no restorable checkpoint), 130 Ctrl-C after saving.
"""

import contextlib
import json
import logging as logging_std
import math
import warnings

import jax
from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from trainer import checkpoint as checkpoint_lib
from trainer import data as data_lib
from trainer import distributed, dry_run, hardware, paths
from trainer import setup as setup_lib
from trainer import step as step_lib
from trainer import validate
from trainer.metrics import MeanSinceLog, MetricsWriter, StepTimer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and config go here.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Only check that the config fits its target "
                             "devices: memory per device, ahead-of-time compile (dry_run.py).")
_DRY_RUN_COMPARE = flags.DEFINE_string(
    "dry_run_compare", "", "With --dry_run: also build the run with this optimizer (e.g. "
    "'adamw', 'muon') and print both steps' costs side by side.")
_TOPOLOGY = flags.DEFINE_string("topology", None, "The dry run's target TPU topology, e.g. "
                                "'v5p:2x2x2'; '' for the local devices. Default: "
                                "config.dry_run.topology.")


class _LibraryLogFilter(logging_std.Filter):
  """Library log records (Orbax, TFDS, grain, asyncio): INFO dropped, warnings and
  errors one line each, and none once the run has reported its own error (a failing
  background save leaves its threads logging the same failure, with tracebacks, many
  times over)."""

  LIBRARIES = ("/orbax/", "/tensorflow_datasets/", "/grain/", "/etils/", "/asyncio/")
  muted = False

  def filter(self, record):
    if not any(part in record.pathname for part in self.LIBRARIES):
      return True
    if self.muted or record.levelno < logging_std.WARNING:
      return False
    if record.exc_info or record.exc_text:
      cause = record.exc_info[1] if record.exc_info else None
      record.msg = record.getMessage().splitlines()[0] + (f" ({cause!r})"[:300] if cause else "")
      record.args, record.exc_info, record.exc_text = (), None, None
    return True


_LIBRARY_LOGS = _LibraryLogFilter()


class NonFiniteError(RuntimeError):
  """The run stopped because its steps stopped being finite (it saved nothing bad)."""


class RunInterrupted(KeyboardInterrupt):
  """Ctrl-C: the current step was saved, then the run stopped."""


def _nonfinite_stop(checkpointer, step: int, skipped: int, limit: int,
                    start_step: int) -> NonFiniteError:
  """The error for a run whose last `skipped` steps up to `step` changed nothing.

  Skipped steps leave the state as it was, so they all started from the state of step
  `step - skipped`. After `limit` of them in a row, if this run wrote that state, its
  checkpoint is moved aside: the update that wrote it may have diverged, and the rerun
  the message advises then resumes from the step before (losing one save interval at
  most). A state the run restored is kept: it was trained past once already.
  """
  checkpointer.wait()
  origin = step - skipped
  what = (f"the {skipped} steps after step {origin} all had a non-finite loss, gradient, "
          "update or params")
  if skipped >= limit and origin > start_step and origin in checkpointer.steps():
    checkpointer.move_aside(origin, f"diverged: {what}")
    what += f"; step {origin}'s checkpoint was moved aside"
  newest = checkpointer.latest_step()
  if newest is None:
    resume = "there is no checkpoint to resume from"
  else:
    since = "is where they started" if newest == origin else "is from before that"
    resume = (f"the newest checkpoint, step {newest}, {since}: rerun with a lower "
              "--config.optimizer.learning_rate (or check the data) to resume from it")
  return NonFiniteError(f"Stopped at step {step}: {what}; {resume}.")


def train(config, workdir: str, devices=None) -> tuple[step_lib.TrainState, dict]:
  """Run (or resume) the training `config` describes in `workdir`; returns the final
  state and the last metrics written. `devices` defaults to all (tests pass fewer).

  Raises NonFiniteError when the steps stop being finite, RunInterrupted after saving
  on Ctrl-C, and checkpoint_lib's errors when a save fails or nothing restores; a
  SIGTERM saves and returns normally (a preempted run resumes with the same command).
  """
  # ------------------------------------------------------------- start, logging
  distributed.initialize(config.distributed)
  is_main = jax.process_index() == 0
  workdir = paths.absolute(workdir)  # Orbax needs absolute paths; see paths.py
  config = paths.resolve_config_paths(config)
  validate.check_run(config, workdir)  # config, workdir and data splits, before any build
  logging.info("Process %d/%d, %d devices (%s)", jax.process_index(), jax.process_count(),
               jax.device_count(), jax.devices()[0].device_kind)

  # --------------------------- mesh, model, optimizer, shardings (checks config first)
  run = setup_lib.build_setup(config, devices)
  mesh, total_steps = run.mesh, config.train.steps
  if config.optimizer.warmup_steps >= total_steps and config.optimizer.decay != "constant":
    logging.warning("optimizer.warmup_steps=%d is not below train.steps=%d: the learning "
                    "rate rises for the whole run and never decays.",
                    config.optimizer.warmup_steps, total_steps)
  logging.info("Model: %s, %.2fM params, %.3g training FLOPs/token; mesh %s",
               config.model.name, run.num_params / 1e6, run.flops_per_token,
               dict(mesh.shape))

  # -------------------------------------------------------------------- data
  train_iter = data_lib.make_train_iterator(config.data, config.train.global_batch_size,
                                            jax.process_index(), jax.process_count())

  # Everything set up from here on is released on every way out of the loop.
  with contextlib.ExitStack() as cleanup:
    # ----------------------------------------------------- state: init or restore
    checkpointer = cleanup.enter_context(checkpoint_lib.Checkpointer(
        workdir, save_every=config.checkpoint.save_every,
        max_to_keep=config.checkpoint.max_to_keep, keep_every=config.checkpoint.keep_every,
        async_save=config.checkpoint.async_save))
    config_dict = json.loads(config.to_json_best_effort())
    with jax.set_mesh(mesh):
      state = checkpointer.restore_latest(run.abstract_state, train_iter, config_dict,
                                          restart_data=config.checkpoint.restart_data)
      if state is None:
        state = run.init_state()
        if config.checkpoint.init_from:
          parts = (("params",) if config.checkpoint.init_what == "params" else
                   ("params", "opt_state"))
          try:
            _, loaded = checkpoint_lib.read_verified(
                config.checkpoint.init_from,
                {part: getattr(run.abstract_state, part) for part in parts})
          except checkpoint_lib.CheckpointRestoreError as error:
            raise checkpoint_lib.CheckpointRestoreError(
                f"checkpoint.init_from={config.checkpoint.init_from!r}: {error}") from error
          state = state._replace(**loaded)
    start_step = int(state.step)
    if start_step > total_steps:
      raise ValueError(f"train.steps={total_steps} is below step {start_step}, where the "
                       f"run in {workdir} stands: raise train.steps to continue it, or use "
                       "another --workdir.")
    logging.info("Starting at step %d of %d", start_step, total_steps)
    if is_main:  # only now: a config its checkpoints refuse must not replace the saved one
      paths.write_whole(epath.Path(workdir) / "config.json", config.to_json_best_effort(indent=2))

    # -------------------------------------------------------------- the loop
    writer = MetricsWriter(workdir, total_steps, start_step=start_step, enabled=is_main)
    cleanup.callback(writer.close)
    loss_since_log = MeanSinceLog(("train/loss",))
    signals = cleanup.enter_context(checkpoint_lib.StopSignals(start_step))
    peak_flops = hardware.peak_flops_per_device(config.train.peak_flops_per_device)
    tokens_per_step = config.train.global_batch_size * config.data.seq_len
    limit = config.train.max_nonfinite_steps
    timer, step, last, previous = StepTimer(), start_step, {}, None
    stop_reason, save_pending = None, False
    with jax.set_mesh(mesh):
      while step < total_steps:
        state, metrics = run.train_step(state, run.to_global(next(train_iter)))
        loss_since_log.add(metrics)
        step += 1
        checkpointer.check_for_errors()  # a failed background save stops the run now
        if step == start_step + 1:  # it compiled the step: not part of the step time
          jax.block_until_ready(metrics)
          timer.restart()
        else:
          timer.tick()
        writer.advance(step)
        if step % config.train.log_every == 0 or step == total_steps:
          logged = jax.device_get(metrics)
          logged.update(loss_since_log.pop())  # the mean, not the last batch's
          seconds = timer.lap()  # None at a run's first step: no timing to log
          if seconds:
            logged.update({"train/step_time": seconds,
                           "train/tokens_per_sec": tokens_per_step / seconds})
          if seconds and peak_flops:
            logged["train/mfu"] = (run.flops_per_token * tokens_per_step / seconds /
                                   (peak_flops * jax.device_count()))
          if config.data.tokenizer == "bytes":
            logged["train/bits_per_byte"] = logged["train/loss"] / math.log(2)
          writer.write(step, logged)
          last.update(logged)
        if config.train.eval_every and (step % config.train.eval_every == 0 or
                                        step == total_steps):
          with timer.paused():  # step_time and tokens_per_sec are the training's
            eval_metrics = run.evaluate(state.params)
          writer.write(step, eval_metrics)
          last.update(eval_metrics)
        # Skipped steps in a row as of the previous step: reading that count waits only
        # for it, so this step stays queued ahead of the host (the last step reads its own).
        watched, watched_step = ((metrics, step) if step == total_steps else
                                 (previous, step - 1))
        previous = metrics
        skipped = int(watched["train/skipped_in_a_row"]) if watched else 0
        if skipped >= limit or (skipped and step == total_steps):
          raise _nonfinite_stop(checkpointer, watched_step, skipped, limit, start_step)
        received = signals.requested(step)
        if received:
          stop_reason = ("preempted (SIGTERM)" if received == "SIGTERM" else
                         "interrupted (SIGINT)")
        elif step == config.train.stop_at:
          stop_reason = "reached train.stop_at"
        if stop_reason or save_pending or step == total_steps or checkpointer.due(step):
          # Only a state that a finite step just wrote is saved: a save put off during
          # skipped steps happens at the next finite one.
          save_pending = int(metrics["train/skipped_in_a_row"]) > 0
          if not save_pending:
            checkpointer.save(step, state, train_iter, config_dict)
        if stop_reason:
          break

  # ------------------------------------------------------------------- finish
  # A stop during skipped steps saves nothing; the newest checkpoint is the one before.
  saved = (f"Saved step {step}" if not save_pending else
           f"Step {step} was skipped (non-finite), so not saved")
  if stop_reason == "interrupted (SIGINT)":
    raise RunInterrupted(f"{saved} and stopped: Ctrl-C. The same command resumes.")
  if stop_reason:
    logging.info("%s and stopped: %s", saved, stop_reason)
  else:
    logging.info("Done: %d steps, checkpoints in %s", step, checkpointer.directory)
  return state, last


def main(argv):
  if len(argv) > 1:  # absl hands over the words that are not flags
    raise app.UsageError(
        f"Unexpected arguments {argv[1:]}: every setting is a flag, e.g. "
        f"--config.{argv[1].lstrip('-')} for {argv[1]!r}.")
  if _DRY_RUN.value:
    return dry_run.main(_CONFIG.value, _TOPOLOGY.value, _DRY_RUN_COMPARE.value)
  if _WORKDIR.value is None:
    raise app.UsageError("--workdir is required.")
  logging.get_absl_handler().addFilter(_LIBRARY_LOGS)
  try:
    train(_CONFIG.value, _WORKDIR.value)
  except RunInterrupted as stop:
    logging.warning("%s", stop)
    return 130
  except (NonFiniteError, OSError, checkpoint_lib.CheckpointSaveError,
          checkpoint_lib.CheckpointRestoreError,
          checkpoint_lib.CheckpointMismatchError) as error:
    _LIBRARY_LOGS.muted = True
    # A failed save leaves Orbax coroutines unawaited; Python would warn of each at exit.
    warnings.filterwarnings("ignore", message="coroutine .* was never awaited")
    logging.error("%s", error)  # the run's own account, the last line: no traceback
    return 1


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
