"""The distribution: a wheel of the `psgd` library alone, needing jax and optax only."""

import email.parser
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile

import pytest

from trainer_utils import REPO

# What the trainer side brings (absl-py is optax's own); the library must need none of it.
TRAINER_ONLY = ("flax", "orbax", "grain", "tensorflow_datasets", "ml_collections",
                "tensorboardX", "tqdm", "trainer", "models", "configs")


@pytest.mark.slow
def test_wheel_installs_only_psgd_and_requires_only_jax_and_optax(tmp_path):
  source = tmp_path / "source"  # build from a copy: the checkout gets no build/ folder
  shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
      ".venv", ".git", ".cache", "runs", "build", "*.egg-info", "__pycache__"))
  subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                  str(tmp_path / "dist"), str(source)], check=True, timeout=600)
  (wheel,) = (tmp_path / "dist").glob("*.whl")
  names = zipfile.ZipFile(wheel).namelist()
  top_level = {name.split("/")[0] for name in names if ".dist-info/" not in name}
  assert top_level == {"psgd"}
  metadata_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
  metadata = email.parser.Parser().parsestr(
      zipfile.ZipFile(wheel).read(metadata_name).decode())
  required = {re.match(r"[A-Za-z0-9_.-]+", r).group(0) for r in metadata.get_all("Requires-Dist")
              if "extra ==" not in r}
  assert required == {"jax", "optax"}
  assert {"train", "test", "tpu", "cuda", "plots"} <= set(metadata.get_all("Provides-Extra"))
  assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)


def test_psgd_imports_and_trains_with_jax_and_optax_alone(tmp_path):
  # Every trainer-side module is made unimportable; psgd must neither import one nor fail.
  script = textwrap.dedent(f"""
      import importlib.abc, sys
      class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
          if name.split(".")[0] in {TRAINER_ONLY!r}:
            raise ImportError("blocked: " + name)
      sys.meta_path.insert(0, Block())
      import jax.numpy as jnp, optax, psgd
      params = {{"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}}
      tx = psgd.kron(1e-2)
      updates, _ = tx.update(params, tx.init(params), params)
      assert all(bool(jnp.isfinite(u).all()) for u in updates.values())
      print("ok", psgd.__version__)
  """)
  result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.startswith("ok")
