"""Resume refuses the config changes that change what the saved state means, and takes
the rest: one case per row of trainer/resume_rules.RULES, then through the trainer."""

import json
import logging
import pathlib
import shutil

import jax
import pytest

from trainer import checkpoint as checkpoint_lib
from trainer import main as trainer_main
from trainer import resume_rules
from trainer_utils import tiny_config

# Rule row -> (a key it covers, a new value, whether a resume must refuse the change).
# Written out here, not derived from the table, so a wrong row fails its case.
CASES = {
    "seed": ("seed", 7, False),
    "mesh": ("mesh.shape", [1, 1, 1], False),
    "model": ("model.d_model", 64, True),
    "model.remat": ("model.remat", "full", False),
    "model.unroll_layers": ("model.unroll_layers", True, False),
    "model.dtype": ("model.dtype", "bfloat16", False),
    "optimizer": ("optimizer.learning_rate", 1e-4, False),
    "optimizer.name": ("optimizer.name", "adamw", True),
    "optimizer.kron.preconditioner_mode": ("optimizer.kron.preconditioner_mode", "PRO4P",
                                           True),
    "optimizer.kron.max_size_triangular": ("optimizer.kron.max_size_triangular", 16, False),
    "optimizer.kron.max_skew_triangular": ("optimizer.kron.max_skew_triangular", 2.0, False),
    "optimizer.kron.max_size_small_dim": ("optimizer.kron.max_size_small_dim", 0, False),
    "optimizer.kron.max_skew_small_dim": ("optimizer.kron.max_skew_small_dim", 1.0, False),
    "optimizer.kron.memory_save_mode": ("optimizer.kron.memory_save_mode", "one_diag", False),
    "optimizer.kron.block_size": ("optimizer.kron.block_size", 64, True),
    "optimizer.kron.merge_dims": ("optimizer.kron.merge_dims", False, True),
    "optimizer.kron.shard_local": ("optimizer.kron.shard_local", True, True),
    "optimizer.kron.cache_preconditioner": ("optimizer.kron.cache_preconditioner", True,
                                            True),
    "optimizer.kron.mu_dtype": ("optimizer.kron.mu_dtype", "bfloat16", True),
    "optimizer.kron.precond_dtype": ("optimizer.kron.precond_dtype", "bfloat16", True),
    "data": ("data.shuffle_seed", 1, True),
    "data.data_dir": ("data.data_dir", "/elsewhere/tfds", False),
    "data.eval_split": ("data.eval_split", "test", False),
    "data.eval_batches": ("data.eval_batches", 4, False),
    "train": ("train.steps", 999, False),
    "train.global_batch_size": ("train.global_batch_size", 64, True),
    "checkpoint": ("checkpoint.save_every", 7, False),
    "distributed": ("distributed.mode", "off", False),
    "dry_run": ("dry_run.topology", "v5p:2x2x2", False),
}


def _config_dict(config) -> dict:
  return json.loads(config.to_json_best_effort())


def _changed(config: dict, key: str, value) -> dict:
  changed = json.loads(json.dumps(config))
  *sections, last = key.split(".")
  node = changed
  for section in sections:
    node = node[section]
  assert last in node, key  # the case must name a real setting
  node[last] = value
  return changed


def test_every_rule_has_a_case():
  assert sorted(CASES) == sorted(rule.key for rule in resume_rules.RULES)


@pytest.mark.parametrize("row", sorted(CASES))
def test_rule_row(row):
  key, value, refused = CASES[row]
  saved = _config_dict(tiny_config())
  problems = resume_rules.refused_changes(saved, _changed(saved, key, value))
  if refused:
    old = resume_rules.changes(saved, _changed(saved, key, value))[0][1]
    assert len(problems) == 1
    assert problems[0].startswith(f"{key}: checkpoint has {json.dumps(old)}, this run has "
                                  f"{json.dumps(value)} (")
  else:
    assert problems == []


def test_keys_of_no_known_section_are_refused_and_added_keys_are_not_compared():
  saved = _config_dict(tiny_config())
  assert resume_rules.rule_for("brand_new.setting").resumable is False
  newer = {**saved, "train": {**saved["train"], "added_later": 3}}
  assert resume_rules.refused_changes(saved, newer) == []


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("saved")
  trainer_main.train(tiny_config(steps=4, eval_every=0), str(workdir),
                     devices=jax.devices()[:1])
  return workdir


def _resume(saved_run, tmp_path, **changes):
  workdir = tmp_path / "run"
  shutil.copytree(saved_run, workdir)
  config = tiny_config(steps=6, eval_every=0)
  for key, value in changes.items():
    *sections, name = key.split(".")
    node = config
    for part in sections:
      node = node[part]
    node[name] = value
  return trainer_main.train(config, str(workdir), devices=jax.devices()[:1]), workdir


@pytest.mark.parametrize("key, value", [
    ("optimizer.kron.preconditioner_mode", "PRO4P"),
    ("data.shuffle_seed", 1),
])
def test_resume_refuses_a_change_that_changes_the_saved_state(saved_run, tmp_path, key,
                                                               value):
  with pytest.raises(checkpoint_lib.CheckpointMismatchError, match=key):
    _resume(saved_run, tmp_path, **{key: value})
  assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["1", "4"]


def test_a_run_resumed_with_fewer_steps_than_it_took_is_refused(saved_run, tmp_path):
  """It would otherwise do nothing, exit 0 and record the shorter train.steps."""
  saved_config = (saved_run / "config.json").read_text()
  with pytest.raises(ValueError, match=r"train\.steps=3 is below step 4"):
    _resume(saved_run, tmp_path, **{"train.steps": 3})
  assert (tmp_path / "run" / "config.json").read_text() == saved_config
  assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["1", "4"]


def test_resume_takes_a_new_learning_rate(saved_run, tmp_path, caplog):
  caplog.set_level(logging.INFO)
  (state, _), _ = _resume(saved_run, tmp_path, **{"optimizer.learning_rate": 1e-3})
  assert "Starting at step 4 of 6" in caplog.text and int(state.step) == 6


def test_resume_takes_weight_decay_switched_off(saved_run, tmp_path, caplog):
  """psgd.kron keeps its state's structure when weight decay is off."""
  caplog.set_level(logging.INFO)
  (state, _), _ = _resume(saved_run, tmp_path, **{"optimizer.weight_decay": 0.0})
  assert "Starting at step 4 of 6" in caplog.text and int(state.step) == 6


def test_a_resumable_setting_that_changes_the_arrays_is_named(saved_run, tmp_path):
  """No momentum (b1=0, so no Nesterov look-ahead either) leaves Kron without its
  momentum arrays: the rules let b1 change, so the refusal names what changed."""
  with pytest.raises(checkpoint_lib.CheckpointMismatchError,
                     match=r"opt_state\..*missing(.|\n)*changed since the checkpoint: "
                           r"optimizer\.b1 \(0\.9 -> 0\.0\)"):
    _resume(saved_run, tmp_path, **{"optimizer.b1": 0.0, "optimizer.kron.nesterov": False})


def test_a_layout_setting_that_turns_no_factor_resumes(saved_run, tmp_path, caplog):
  """No dim of the tiny model exceeds 4096, so this bound changes no factor (as a new
  library default may not): the run resumes."""
  caplog.set_level(logging.INFO)
  (state, _), _ = _resume(saved_run, tmp_path, **{"optimizer.kron.max_size_triangular": 4096})
  assert "Starting at step 4 of 6" in caplog.text and int(state.step) == 6


def test_a_layout_setting_that_turns_a_factor_is_refused_by_its_shapes(saved_run, tmp_path):
  """Skew 1 makes the wide side of the 32 x 64 MLP matrices diagonal: (blocks, 64, 64)
  saved, (blocks, 64) now. The refusal names the setting and loses no checkpoint."""
  with pytest.raises(checkpoint_lib.CheckpointMismatchError,
                     match=r"opt_state\..*\(2, 64, 64\), this run \(2, 64\)(.|\n)*changed "
                           r"since the checkpoint: optimizer\.kron\.max_skew_small_dim "
                           r"\(4\.0 -> 1\.0\)"):
    _resume(saved_run, tmp_path, **{"optimizer.kron.max_skew_small_dim": 1.0})
  assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["1", "4"]


def test_a_missing_data_position_is_an_error_unless_restart_data(saved_run, tmp_path,
                                                                 caplog):
  workdir = tmp_path / "run"
  shutil.copytree(saved_run, workdir)
  for path in (workdir / "checkpoints" / "4" / "data").glob("process_*.json"):
    path.unlink()
  config = tiny_config(steps=6, eval_every=0)
  with pytest.raises(checkpoint_lib.CheckpointMismatchError,
                     match="checkpoint.restart_data=True"):
    trainer_main.train(config, str(workdir), devices=jax.devices()[:1])
  config.checkpoint.restart_data = True
  caplog.set_level(logging.INFO)
  state, _ = trainer_main.train(config, str(workdir), devices=jax.devices()[:1])
  assert "data stream starts afresh" in caplog.text and int(state.step) == 6
  assert pathlib.Path(workdir, "checkpoints", "6").is_dir()
