"""Local paths made absolute once, at the start of a run.

Orbax refuses relative checkpoint paths, and only in its background save thread, so a
relative `--workdir runs/x` would train and then lose every save. Every path the run
reads or writes is resolved here: `~` expanded, relative to the directory the command
was started in; URLs such as gs://bucket/run are left as they are.
"""

import os

from etils import epath


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


def write_whole(path, text: str) -> None:
  """Replace the file at `path` (a str, pathlib.Path or epath.Path, local or URL) with
  `text` in one rename, so a full disk or a kill leaves either the old file or the new
  one, whole. Unchanged text is not written."""
  path = epath.Path(path) if isinstance(path, str) else path
  if path.exists() and path.read_text(encoding="utf-8") == text:
    return
  temporary = path.with_name(path.name + ".tmp")
  temporary.write_text(text, encoding="utf-8")
  temporary.replace(path)
