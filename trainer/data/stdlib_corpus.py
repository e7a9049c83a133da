"""The built-in corpus: the running interpreter's standard library sources, as TFDS data.

Every `*.py` file under `sysconfig.get_paths()['stdlib']`, the stdlib's own test suites
included (real code, and they double the corpus to about 30 MB on CPython 3.11), except
anything under `site-packages`/`dist-packages`, which holds installed third-party code.
Text is stored as the file's raw bytes, so the few test files in legacy encodings survive
intact.
"""

import contextlib
import dataclasses
import fcntl
import hashlib
import os
import pathlib
import sys
import sysconfig

import tensorflow_datasets as tfds

from trainer.data import splits

_SKIPPED_DIRS = frozenset({"site-packages", "dist-packages"})


def stdlib_dir() -> pathlib.Path:
  return pathlib.Path(sysconfig.get_paths()["stdlib"])


def corpus_files(source_dir: str | os.PathLike) -> list[str]:
  """Sorted posix paths, relative to `source_dir`, of the `*.py` files in the corpus.

  os.walk rather than rglob: it does not follow directory symlinks, so the listing is
  finite and the same on every machine with the same tree.
  """
  found = []
  for root, dirs, files in os.walk(source_dir):
    dirs[:] = [d for d in dirs if d not in _SKIPPED_DIRS]
    rel_root = pathlib.Path(root).relative_to(source_dir)
    found.extend((rel_root / f).as_posix() for f in files if f.endswith(".py"))
  return sorted(found)


@dataclasses.dataclass(eq=False)
class SourceTreeConfig(tfds.core.BuilderConfig):
  """Which directory the corpus is read from (the config name keys the cache)."""

  source_dir: str = ""


def source_tree_config(source_dir: str | os.PathLike | None = None) -> SourceTreeConfig:
  """The stdlib of this Python, or another tree under a name derived from its path.

  Distinct names keep differently sourced builds apart in one data_dir.
  """
  if source_dir is None:
    name = f"stdlib_py{sys.version_info.major}_{sys.version_info.minor}"
    return SourceTreeConfig(name=name, source_dir=str(stdlib_dir()))
  source_dir = os.path.abspath(os.path.expanduser(source_dir))
  digest = hashlib.sha256(source_dir.encode("utf-8")).hexdigest()[:12]
  return SourceTreeConfig(name=f"tree_{digest}", source_dir=source_dir)


class PythonStdlib(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Python source files, one example per file, split by a hash of the relative path.

  Not registered by name: it is built and read through an instance (load_stdlib_corpus),
  which also keeps a re-import of this module from clashing in the TFDS registry.
  """

  VERSION = tfds.core.Version("1.0.0")
  # Nothing is downloaded, so there is no checksums file to find next to the code; TFDS
  # looks for it through importlib.resources, which fails on a namespace package.
  code_path = None
  RELEASE_NOTES = {"1.0.0": "Python sources split 95/5 by sha256 of the relative path."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Python source files of a directory tree (default: the stdlib).",
        features=tfds.features.FeaturesDict({
            "text": tfds.features.Text(),
            "path": tfds.features.Text(),
        }),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is local.
    root = pathlib.Path(self.builder_config.source_dir)
    by_split = {splits.TRAIN: [], splits.VALIDATION: []}
    for path in corpus_files(root):
      by_split[splits.split_of(path)].append(path)
    return {name: self._generate_examples(root, paths) for name, paths in by_split.items()}

  def _generate_examples(self, root, paths):
    for path in paths:
      yield path, {"text": (root / path).read_bytes(), "path": path}


@contextlib.contextmanager
def _exclusive(lock_path: pathlib.Path):
  """Holds an flock, so concurrent builders on one host build once and the rest reuse.

  TFDS already writes into a temporary directory and renames it into place; the lock stops
  a second process from failing on that rename, or reading before it.
  """
  lock_path.parent.mkdir(parents=True, exist_ok=True)
  with open(lock_path, "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def load_stdlib_corpus(data_dir: str | os.PathLike,
                       source_dir: str | os.PathLike | None = None) -> dict:
  """Builds the corpus into `data_dir` unless already there; returns split -> data source.

  Data lands in `data_dir/python_stdlib/<config>/1.0.0/` as ArrayRecord. The sources are
  random access (len, [i]) and feed grain directly; records are {'text', 'path'}, both as
  bytes (TFDS Text features decode to bytes). A changed source tree is not noticed: delete
  the config's directory to rebuild.
  """
  data_dir = pathlib.Path(os.path.expanduser(data_dir))
  config = source_tree_config(source_dir)
  with _exclusive(data_dir / f"python_stdlib-{config.name}.lock"):
    # Constructed under the lock, so it sees a dataset another process just finished.
    builder = PythonStdlib(data_dir=data_dir, config=config, file_format="array_record")
    builder.download_and_prepare()
  return builder.as_data_source()
