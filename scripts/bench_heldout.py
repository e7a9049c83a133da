"""Held-out checks for optimizer defaults: small tasks unlike the CPU LM, side by side.

Each task is trained by optax.adamw, optax.contrib.muon (consistent_rms=0.2, so AdamW's
learning rate carries over) and psgd.kron, every one at its library defaults apart
from the learning rate and weight decay (none for any: optax.adamw's default is 1e-4,
Muon's and Kron's 0), with the learning rate swept over the same 4 log-spaced points,
under a cosine and a constant schedule (both after a short linear warmup). Same init,
batches and seeds for all. Printed: each optimizer's best held-out loss per task and schedule
(the mean over seeds), and Kron's over each baseline's, with several seeds also as the
mean paired difference +- its standard error.

Tasks:
  digits     a 3-layer MLP classifying sklearn's bundled 8x8 digit images (real data,
             no download), test cross-entropy;
  teacher    a noisy, ill-conditioned regression: a tanh MLP student fits a random
             teacher from inputs whose covariance spans 4 decades, with label noise;
             excess test error over the noise floor;
  deep_linear  a 4-layer linear network fitting an ill-conditioned linear map from
             noisy samples; excess test error.

    python scripts/bench_heldout.py [--tasks digits,teacher,deep_linear] [--out docs/heldout]

Needs scikit-learn for `digits`: `pip install -e '.[bench]'`.
"""

import argparse
import functools
import json
import math
import pathlib
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import optax

import psgd

LRS = (3e-4, 1e-3, 3e-3, 1e-2)


# ----------------------------------------------------------------------- tasks


def mlp_init(key, sizes):
  """He-style init of an MLP; a list of {'w', 'b'} layers."""
  layers = []
  for key, (n_in, n_out) in zip(jax.random.split(key, len(sizes) - 1),
                                zip(sizes[:-1], sizes[1:])):
    layers.append({"w": jax.random.normal(key, (n_in, n_out)) / math.sqrt(n_in),
                   "b": jnp.zeros(n_out)})
  return layers


def mlp_apply(layers, x, activation):
  for i, layer in enumerate(layers):
    x = x @ layer["w"] + layer["b"]
    if i < len(layers) - 1:
      x = activation(x)
  return x


def digits_task(seed: int):
  """(init params, loss(params, x, y), train arrays, test arrays, noise floor); each
  task below returns the same."""
  try:
    from sklearn.datasets import load_digits
  except ImportError:
    raise SystemExit("The digits task needs scikit-learn: pip install -e '.[bench]' (or "
                     "pip install scikit-learn), or leave it out: --tasks "
                     "teacher,deep_linear.") from None
  data = load_digits()
  x = (data.data / 16.0).astype(np.float32)
  x = (x - x.mean(0)) / (x.std(0) + 0.1)
  y = data.target.astype(np.int32)
  order = np.random.default_rng(0).permutation(len(x))
  train, test = order[:1400], order[1400:]
  params = mlp_init(jax.random.PRNGKey(seed), (64, 256, 256, 10))

  def loss(params, x, y):
    logits = mlp_apply(params, x, jax.nn.gelu)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  return params, loss, (x[train], y[train]), (x[test], y[test]), 0.0


def _ill_conditioned_inputs(rng, n, dim, decades):
  """n inputs whose covariance has eigenvalues log-spaced over `decades`, randomly rotated."""
  rotation, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
  scales = 10.0 ** (-np.linspace(0, decades, dim) / 2)
  return (rng.normal(size=(n, dim)) * scales) @ rotation.T


def teacher_task(seed: int, noise: float = 0.3):
  rng = np.random.default_rng(1)
  dim_in, dim_out = 32, 8
  teacher = mlp_init(jax.random.PRNGKey(1000), (dim_in, 64, dim_out))
  x = _ill_conditioned_inputs(rng, 6000, dim_in, 4).astype(np.float32) * 3
  clean = np.asarray(mlp_apply(teacher, x, jnp.tanh))
  y = (clean + noise * rng.normal(size=clean.shape)).astype(np.float32)
  params = mlp_init(jax.random.PRNGKey(seed), (dim_in, 128, 128, dim_out))

  def loss(params, x, y):
    return jnp.mean(jnp.sum((mlp_apply(params, x, jnp.tanh) - y) ** 2, axis=1))
  # The test split is scored against the noisy labels; the floor is their noise.
  return params, loss, (x[:5000], y[:5000]), (x[5000:], y[5000:]), dim_out * noise ** 2


def deep_linear_task(seed: int, noise: float = 0.5):
  rng = np.random.default_rng(2)
  dim = 48
  target = rng.normal(size=(dim, dim)) / math.sqrt(dim)
  x = _ill_conditioned_inputs(rng, 6000, dim, 3).astype(np.float32) * 2
  y = (x @ target + noise * rng.normal(size=(6000, dim))).astype(np.float32)
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  params = [jax.random.normal(k, (dim, dim)) / math.sqrt(dim) for k in keys]

  def loss(params, x, y):
    return jnp.mean(jnp.sum((functools.reduce(jnp.matmul, params, x) - y) ** 2, axis=1))
  return params, loss, (x[:5000], y[:5000]), (x[5000:], y[5000:]), dim * noise ** 2


TASKS = {"digits": digits_task, "teacher": teacher_task, "deep_linear": deep_linear_task}


# ------------------------------------------------------------------ optimizers


def optimizer(name: str, schedule, kron_args: str = "{}"):
  """The optimizer a user would pick, at its library defaults but the learning rate and
  no weight decay (and, for Kron, the JSON object `kron_args` of psgd.kron arguments)."""
  if name == "adamw":
    return optax.adamw(schedule, weight_decay=0.0)
  if name == "muon":
    return optax.contrib.muon(schedule, consistent_rms=0.2)
  if name == "kron":
    args = json.loads(kron_args)
    if isinstance(args.get("preconditioner_lr"), dict):  # its schedule's arguments
      args["preconditioner_lr"] = psgd.precond_lr_schedule(**args["preconditioner_lr"])
    return psgd.kron(schedule, **args)
  raise ValueError(name)


def make_schedule(kind: str, lr: float, steps: int):
  warmup = steps // 20
  if kind == "constant":
    decay = optax.constant_schedule(lr)
  else:
    decay = optax.cosine_decay_schedule(lr, steps - warmup, alpha=0.1)
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


@functools.lru_cache(maxsize=None)
def _compiled(task: str, name: str, schedule_kind: str, steps: int, seed: int,
              kron_args: str):
  """(initial params, training examples, jitted init, jitted chunk of steps returning
  the held-out loss), the learning rate an argument, so a sweep compiles once per
  task, optimizer, schedule and seed."""
  params, loss, (x, y), (x_test, y_test), floor = TASKS[task](seed)
  x, y = jnp.asarray(x), jnp.asarray(y)
  make_tx = lambda lr: optimizer(name, make_schedule(schedule_kind, lr, steps), kron_args)

  @jax.jit
  def run_chunk(params, state, idx, lr):
    tx = make_tx(lr)

    def step(carry, i):
      params, state = carry
      updates, state = tx.update(jax.grad(loss)(params, x[i], y[i]), state, params)
      return (optax.apply_updates(params, updates), state), None
    (params, state), _ = jax.lax.scan(step, (params, state), idx)
    return params, state, loss(params, x_test, y_test) - floor

  init = jax.jit(lambda params, lr: make_tx(lr).init(params))
  return params, len(x), init, run_chunk


def train(task: str, name: str, schedule_kind: str, lr: float, *, steps: int, batch: int,
          evals: int, seed: int = 0, kron_args: str = "{}") -> float:
  """Best held-out loss (minus the task's noise floor) over `evals` evaluations."""
  params, n, init, run_chunk = _compiled(task, name, schedule_kind, steps, seed,
                                            kron_args)
  lr = jnp.float32(lr)
  idx = np.random.default_rng(seed).integers(0, n, size=(steps, batch))
  state = init(params, lr)
  best, chunk = math.inf, steps // evals
  for start in range(0, steps, chunk):
    params, state, test = run_chunk(params, state, jnp.asarray(idx[start:start + chunk]), lr)
    best = min(best, float(test) if math.isfinite(float(test)) else math.inf)
  return best


def _margin(kron: tuple, baseline: tuple) -> str:
  """Kron's best loss over a baseline's (each (loss, lr, per-seed losses) at its own
  best learning rate) and, with several seeds, the mean paired difference (same seeds)
  with its standard error, which says whether a gap is larger than the seeds' noise."""
  text = f"{kron[0] / baseline[0]:.3f}x"
  diffs = [k - b for k, b in zip(kron[2], baseline[2])]
  if len(diffs) > 1 and all(map(math.isfinite, diffs)):  # not with a diverged seed
    se = statistics.stdev(diffs) / math.sqrt(len(diffs))
    text += f" ({statistics.mean(diffs):+.4f} +- {se:.4f})"
  return text


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tasks", default=",".join(TASKS))
  parser.add_argument("--optimizers", default="adamw,muon,kron")
  parser.add_argument("--schedules", default="cosine,constant")
  parser.add_argument("--lrs", default=",".join(map(str, LRS)))
  parser.add_argument("--steps", type=int, default=600)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--evals", type=int, default=10)
  parser.add_argument("--seeds", default="0",
                      help="comma separated; each loss is the mean over these seeds "
                      "(initialisation and batch order)")
  parser.add_argument("--kron_args", default="{}",
                      help="psgd.kron arguments as a JSON object, e.g. '{\"b1\": 0.95}'; "
                      "a preconditioner_lr object holds precond_lr_schedule's arguments")
  parser.add_argument("--out", default="", help="write <out>/heldout.json")
  args = parser.parse_args()
  lrs = [float(v) for v in args.lrs.split(",")]
  seeds = [int(v) for v in args.seeds.split(",")]
  names = list(dict.fromkeys(args.optimizers.split(",")))
  results = []
  baselines = [n for n in names if n != "kron"] if "kron" in names else []
  print("| task | schedule | " + " | ".join(names) + "".join(
      f" | kron vs {n}" for n in baselines) + " |")
  print("|---" * (2 + len(names) + len(baselines)) + "|")
  for task in args.tasks.split(","):
    for kind in args.schedules.split(","):
      best = {}
      for name in names:
        per_seed = {lr: [train(task, name, kind, lr, steps=args.steps, batch=args.batch,
                               evals=args.evals, seed=seed, kron_args=args.kron_args)
                         for seed in seeds]
                    for lr in lrs}
        losses = {lr: statistics.mean(v) for lr, v in per_seed.items()}
        lr = min(losses, key=losses.get)
        best[name] = (losses[lr], lr, per_seed[lr])
        results.append(dict(task=task, schedule=kind, optimizer=name, losses=losses,
                            per_seed=per_seed))
      cells = [f"{loss:.4g} @ {lr:g}" for loss, lr, _ in best.values()]
      margins = [_margin(best["kron"], best[n]) for n in baselines]
      print(f"| {task} | {kind} | " + " | ".join(cells + margins) + " |", flush=True)
      if args.out:  # after each row, so a stopped sweep keeps what it measured
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "heldout.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
  main()
