"""Orbax checkpoints of the whole run: train state, data iterator and config.

Every save holds {params, optimizer state (PSGD factors, momentum, key, counters), step,
rng} as "state", the grain iterator position as "data" and the resolved config as
"config" (JSON). Orbax writes a step to a temporary directory and renames it when the
save is complete, so a kill at any moment leaves the last committed step intact, and
restore only ever sees committed steps.
"""

import json
import os
import signal
from typing import Any, Optional

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

# Config sections a checkpoint must agree with to be resumed.
_MUST_MATCH = ("model", "optimizer.name")


class CheckpointMismatchError(ValueError):
  """A checkpoint that does not fit the configured model or optimizer."""


def _section(config: dict, dotted: str):
  for part in dotted.split("."):
    config = config.get(part, {}) if isinstance(config, dict) else None
  return config


def _path_str(path) -> str:
  """A key path as Orbax names the saved array ('opt_state.1.0.factors.w.0')."""
  return ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                  for k in path)


class Checkpointer:
  """CheckpointManager in <workdir>/checkpoints (local path or gs:// URL)."""

  def __init__(self, workdir: str, *, save_every: int, max_to_keep: Optional[int],
               keep_every: Optional[int], async_save: bool = True):
    self.directory = os.path.join(workdir, "checkpoints")
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            save_interval_steps=save_every, max_to_keep=max_to_keep, keep_period=keep_every,
            enable_async_checkpointing=async_save, create=True),
        item_handlers=dict(state=ocp.StandardCheckpointHandler(),
                           data=grain.checkpoint.CheckpointHandler(),
                           config=ocp.JsonCheckpointHandler()))

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_iterator: Any, config: dict,
           force: bool = False) -> bool:
    """Start a save of `step` if it is due (or forced); returns whether it started."""
    return self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iterator),
        config=ocp.args.JsonSave(config)), force=force)

  def check_compatible(self, step: int, abstract_state: Any, config: dict) -> None:
    """CheckpointMismatchError saying what differs, before any array is read."""
    saved = self._manager.restore(step, args=ocp.args.Composite(
        config=ocp.args.JsonRestore())).config
    problems = []
    for key in _MUST_MATCH:
      ours, theirs = _section(config, key), _section(saved, key)
      if ours != theirs:
        problems.append(f"config {key}: checkpoint has {json.dumps(theirs, sort_keys=True)}, "
                        f"this run has {json.dumps(ours, sort_keys=True)}")
    saved_meta = self._manager.item_metadata(step)["state"]
    saved_shapes = {m.name: tuple(m.shape) for m in jax.tree.leaves(saved_meta)}
    wanted = {_path_str(p): tuple(x.shape) for p, x in
              jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
    params_first = lambda name: (not name.startswith("params."), name)
    for name in sorted(set(saved_shapes) | set(wanted), key=params_first):
      if saved_shapes.get(name) != wanted.get(name):
        problems.append(f"{name}: checkpoint {saved_shapes.get(name, 'missing')}, "
                        f"this run {wanted.get(name, 'missing')}")
    if problems:
      shown = problems[:12] + ([f"... and {len(problems) - 12} more"] if len(problems) > 12 else [])
      raise CheckpointMismatchError(
          f"The checkpoint at {self.directory} (step {step}) does not match this run's "
          "config:\n  " + "\n  ".join(shown) +
          "\nUse another --workdir, or the config the checkpoint was written with.")

  def _saved_process_count(self, step: int) -> Optional[int]:
    """How many processes saved `step`'s data positions: grain writes one file per
    process, data/process_<i>-of-<count>.json."""
    first = list((epath.Path(self.directory) / str(step) / "data").glob("process_0-of-*.json"))
    return int(first[0].stem.rsplit("-", 1)[1]) if first else None

  def restore(self, step: int, abstract_state: Any, data_iterator: Any, config: dict) -> Any:
    """The state at `step` placed as `abstract_state` says; the iterator is set in place.

    A checkpoint saved by another number of processes (a run moved to a bigger or smaller
    slice) restores the state only: each process's data position belongs to a shard this
    run does not have, so the data stream starts afresh.
    """
    self.check_compatible(step, abstract_state, config)
    items = dict(state=ocp.args.StandardRestore(abstract_state))
    saved_by = self._saved_process_count(step)
    if saved_by == jax.process_count():
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    else:
      logging.warning("Step %d was saved by %s processes, this run has %d: the data "
                      "position does not carry over; the data stream starts afresh.",
                      step, saved_by, jax.process_count())
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    logging.info("Restored step %d from %s", step, self.directory)
    return restored.state

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def restore_for_init(path: str, abstract_state: Any, what: str) -> Any:
  """Params (what='params') or params and optimizer state ('params_and_optimizer') from
  the latest checkpoint of another run's workdir (or its checkpoints dir), for fine-tuning.
  Returns `abstract_state`'s structure with those parts restored and the rest None."""
  directory = path if os.path.basename(path.rstrip("/")) == "checkpoints" else os.path.join(
      path, "checkpoints")
  with ocp.CheckpointManager(directory) as manager:
    step = manager.latest_step()
    if step is None:
      raise ValueError(f"checkpoint.init_from={path!r}: no checkpoint found in {directory}.")
    keep = {"params"} if what == "params" else {"params", "opt_state"}
    wanted = {k: v for k, v in abstract_state.items() if k in keep}
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=wanted, restore_args=ocp.checkpoint_utils.construct_restore_args(wanted),
        partial_restore=True))).state
  logging.info("Initialized %s from %s step %d", sorted(keep), directory, step)
  return restored


class PreemptionWatch:
  """SIGTERM (what schedulers and TPU maintenance send) asks for a save-and-exit.

  `requested()` is collective on multi-host runs: every process learns at the same step
  whether any of them was signalled, so all save the same step.
  """

  def __init__(self):
    self._signalled = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self._signalled = True

  def requested(self) -> bool:
    flag = np.int32(self._signalled)
    if jax.process_count() > 1:
      flag = multihost_utils.process_allgather(flag).max()
    return bool(flag)

  def close(self) -> None:
    signal.signal(signal.SIGTERM, self._previous)
