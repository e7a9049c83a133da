"""What each optimizer's update looks like, matrix by matrix, early in a run.

Trains the config (default: the CPU LM) with each optimizer given and, at a few steps,
reads the update a step applied to every hidden weight matrix (the matrices Muon
orthogonalises, from the model's axis metadata; each scanned layer its own): its RMS,
and how whitened it is, as its stable rank ||U||_F^2 / ||U||_2^2 over min(rows, cols)
(1 for Muon's orthogonalised update, near 1 / min(rows, cols) for a rank-one one) and
the spread of its singular values (largest over median). Printed per step, averaged
over the matrices, so one sees how fast an optimizer's preconditioner gets to the
whitening Muon has from its first step.

    python scripts/diagnose_updates.py --optimizers muon,kron --steps 2,10,30
    python scripts/diagnose_updates.py --optimizers kron \
        --set optimizer.kron.preconditioner_lr=0.7 --set optimizer.learning_rate=4e-3
"""

import argparse
import ast
import importlib.util
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# The trainer is used from this checkout, not installed: put the checkout on the path.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import models
from trainer import data as data_lib
from trainer import setup as setup_lib


def load_config(path: str, overrides: list[str]):
  spec = importlib.util.spec_from_file_location("diagnose_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  for item in overrides:
    key, value = item.split("=", 1)
    *parents, leaf = key.split(".")
    node = config
    for name in parents:
      node = node[name]
    try:
      node[leaf] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      node[leaf] = value
  return config


def as_matrices(update: np.ndarray, axes) -> np.ndarray:
  """(batch, rows, cols): the update as matrices, axes = (input dims, output dims)."""
  inputs, outputs = axes
  batch = [d for d in range(update.ndim) if d not in inputs + outputs]
  size = lambda dims: int(np.prod([update.shape[d] for d in dims]))
  return np.transpose(update, batch + list(inputs) + list(outputs)).reshape(
      size(batch), size(inputs), size(outputs))


def spectrum_stats(matrices: np.ndarray) -> tuple[float, float, float]:
  """(RMS, stable rank / min dim, largest / median singular value), over the batch."""
  sv = np.linalg.svd(matrices.astype(np.float64), compute_uv=False)
  stable = (sv ** 2).sum(-1) / (sv[:, 0] ** 2 + 1e-30) / sv.shape[-1]
  spread = sv[:, 0] / (np.median(sv, axis=-1) + 1e-30)
  return float(np.sqrt(np.mean(matrices ** 2))), float(stable.mean()), float(spread.mean())


def diagnose(config, probe_steps: list[int]) -> list[tuple[int, float, float, float]]:
  run = setup_lib.build_setup(config)
  with jax.set_mesh(run.mesh), nnx.logical_axis_rules(run.rules):
    abstract = nnx.eval_shape(lambda: models.build(config.model, nnx.Rngs(config.seed)))
  axes = nnx.to_pure_dict(models.matrix_axes(nnx.state(abstract, nnx.Param)))
  batches = data_lib.make_train_iterator(config.data, config.train.global_batch_size, 0, 1)
  rows = []
  with jax.set_mesh(run.mesh):
    state = run.init_state()
    for step in range(1, max(probe_steps) + 1):
      batch = {k: jax.device_put(np.asarray(v), run.batch_sharding)
               for k, v in next(batches).items()}
      before = jax.tree.map(np.asarray, state.params) if step in probe_steps else None
      state, _ = run.train_step(state, batch)
      if before is None:
        continue
      after = jax.tree.map(np.asarray, state.params)
      stats = [spectrum_stats(as_matrices(a - b, ax)) for a, b, ax in zip(
          jax.tree.leaves(after), jax.tree.leaves(before),
          jax.tree.leaves(axes, is_leaf=lambda x: x is None or isinstance(x, tuple)))
          if ax is not None]
      rows.append((step, *np.mean(stats, axis=0)))
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/cpu_lm.py")
  parser.add_argument("--optimizers", default="muon,kron")
  parser.add_argument("--steps", default="2,10,30,100")
  parser.add_argument("--set", action="append", default=[],
                      help="a config override key=value (repeatable)")
  args = parser.parse_args()
  probe_steps = [int(s) for s in args.steps.split(",")]
  print("| optimizer | step | update RMS | stable rank / min dim | largest / median sv |")
  print("|---|---|---|---|---|")
  for name in args.optimizers.split(","):
    config = load_config(args.config, [f"optimizer.name={name}", *args.set])
    for step, rms, stable, spread in diagnose(config, probe_steps):
      print(f"| {name} | {step} | {rms:.2e} | {stable:.3f} | {spread:.1f} |", flush=True)


if __name__ == "__main__":
  main()
