"""Which config changes a checkpoint survives: the one table resume consults.

A run resumed with a changed config either means the same saved state (a new learning
rate, a longer schedule, another mesh) or silently reinterprets it (PSGD factors read as
another mode's, a data position applied to another shuffle). The table says which, per
setting; the most specific entry wins, so a section's rule covers every key under it
unless a key has a rule of its own.
"""

import json
from typing import Any, NamedTuple


class Rule(NamedTuple):
  key: str  # a dotted config key, or a section covering every key under it
  resumable: bool  # may differ between the checkpoint and the resuming run
  why: str


_SHAPES_SHOW_DENSE = "it decides which factors are dense, which their saved shapes show"

RULES = (
    Rule("seed", True, "a resume restores the RNG; the seed only sets a fresh init"),
    Rule("mesh", True, "the saved state is resharded onto the new mesh"),
    Rule("model", False, "it changes the parameters' shapes or what they compute"),
    Rule("model.remat", True, "recomputation changes memory and speed, not results"),
    Rule("model.unroll_layers", True, "a loop or one program per layer: the same "
         "parameters and results"),
    Rule("model.dtype", True, "the compute dtype: parameters are stored in float32"),
    Rule("optimizer", True, "a hyperparameter of the update (lr, schedule, decay, "
         "clipping)"),
    Rule("optimizer.name", False, "the optimizer state belongs to one optimizer"),
    Rule("optimizer.kron.preconditioner_mode", False,
         "modes store Q or P itself: the saved factors mean something else in another"),
    # A dense factor is saved as (blocks, d, d), a diagonal one as (blocks, d): the shape
    # check refuses a change that turns a factor, and a run whose factors all stay as
    # they were (a new library default with the same layout) resumes.
    Rule("optimizer.kron.max_size_triangular", True, _SHAPES_SHOW_DENSE),
    Rule("optimizer.kron.max_skew_triangular", True, _SHAPES_SHOW_DENSE),
    Rule("optimizer.kron.max_size_small_dim", True, _SHAPES_SHOW_DENSE),
    Rule("optimizer.kron.max_skew_small_dim", True, _SHAPES_SHOW_DENSE),
    Rule("optimizer.kron.memory_save_mode", True, _SHAPES_SHOW_DENSE),
    Rule("optimizer.kron.block_size", False, "it decides how parameters split into blocks"),
    Rule("optimizer.kron.merge_dims", False, "it decides how many factors a parameter has"),
    Rule("optimizer.kron.shard_local", False, "it decides how parameters split into blocks"),
    Rule("optimizer.kron.cache_preconditioner", False, "it decides whether P is stored"),
    Rule("optimizer.kron.mu_dtype", False, "the stored momentum's dtype"),
    Rule("optimizer.kron.precond_dtype", False, "the stored factors' dtype"),
    Rule("data", False, "the saved data position points into this exact stream"),
    Rule("data.data_dir", True, "the same prepared data, found elsewhere"),
    Rule("data.eval_split", True, "evaluation only"),
    Rule("data.eval_batches", True, "evaluation only"),
    Rule("train", True, "the run's length, cadence and limits"),
    Rule("train.global_batch_size", False, "the saved data position counts batches of "
         "this size"),
    Rule("checkpoint", True, "where and how often to save"),
    Rule("distributed", True, "how processes find each other"),
    Rule("dry_run", True, "pre-launch checks only"),
)
_BY_KEY = {rule.key: rule for rule in RULES}


def rule_for(key: str) -> Rule:
  """The most specific rule covering dotted `key`; a key of no known section is
  refused, so a new setting is never resumed across by accident."""
  parts = key.split(".")
  for end in range(len(parts), 0, -1):
    rule = _BY_KEY.get(".".join(parts[:end]))
    if rule is not None:
      return rule
  return Rule(key, False, "no rule in trainer/resume_rules.py covers it")


def _flatten(config: dict, prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in config.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def changes(saved: dict, current: dict) -> list[tuple[str, Any, Any]]:
  """(key, saved value, current value) of every setting the two configs both have and
  that differs. Keys only one of them has (added or removed since the save) are not
  compared."""
  old, new = _flatten(saved), _flatten(current)
  return [(key, old[key], new[key]) for key in sorted(old.keys() & new.keys())
          if old[key] != new[key]]


def refused_changes(saved: dict, current: dict) -> list[str]:
  """One line per setting whose change the checkpoint cannot survive."""
  return [f"{key}: checkpoint has {json.dumps(old)}, this run has {json.dumps(new)} "
          f"({rule.why})" for key, old, new in changes(saved, current)
          if not (rule := rule_for(key)).resumable]
