"""Bad input is refused before anything is built or compiled, naming the setting."""

import dataclasses
import re
import subprocess
import sys
import textwrap

import jax
import pytest

from configs import common
from models import transformer
from trainer import main as trainer_main
from trainer import setup as setup_lib
from trainer import validate
from trainer.data import splits
from trainer_utils import REPO, tiny_config, trainer_command, trainer_env

NAN, INF = float("nan"), float("inf")


def _set(config, dotted: str, value):
  *sections, key = dotted.split(".")
  for section in sections:
    config = config[section]
  config[key] = value


def _refused(config, workdir, setting: str):
  """train() raises naming `setting`, and nothing was built: no checkpoint directory."""
  with pytest.raises(ValueError, match=re.escape(setting)) as error:
    trainer_main.train(config, str(workdir), devices=jax.devices()[:1])
  assert not (workdir / "checkpoints").exists()
  return str(error.value)


@pytest.mark.parametrize("setting, value", [
    ("train.steps", 0),
    ("train.steps", -3),
    ("train.log_every", 0),
    ("train.eval_every", -1),
    ("train.max_nonfinite_steps", 0),
    ("train.global_batch_size", 0),
    ("train.stop_at", -1),
    ("checkpoint.save_every", 0),
    ("checkpoint.keep_every", 0),
    ("checkpoint.init_what", "param"),
    ("data.seq_len", 0),
    ("data.eval_batches", 0),
    ("data.source", "file"),
    ("optimizer.learning_rate", NAN),
    ("optimizer.weight_decay", INF),  # any number anywhere in the config
    ("optimizer.kron.preconditioner_lr", -INF),
    ("optimizer.kron.mu_dtype", "bf16"),  # psgd.kron's own checks, named as settings
    ("optimizer.kron.precond_update_precision", "bf16"),
    ("optimizer.b1", 1.5),
    ("train.peak_flops_per_device", NAN),
    ("train.peak_flops_per_device", -1.0),
    ("train.stop_at", 41),  # tiny_config's steps are 40
    ("checkpoint.keep_every", 15),  # not a multiple of save_every=10: never saved
    ("checkpoint.max_to_keep", 1),  # no fallback when the one kept step is damaged
    ("train.microbatches", 0),
    ("data.shuffle_seed", -1),
    ("data.tfds_name", "lm1b"),  # set, but data.source='stdlib' does not read it
    ("data.files_glob", "corpus/*.txt"),
    ("optimizer.grad_clip_norm", -1.0),  # would flip the gradients' sign
    ("optimizer.min_lr_ratio", -1.0),  # would make the learning rate negative
    ("optimizer.b2", 1.5),
    ("optimizer.muon.consistent_rms", -1.0),
    ("optimizer.kron.update_prob_floor", 2.0),  # psgd's schedule, named as the setting
    ("optimizer.kron.update_prob_decay", -0.5),
])
def test_bad_setting_is_refused_naming_it(tmp_path, setting, value):
  config = tiny_config()
  _set(config, setting, value)
  message = _refused(config, tmp_path, f"{setting}=")
  assert "must" in message or "finite" in message  # says what to change


def test_edge_values_that_work_are_accepted():
  config = tiny_config()
  config.train.stop_at = config.train.steps  # stop (and save) at the last step
  config.train.eval_every, config.data.eval_batches = 0, 0  # no evals, so no eval batches
  config.checkpoint.max_to_keep = None  # keep them all
  validate.check_config(config)


def test_dry_run_gets_the_config_checks():
  config = tiny_config()
  config.data.seq_len = 0
  with pytest.raises(ValueError, match=re.escape("data.seq_len=")):
    setup_lib.build_setup(config, jax.devices()[:1], check_vocab=False)


def test_mesh_rules_naming_an_axis_the_mesh_lacks_are_refused():
  config = tiny_config()
  config.mesh.axes = ("data", "fsdp", "model")  # the rules map to 'tensor'
  with pytest.raises(ValueError, match=r"mesh\.rules maps 'vocab' to 'tensor'.*no axis"):
    setup_lib.build_setup(config, jax.devices()[:1], check_vocab=False)


def test_a_tokenizer_file_that_is_not_a_sentencepiece_model_is_refused(tmp_path):
  junk = tmp_path / "notes.txt"
  junk.write_text("not a model")
  config = tiny_config()
  config.data.tokenizer = str(junk)
  message = _refused(config, tmp_path / "run", "is not a SentencePiece .model file")
  assert str(junk) in message


def test_words_that_are_not_flags_are_refused(tmp_path):
  """MaxText style `train.steps=2` (no --config.) would otherwise be ignored."""
  result = subprocess.run([*trainer_command(tmp_path), "train.steps=2"], cwd=REPO,
                          env=trainer_env(), capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert "--config.train.steps=2" in result.stderr
  assert not (tmp_path / "checkpoints").exists()


def test_unwritable_workdir_is_refused(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("")  # a file where the workdir's parent directory should be
  _refused(tiny_config(), blocker / "run", "--workdir=")


def _corpus(root, validation_bytes: int | None, train_files: int = 3):
  """Text files under `root`: `train_files` in the train split and, unless None, one
  validation file of `validation_bytes` bytes (split_of decides by the path's hash)."""
  names = (f"doc{i}.txt" for i in range(10_000))
  wanted = {splits.TRAIN: train_files, splits.VALIDATION: int(validation_bytes is not None)}
  root.mkdir()
  for name in names:
    split = splits.split_of(name)
    if wanted[split]:
      wanted[split] -= 1
      size = 100 if split == splits.TRAIN else validation_bytes
      (root / name).write_bytes(b"x" * size)
    if not any(wanted.values()):
      return str(root / "*.txt")
  raise AssertionError("no names for the wanted splits")


def _files_config(pattern: str):
  config = tiny_config()
  config.data.update(dict(source="files", files_glob=pattern))
  return config


def test_files_glob_that_matches_nothing_is_refused(tmp_path):
  config = _files_config(str(tmp_path / "nowhere" / "*.txt"))
  message = _refused(config, tmp_path / "run", "data.files_glob=")
  assert "matches no files" in message


def test_empty_validation_split_is_refused(tmp_path):
  config = _files_config(_corpus(tmp_path / "corpus", validation_bytes=None))
  _refused(config, tmp_path / "run", "'validation' split of data.files_glob=")
  config.train.eval_every = 0  # no evals, no validation split needed
  validate.check_run(config, str(tmp_path / "run"))


def test_validation_split_must_hold_one_eval_batch(tmp_path):
  config = tiny_config()
  # The byte tokenizer gives a file of n bytes n + 1 tokens (EOS).
  batch_tokens = config.train.global_batch_size * (config.data.seq_len + 1)
  short = _files_config(_corpus(tmp_path / "short", validation_bytes=batch_tokens - 2))
  message = _refused(short, tmp_path / "run", "'validation' split of data.files_glob=")
  assert f"{batch_tokens - 1} tokens" in message and "train.eval_every=0" in message
  enough = _files_config(_corpus(tmp_path / "enough", validation_bytes=batch_tokens - 1))
  validate.check_run(enough, str(tmp_path / "run"))


def test_reading_any_config_file_loads_no_heavy_library():
  # configs/common.py is the schema and imports only ml_collections: a launcher or a
  # notebook can read a config without loading the trainer's libraries.
  script = textwrap.dedent("""
      import importlib.util, pathlib, sys
      for path in sorted(pathlib.Path("configs").glob("*.py")):
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if hasattr(module, "get_config"):
          module.get_config()
      heavy = ("jax", "flax", "orbax", "grain", "tensorflow_datasets", "optax", "trainer",
               "models", "psgd")
      print(sorted(name for name in sys.modules if name.split(".")[0] in heavy))
  """)
  result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip() == "[]"


def test_the_model_section_lists_every_transformer_setting():
  fields = {f.name for f in dataclasses.fields(transformer.TransformerConfig)}
  assert set(common.base_config().model.keys()) == fields | {"name"}
