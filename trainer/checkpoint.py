"""Orbax checkpoints of the whole run, and the rules that make every step safe to lose.

A step holds {params, optimizer state (PSGD factors, momentum, key, counters), step,
non-finite count} as "state", the grain iterator position as "data", the resolved
config as "config" and a checksum of every state array as "checksums". What makes a
kill, a full disk or bit rot cost at most the last save interval:
- A step counts only when it is complete: Orbax's commit marker and every item's
  metadata present. Leftover temporary directories are deleted (they were never a
  committed step); a step directory that is not complete is moved aside, never deleted.
- Restore tries the newest complete step first. If it cannot be read or its arrays do
  not match their checksums, the one before is tried; once one restores, the ones that
  failed are moved aside with a warning naming each. If none restores, nothing is moved
  and the error lists every step and why.
- A failed background save is reported at the next step (`check_for_errors`), with its
  temporary directory removed, so a run never trains on without its saves.
Readers that are not the run (eval, sampling, export, fine-tuning from another run) use
`read_verified`: the same newest-intact rule, reading only, so a run in progress or a
damaged step is never changed by them.
"""

import json
import os
import signal
import time
from typing import Any, Optional

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from trainer import resume_rules

ASIDE = "checkpoints_aside"  # <workdir>/checkpoints_aside: steps moved out of the way
_TMP_MARK = ".orbax-checkpoint-tmp"
# Files a complete step has: Orbax writes the first when the step is committed.
_COMPLETE_MARKERS = ("_CHECKPOINT_METADATA", "state/_METADATA", "state/manifest.ocdbt",
                     "config/metadata")
# State fields older versions saved and this one no longer has: ignored on restore.
_RETIRED = ("rng",)


class CheckpointMismatchError(ValueError):
  """A checkpoint that does not fit the configured run."""


class CheckpointSaveError(RuntimeError):
  """A save that failed: the run must stop (its last committed step is intact)."""


class CheckpointRestoreError(RuntimeError):
  """No complete step could be restored."""


class _Damaged(Exception):
  """A step that cannot be read back as saved."""


def _path_str(path) -> str:
  """A key path as Orbax names the saved array ('opt_state.1.0.factors.0.w')."""
  return ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                  for k in path)


def _array_checksum(x: jax.Array) -> jax.Array:
  """Sum of the array's bytes as uint32 words, wrapping: exact and independent of how
  the array is sharded or summed, and changed by any single flipped byte."""
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  if x.dtype.itemsize == 8:  # bitcast splits each element into two uint32 words
    words = jax.lax.bitcast_convert_type(x, jnp.uint32)
  else:
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
    words = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
  return jnp.sum(words, dtype=jnp.uint32)


_checksums_on_device = jax.jit(lambda tree: jax.tree.map(_array_checksum, tree))


def checksums(state: Any) -> dict[str, int]:
  """Saved-array name -> checksum of its contents."""
  sums = jax.device_get(_checksums_on_device(state))
  return {_path_str(path): int(value)
          for path, value in jax.tree_util.tree_flatten_with_path(sums)[0]}


def _all_processes_agree(ok: bool) -> bool:
  """True only if `ok` holds on every process (collective on multi-host runs)."""
  if jax.process_count() == 1:
    return ok
  return bool(multihost_utils.process_allgather(np.int32(ok)).min())


class _Manager(ocp.CheckpointManager):
  """Orbax's manager, minus its own ask of JAX's preemption sync service. StopSignals
  asks it, counting the steps since this run started; Orbax asks it with the absolute
  step (in should_save and save), and two askers counting differently agree on
  different steps: a resumed run would save at one and stop start_step steps later."""

  def reached_preemption(self, step: int) -> bool:
    del step
    return False


class Checkpointer:
  """CheckpointManager in <workdir>/checkpoints (local path or gs:// URL), made safe:
  see the module docstring."""

  def __init__(self, workdir: str, *, save_every: int, max_to_keep: Optional[int],
               keep_every: Optional[int], async_save: bool = True):
    self.directory = os.path.join(workdir, "checkpoints")
    self._aside = epath.Path(workdir) / ASIDE
    self._failed = False  # a save failed: its temporary directory is removed at exit
    if jax.process_index() == 0:
      self._clear_incomplete()
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("checkpoints: incomplete steps cleared")
    self._manager = _Manager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            save_interval_steps=save_every, max_to_keep=max_to_keep, keep_period=keep_every,
            enable_async_checkpointing=async_save, create=True),
        item_handlers=dict(state=ocp.PyTreeCheckpointHandler(),
                           data=grain.checkpoint.CheckpointHandler(),
                           config=ocp.JsonCheckpointHandler(),
                           checksums=ocp.JsonCheckpointHandler()))

  # ------------------------------------------------------------ what is on disk
  def _clear_incomplete(self) -> None:
    root = epath.Path(self.directory)
    if not root.exists():
      return
    for entry in root.iterdir():
      if _TMP_MARK in entry.name:
        logging.warning("Deleting %s: an unfinished save (never committed).", entry)
        entry.rmtree()
      elif entry.name.isdigit() and entry.is_dir():
        if missing := _missing_markers(entry):
          _move_aside(entry, self._aside, "incomplete, without " + ", ".join(missing))

  def move_aside(self, step: int, reason: str) -> None:
    """Move step `step` to <workdir>/checkpoints_aside, out of the kept set."""
    if jax.process_index() == 0:
      _move_aside(epath.Path(self.directory) / str(step), self._aside, reason)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"checkpoints: step {step} moved aside")
    self._manager.reload()

  def committed_steps(self) -> list[int]:
    """The complete steps on disk (the manager also counts a save still in flight)."""
    root = epath.Path(self.directory)
    return sorted(int(e.name) for e in (root.iterdir() if root.exists() else ())
                  if e.name.isdigit() and not _missing_markers(e))

  def steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  # ------------------------------------------------------------------- saving
  def due(self, step: int) -> bool:
    """Whether the save schedule wants `step` (the first step of a run always is)."""
    return self._manager.should_save(step)

  def save(self, step: int, state: Any, data_iterator: Any, config: dict) -> None:
    """Start saving `step` (async unless configured otherwise)."""
    self.check_for_errors()
    try:
      self._manager.save(step, force=True, args=ocp.args.Composite(
          state=ocp.args.PyTreeSave(state),
          data=grain.checkpoint.CheckpointSave(data_iterator),
          config=ocp.args.JsonSave(config),
          checksums=ocp.args.JsonSave(checksums(state))))
    except Exception as error:
      self._fail(error)

  def check_for_errors(self) -> None:
    """CheckpointSaveError if a background save failed (cheap: call it every step)."""
    try:
      self._manager.check_for_errors()
    except Exception as error:
      self._fail(error)

  def _remove_unfinished(self) -> bool:
    """Delete the temporary directories of unfinished saves, freeing the space they
    hold (process 0; best effort). Whether there were any."""
    root = epath.Path(self.directory)
    found = False
    if jax.process_index() == 0 and root.exists():
      for entry in root.iterdir():
        if _TMP_MARK in entry.name:
          found = True
          try:
            entry.rmtree(missing_ok=True)
          except OSError as cleanup_error:  # e.g. read-only: the next start removes it
            logging.warning("Could not remove %s: %s", entry, cleanup_error)
    return found

  def _fail(self, error: Exception) -> None:
    self._failed = True
    self._remove_unfinished()
    committed = self.committed_steps()
    kept = (f"The last committed step, {committed[-1]}, is intact" if committed else
            "No step was committed yet")
    raise CheckpointSaveError(f"Saving a checkpoint in {self.directory} failed: "
                              f"{_one_line(error)}. {kept}; fix the cause and rerun.") from error

  def wait(self) -> None:
    try:
      self._manager.wait_until_finished()
    except Exception as error:
      self._fail(error)

  def close(self) -> None:
    """Wait for the save in flight, then release the manager's threads."""
    try:
      self.wait()
    finally:
      self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc, traceback):
    if exc_type is None:
      self.close()
      return
    try:  # already failing: release everything, but report the first error only
      self.close()
    except Exception as error:  # pylint: disable=broad-except
      logging.warning("While stopping after an error: %s", _one_line(error))
    if self._failed:
      # Writes of the failed save still in flight in TensorStore's own threads can
      # recreate its temporary directory after `_fail` removed it: remove it until two
      # checks in a row find none, so the failed run frees its space.
      clean, deadline = 0, time.monotonic() + 10
      while clean < 2 and time.monotonic() < deadline:
        clean = 0 if self._remove_unfinished() else clean + 1
        time.sleep(0.25)

  # ---------------------------------------------------------------- restoring
  def restore_latest(self, abstract_state: Any, data_iterator: Any, config: dict,
                     restart_data: bool = False) -> Optional[Any]:
    """The newest step that restores intact, placed as `abstract_state` says (the data
    iterator is set in place), or None when there is no checkpoint. Steps newer than
    it that failed are moved aside. CheckpointMismatchError if the newest readable step
    belongs to another config: that is the user's call, not damage."""
    failures, state = [], None
    for step in reversed(self.steps()):
      try:
        state, why = self._restore_checked(step, abstract_state, data_iterator, config,
                                           restart_data), None
      except _Damaged as error:
        why = str(error)
      if not _all_processes_agree(why is None):
        failures.append((step, why or "it does not restore on another process"))
        continue
      for bad, reason in failures:
        self.move_aside(bad, reason)
      if failures:
        logging.warning("Resuming from step %d, the newest step that restores intact.",
                        step)
      return state
    if failures:
      raise CheckpointRestoreError(
          f"No checkpoint in {self.directory} restores: " +
          "; ".join(f"step {s}: {why}" for s, why in failures) +
          f". Nothing was moved. To start afresh, move {self.directory} away.")
    return None

  def _restore_checked(self, step, abstract_state, data_iterator, config, restart_data):
    step_dir = epath.Path(self.directory) / str(step)
    small_items = dict(config=ocp.args.JsonRestore())
    if (step_dir / "checksums").exists():  # steps saved before checksums have none
      small_items["checksums"] = ocp.args.JsonRestore()
    try:
      saved = self._manager.restore(step, args=ocp.args.Composite(**small_items))
      saved_config, saved_sums = saved.config, saved.get("checksums")
      saved_shapes = _saved_shapes(self._manager.item_metadata(step)["state"])
    except Exception as error:
      raise _Damaged(f"its config or metadata cannot be read ({_one_line(error)})") from error
    self.check_compatible(step, abstract_state, config, saved_config, saved_shapes)
    items = dict(state=_restore_args(abstract_state))
    if self._has_data_position(step):
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    elif restart_data:
      logging.warning("Step %d has no data position for %d processes: the data stream "
                      "starts afresh (checkpoint.restart_data=True).", step,
                      jax.process_count())
    else:
      raise CheckpointMismatchError(
          f"Step {step} in {self.directory} has no data position for this run's "
          f"{jax.process_count()} processes (a missing file, or a run saved by another "
          "number of processes). Rerun with --config.checkpoint.restart_data=True to "
          "resume the state and start the data stream afresh.")
    try:
      state = self._manager.restore(step, args=ocp.args.Composite(**items)).state
    except Exception as error:
      raise _Damaged(f"its arrays cannot be read ({_one_line(error)})") from error
    _verify(step, state, saved_sums)
    logging.info("Restored step %d from %s", step, self.directory)
    return state

  def _has_data_position(self, step: int) -> bool:
    """grain writes one file per process: data/process_<i>-of-<count>.json."""
    name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    return (epath.Path(self.directory) / str(step) / "data" / name).exists()

  def check_compatible(self, step: int, abstract_state: Any, config: dict,
                       saved_config: dict, saved_shapes: dict) -> None:
    """CheckpointMismatchError saying what differs, before any array is read: settings
    resume_rules refuses to change, and array shapes."""
    problems = [f"config {line}" for line in
                resume_rules.refused_changes(saved_config, config)]
    wanted = {_path_str(p): tuple(x.shape) for p, x in
              jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
    params_first = lambda name: (not name.startswith("params."), name)
    for name in sorted(set(saved_shapes) | set(wanted), key=params_first):
      if saved_shapes.get(name) != wanted.get(name):
        problems.append(f"{name}: checkpoint {saved_shapes.get(name, 'missing')}, "
                        f"this run {wanted.get(name, 'missing')}")
    if problems:
      shown = problems[:12] + ([f"... and {len(problems) - 12} more"] if len(problems) > 12 else [])
      hint = "Use another --workdir, or the config the checkpoint was written with."
      changed = [f"{key} ({json.dumps(old)} -> {json.dumps(new)})" for key, old, new in
                 resume_rules.changes(saved_config, config)]
      if changed and not problems[0].startswith("config "):
        # Arrays differ though no refused setting changed: one of these did it.
        hint = (f"Settings changed since the checkpoint: {', '.join(changed[:8])}. One of "
                f"them changes the saved state's arrays: set it back. {hint}")
      kron = config.get("optimizer", {}).get("kron", {})
      if kron.get("shard_local") and any(p.startswith("opt_state.") for p in problems):
        hint = ("optimizer.kron.shard_local=True cuts the PSGD factors by the mesh, so they "
                "fit only a mesh that cuts the parameters as the checkpoint's did. Resume on "
                "that mesh, or start another --workdir from this run's parameters with "
                f"--config.checkpoint.init_from={os.path.dirname(self.directory)} "
                "--config.checkpoint.init_what=params.")
      raise CheckpointMismatchError(
          f"The checkpoint at {self.directory} (step {step}) does not match this run's "
          "config:\n  " + "\n  ".join(shown) + "\n" + hint)


def _missing_markers(step_dir: epath.Path) -> list[str]:
  return [m for m in _COMPLETE_MARKERS if not (step_dir / m).exists()]


def _move_aside(step_dir: epath.Path, aside: epath.Path, reason: str) -> None:
  target = aside / f"{step_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}"
  aside.mkdir(parents=True, exist_ok=True)
  step_dir.rename(target)
  logging.warning("Moved checkpoint step %s aside to %s: %s", step_dir.name, target, reason)


def _one_line(error: BaseException) -> str:
  text = " ".join(str(error).split()) or type(error).__name__
  return text if len(text) <= 600 else text[:597] + "..."


def _restore_args(abstract: Any) -> ocp.args.PyTreeRestore:
  """Restore `abstract`'s arrays, placed as its shardings say; saved arrays it does not
  name (retired fields, or the parts a reader does not want) are left unread."""
  return ocp.args.PyTreeRestore(
      item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
      partial_restore=True)


def _saved_shapes(metadata: Any) -> dict[str, tuple]:
  """Saved-array name -> shape, from a step's state metadata (retired fields left out)."""
  shapes = {_path_str(path): tuple(leaf.shape) for path, leaf in
            jax.tree_util.tree_flatten_with_path(metadata)[0]}
  return {name: shape for name, shape in shapes.items()
          if name.split(".")[0] not in _RETIRED}


def _verify(step: int, restored: Any, saved_sums: Optional[dict]) -> None:
  """_Damaged unless every restored array matches the checksum saved with it."""
  if saved_sums is None:
    logging.warning("Step %d was saved without checksums (an older version): not "
                    "verified.", step)
    return
  bad = sorted(name for name, value in checksums(restored).items()
               if saved_sums.get(name) != value)
  if bad:
    raise _Damaged(f"checksum mismatch in {len(bad)} array(s): {', '.join(bad[:4])}")


def _check_shapes(step: int, wanted: dict, metadata: Any, directory: str) -> None:
  """CheckpointMismatchError unless every wanted array is saved, with its shape."""
  saved = _saved_shapes(metadata)
  problems = [f"{name}: checkpoint {saved.get(name, 'missing')}, wanted {tuple(x.shape)}"
              for name, x in ((_path_str(p), x) for p, x in
                              jax.tree_util.tree_flatten_with_path(wanted)[0])
              if saved.get(name) != tuple(x.shape)]
  if problems:
    raise CheckpointMismatchError(
        f"Step {step} in {directory} does not hold the arrays of this config: " +
        "; ".join(problems[:6]) + (f"; ... {len(problems) - 6} more" if len(problems) > 6
                                   else "") +
        ". Read it with the config it was written with.")


def _checkpoints_dir(path: str) -> str:
  """The checkpoints directory of a workdir, or `path` itself if it is one: named
  checkpoints, with no checkpoints directory inside (a workdir may be named so too)."""
  inside = os.path.join(path, "checkpoints")
  if os.path.basename(path.rstrip("/")) == "checkpoints" and not epath.Path(inside).exists():
    return path
  return inside


def read_verified(path: str, wanted: dict, step: Optional[int] = None) -> tuple[int, dict]:
  """(step, arrays) of the newest complete step of a run whose `wanted` parts restore
  and match their checksums, or of `step` only. Reads and never writes: steps that fail
  are skipped with a warning, not moved, and a save in flight is not seen.

  Args:
    path: a run's workdir, or its checkpoints directory.
    wanted: part of the run's state, by top-level field, as ShapeDtypeStructs carrying
      the shardings to restore to, e.g. {"params": abstract_params}.
    step: the step to read; None for the newest that restores intact.

  Raises CheckpointMismatchError when the steps hold other arrays or shapes than
  `wanted`, and CheckpointRestoreError naming each step tried and why it failed. On
  several processes, process 0's list of steps is used and a step counts only if it
  restores on every process.
  """
  directory = _checkpoints_dir(path)
  root = epath.Path(directory)
  complete = sorted((int(e.name) for e in (root.iterdir() if root.exists() else ())
                     if e.name.isdigit() and not _missing_markers(e)), reverse=True)
  if jax.process_count() > 1:  # one list for all, even while a save commits
    complete = [int(s) for s in multihost_utils.broadcast_one_to_all(
        np.array(complete + [-1] * (64 - len(complete)), np.int64)[:64]) if s >= 0]
  if step is not None:
    if step not in complete:
      raise CheckpointRestoreError(f"Step {step} is not a complete checkpoint in "
                                   f"{directory}; complete steps: {sorted(complete)}.")
    complete = [step]
  if not complete:
    raise CheckpointRestoreError(f"No complete checkpoint in {directory}.")
  failures = []
  options = ocp.CheckpointManagerOptions(read_only=True)
  handlers = dict(state=ocp.PyTreeCheckpointHandler(), checksums=ocp.JsonCheckpointHandler())
  with ocp.CheckpointManager(directory, options=options, item_handlers=handlers) as manager:
    for candidate in complete:
      try:
        _check_shapes(candidate, wanted, manager.item_metadata(candidate)["state"],
                      directory)
        items = dict(state=_restore_args(wanted))
        if (root / str(candidate) / "checksums").exists():
          items["checksums"] = ocp.args.JsonRestore()
        restored = manager.restore(candidate, args=ocp.args.Composite(**items))
        _verify(candidate, restored.state, restored.get("checksums"))
        why = None
      except CheckpointMismatchError:
        raise
      except Exception as error:  # pylint: disable=broad-except
        why = _one_line(error)
      if not _all_processes_agree(why is None):
        failures.append((candidate, why or "it does not restore on another process"))
        logging.warning("Skipping checkpoint step %d of %s: %s", candidate, directory,
                        failures[-1][1])
        continue
      logging.info("Read %s of step %d from %s", sorted(wanted), candidate, directory)
      return candidate, restored.state
  raise CheckpointRestoreError(f"No checkpoint in {directory} restores: " + "; ".join(
      f"step {s}: {why}" for s, why in failures) + ".")


def _preemption_service_running() -> bool:
  """Whether jax.distributed started JAX's preemption sync service (multi-process runs,
  unless jax_enable_preemption_service is off): it catches SIGTERM itself."""
  return (jax.distributed.is_initialized() and
          bool(jax.config.jax_enable_preemption_service))


class StopSignals:
  """SIGTERM (schedulers, TPU maintenance) and SIGINT (Ctrl-C) ask for a save-and-exit;
  a second Ctrl-C aborts at once.

  `requested(step)` tells every process at the same step whether any of them was
  signalled, so all save that step. Multi-process runs agree through JAX's preemption
  sync service (`multihost_utils.reached_preemption_sync_point`): a host-side protocol
  that runs only once a signal arrives, so a step pays no collective for it. It counts
  the calls since this run started (a notice that comes before the first one syncs at
  the first), so it is given the steps since `start_step`. The service catches SIGTERM
  itself; Ctrl-C is passed on to it as a SIGTERM to this process. Use as a context
  manager: the previous handlers come back on exit.
  """

  _NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT"}

  def __init__(self, start_step: int = 0):
    self.received: Optional[int] = None
    self._start_step = start_step
    self._previous = {}
    self._synced = jax.process_count() > 1 and _preemption_service_running()

  def __enter__(self):
    for signum in self._NAMES:
      if not (self._synced and signum == signal.SIGTERM):
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)

  def _handle(self, signum, frame):
    del frame
    if signum == signal.SIGINT and self.received == signal.SIGINT:
      raise KeyboardInterrupt  # asked twice: stop without saving
    self.received = signum
    if signum == signal.SIGINT:
      logging.warning("Ctrl-C: saving this step, then stopping (again to abort).")
      if self._synced:  # the preemption service tells the other processes
        os.kill(os.getpid(), signal.SIGTERM)

  def requested(self, step: int) -> Optional[str]:
    """'SIGTERM' or 'SIGINT' once any process got one, else None; multi-process runs
    call it at every step, the same steps on every process."""
    if self._synced:
      if not multihost_utils.reached_preemption_sync_point(step - self._start_step):
        return None
      return self._NAMES[self.received or signal.SIGTERM]
    code = np.int32(self.received or 0)
    if jax.process_count() > 1:  # without the service: every process's flag, gathered
      code = multihost_utils.process_allgather(code).max()
    return self._NAMES.get(int(code))
