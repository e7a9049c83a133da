"""Opens the configured corpus as split name -> random-access data source."""

import functools
import os

import tensorflow_datasets as tfds

from trainer.data.stdlib_corpus import load_stdlib_corpus
from trainer.data.text_files import text_file_splits


def open_split(data_config, split: str):
  """The `split` of config.data's source: 'stdlib', 'tfds' or 'files'.

  'tfds' reads an already prepared array_record dataset (e.g. lm1b, c4/en) from data_dir;
  nothing is downloaded. The stdlib and files sources name their splits 'train' and
  'validation'. Opened once per process: every eval reuses the source.
  """
  return _open(data_config.source, os.path.expanduser(data_config.data_dir),
               data_config.tfds_name, data_config.files_glob, split)


@functools.lru_cache(maxsize=16)
def _open(source: str, data_dir: str, tfds_name: str, files_glob: str, split: str):
  if source == "stdlib":
    return load_stdlib_corpus(data_dir)[split]
  if source == "tfds":
    return tfds.data_source(tfds_name, data_dir=data_dir, split=split, download=False)
  if source == "files":
    return text_file_splits(files_glob)[split]
  raise ValueError(f"Unknown data source {source!r}; expected 'stdlib', 'tfds' or "
                   "'files'.")
