"""Refuses a run that cannot work before anything is built or compiled.

Every message names the setting and says how to fix it. `check_config` looks at the
config alone (setup.build_setup calls it, so `--dry_run` gets it too); `check_run` adds
what a training run reads and writes: the workdir and the data splits.
"""

import math
import numbers
import os
import tempfile

import jax

from trainer import optim
from trainer.data import pipeline
from trainer.data.sources import open_split
from trainer.data.tokenizers import make_tokenizer

INIT_WHAT = ("params", "params_and_optimizer")
DATA_SOURCES = ("stdlib", "tfds", "files")


def _non_finite(value, path: str):
  """(dotted path, value) of every NaN or infinite number in a config (sub)tree."""
  if hasattr(value, "items"):
    for key, child in value.items():
      yield from _non_finite(child, f"{path}.{key}" if path else key)
  elif isinstance(value, (list, tuple)):
    for i, child in enumerate(value):
      yield from _non_finite(child, f"{path}[{i}]")
  elif isinstance(value, numbers.Real) and not math.isfinite(value):
    yield path, value


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise ValueError(message)


def _at_least(minimum: int, setting: str, value, fix: str) -> None:
  _require(value is not None and value >= minimum,
           f"{setting}={value!r} must be >= {minimum}: {fix}")


def check_config(config) -> None:
  """ValueError naming the first setting that cannot work, and the fix."""
  bad = next(_non_finite(config, ""), None)
  if bad:
    setting, value = bad
    raise ValueError(f"{setting}={value} is not a finite number: give it a finite value "
                     f"(--config.{setting}=...).")
  train, checkpoint, data = config.train, config.checkpoint, config.data

  _at_least(1, "train.steps", train.steps, "it is the run's length in steps.")
  _at_least(1, "train.global_batch_size", train.global_batch_size,
            "it is the number of rows per step.")
  _at_least(1, "train.microbatches", train.microbatches, "1 means no accumulation.")
  _at_least(1, "train.log_every", train.log_every, "log every N steps, e.g. 10.")
  _at_least(0, "train.eval_every", train.eval_every, "0 turns evaluation off.")
  _at_least(0, "train.stop_at", train.stop_at, "0 means run to train.steps.")
  _require(train.stop_at <= train.steps,
           f"train.stop_at={train.stop_at} must be at most train.steps={train.steps}: the "
           "run would end at train.steps without stopping there (0: run to the end).")
  _at_least(0, "train.peak_flops_per_device", train.peak_flops_per_device,
            "0 takes it from trainer/hardware.py's table.")
  # 0 would stop a healthy run: the count of skipped steps in a row is always >= 0.
  _at_least(1, "train.max_nonfinite_steps", train.max_nonfinite_steps,
            "the run stops after this many skipped (non-finite) steps in a row.")

  _at_least(1, "checkpoint.save_every", checkpoint.save_every, "save every N steps.")
  if checkpoint.max_to_keep is not None:
    # One kept step has no fallback when it turns out damaged or diverged.
    _at_least(2, "checkpoint.max_to_keep", checkpoint.max_to_keep, "None keeps them all.")
  if checkpoint.keep_every is not None:
    _at_least(1, "checkpoint.keep_every", checkpoint.keep_every,
              "None keeps only the latest checkpoint.max_to_keep.")
    # Only saved steps can be kept: any other keep_every keeps every lcm(both)-th step.
    _require(checkpoint.keep_every % checkpoint.save_every == 0,
             f"checkpoint.keep_every={checkpoint.keep_every} must be a multiple of "
             f"checkpoint.save_every={checkpoint.save_every}: only saved steps can be kept.")
  _require(checkpoint.init_what in INIT_WHAT,
           f"checkpoint.init_what={checkpoint.init_what!r} must be one of "
           f"{', '.join(map(repr, INIT_WHAT))}.")

  _at_least(1, "data.seq_len", data.seq_len, "it is the number of tokens per row.")
  if train.eval_every:
    _at_least(1, "data.eval_batches", data.eval_batches,
              "batches per eval; train.eval_every=0 turns evaluation off.")
  _require(data.source in DATA_SOURCES,
           f"data.source={data.source!r} must be one of {', '.join(map(repr, DATA_SOURCES))}.")
  _require(data.source != "files" or data.files_glob,
           "data.source='files' needs data.files_glob, e.g. '~/corpus/**/*.txt'.")
  _require(data.source != "tfds" or data.tfds_name,
           "data.source='tfds' needs data.tfds_name, e.g. 'lm1b' or 'c4/en'.")
  for setting, source in (("tfds_name", "tfds"), ("files_glob", "files")):
    _require(data.source == source or not data[setting],
             f"data.{setting}={data[setting]!r} must be empty unless data.source={source!r} "
             f"(it is {data.source!r}, which does not read it): add "
             f"--config.data.source={source}, or drop data.{setting}.")
  _require(0 <= data.shuffle_seed < 2**32,
           f"data.shuffle_seed={data.shuffle_seed} must be in [0, 2**32).")

  optim.check_config(config.optimizer)


def check_run(config, workdir: str) -> None:
  """check_config, then the workdir and this process's share of the data splits."""
  check_config(config)
  _check_workdir(workdir)
  check_data(config, jax.process_index(), jax.process_count())


def _check_workdir(workdir: str) -> None:
  """Create the workdir and a file in it, as the run will; remote URLs are not probed."""
  if "://" in workdir:
    return
  try:
    os.makedirs(workdir, exist_ok=True)
    with tempfile.TemporaryFile(dir=workdir):
      pass
  except OSError as e:
    raise ValueError(f"--workdir={workdir!r} cannot be written ({e}): pick a directory "
                     "you can write, or fix its permissions.") from e


def _split_name(data, setting: str) -> str:
  """How a user names a split in the config, for messages."""
  split = data[setting]
  if data.source == "files":
    return f"the {split!r} split of data.files_glob={data.files_glob!r}"
  if data.source == "tfds":
    return f"data.{setting}={split!r} of data.tfds_name={data.tfds_name!r}"
  return f"data.{setting}={split!r} of data.source={data.source!r}"


def _open(data, setting: str):
  try:
    return open_split(data, data[setting])
  except (KeyError, ValueError, OSError) as e:  # an unknown split, a missing dataset
    raise ValueError(f"Cannot open {_split_name(data, setting)} ({e!r}). The stdlib and "
                     "files sources have the splits 'train' and 'validation'; a TFDS dataset "
                     "must be prepared in data.data_dir.") from e


def check_data(config, process_index: int, process_count: int) -> None:
  """The train split has documents for this process; with evals on, the validation
  split holds at least one full eval batch for it (a smaller one would be mostly
  padding, and its loss mostly noise)."""
  data = config.data
  train_docs = pipeline.process_shard(_open(data, "train_split"), process_index,
                                      process_count)
  if len(train_docs) == 0:
    if data.source == "files" and not len(_open(data, "eval_split")):
      raise ValueError(f"data.files_glob={data.files_glob!r} matches no files: fix the "
                       "pattern ('**' matches any depth of directories).")
    raise ValueError(f"{_split_name(data, 'train_split')} has no documents for process "
                     f"{process_index} of {process_count}: use a larger corpus.")
  tokenize = pipeline.Tokenize(make_tokenizer(data.tokenizer), data.text_key)
  first = train_docs[0]
  _require(data.text_key in first,
           f"data.text_key={data.text_key!r} is not a field of the records of "
           f"{_split_name(data, 'train_split')}; they have {sorted(first)}.")
  if not config.train.eval_every:
    return

  rows = max(config.train.global_batch_size // process_count, 1)
  needed = rows * (data.seq_len + 1)
  tokens = 0
  for doc in pipeline.process_shard(_open(data, "eval_split"), process_index,
                                    process_count):
    tokens += len(tokenize.map(doc))
    if tokens >= needed:
      return
  raise ValueError(
      f"{_split_name(data, 'eval_split')} holds {tokens} tokens for process "
      f"{process_index} of {process_count}, less than one eval batch of {rows} rows of "
      f"data.seq_len + 1 = {data.seq_len + 1} tokens. Use a larger validation split, a "
      "smaller data.seq_len or train.global_batch_size, or train.eval_every=0.")
