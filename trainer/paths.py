"""Local paths made absolute once, at the start of a run.

Orbax refuses relative checkpoint paths, and only in its background save thread, so a
relative `--workdir runs/x` would train and then lose every save. Every path the run
reads or writes is resolved here: `~` expanded, relative to the directory the command
was started in; URLs such as gs://bucket/run are left as they are.
"""

import os


def is_url(path: str) -> bool:
  return "://" in path


def absolute(path: str) -> str:
  """`path` with `~` expanded and made absolute; URLs and '' unchanged."""
  if not path or is_url(path):
    return path
  return os.path.abspath(os.path.expanduser(path))


def resolve_config_paths(config):
  """A copy of `config` whose local file settings are absolute (the caller's config is
  left alone, so the same object can start several runs)."""
  config = config.copy_and_resolve_references()
  config.checkpoint.init_from = absolute(config.checkpoint.init_from)
  config.data.data_dir = absolute(config.data.data_dir)
  config.data.files_glob = absolute(config.data.files_glob)
  if config.data.tokenizer != "bytes":  # otherwise a SentencePiece model file
    config.data.tokenizer = absolute(config.data.tokenizer)
  return config
