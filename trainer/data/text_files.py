"""Local text files as a random-access source: each file one document."""

import glob
import os

from trainer.data import splits

_GLOB_MAGIC = frozenset("*?[")


class TextFiles:
  """Reads a file when its index is asked for; records are {'text': bytes, 'path': str}.

  A plain class over a list of paths, so it pickles into grain worker processes.
  """

  def __init__(self, paths):
    self._paths = list(paths)

  def __len__(self) -> int:
    return len(self._paths)

  def __getitem__(self, index: int) -> dict:
    path = self._paths[index]
    with open(path, "rb") as f:
      return {"text": f.read(), "path": path}


def glob_root(pattern: str) -> str:
  """The leading directories of `pattern` that hold no wildcard."""
  parts = pattern.split(os.sep)
  fixed = []
  for part in parts[:-1]:
    if _GLOB_MAGIC & set(part):
      break
    fixed.append(part)
  return os.sep.join(fixed) or "."


def text_file_splits(pattern: str) -> dict[str, TextFiles]:
  """Split name -> TextFiles for the files `pattern` matches (`**` recurses).

  A file's split comes from its path relative to the glob's fixed prefix, so moving the
  whole tree elsewhere keeps every file in its split.
  """
  pattern = os.path.expanduser(pattern)
  root = glob_root(pattern)
  by_split = {splits.TRAIN: [], splits.VALIDATION: []}
  for path in sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)):
    rel = os.path.relpath(path, root).replace(os.sep, "/")
    by_split[splits.split_of(rel)].append(path)
  return {name: TextFiles(paths) for name, paths in by_split.items()}
