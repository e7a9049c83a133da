"""Benchmark psgd.kron against optax.adamw (and psgdax, if installed) on GPT-shaped params.

Prints, side by side from one run (timed in interleaved rounds), for psgd.kron with its
defaults (float32), with bfloat16 factors and bfloat16 operands where P is applied, with
bfloat16 operands in the fit too (the trainer's setting), and that with cached P:
  * median jitted update time, absolute and as a ratio to AdamW, at preconditioner update
    probability 1.0 and at the annealed floor (0.03);
  * psgdax's time over psgd.kron's at the same probability (both at their defaults);
  * compile time; optimizer-state bytes per parameter.
Params are nanoGPT-shaped (vocab 8192, d_model 512, 8 layers, mlp 2048, fused qkv), both
stacked over a layer axis (marked scanned) and as 8 separate layers.

    python scripts/bench_optimizer.py [--rounds 7] [--layouts stacked,unstacked]
        [--variants kron,kron_bf16,kron_bf16_fit,kron_bf16_cached] [--modes QUAD4P,QEQ]

`--variants` picks among the four settings above; `--modes` adds the defaults with
another `preconditioner_mode` (float32, as a user would pass it).

psgdax is not a dependency: `pip install --no-deps psgdax` to include it.
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import psgd

VOCAB, D_MODEL, LAYERS, MLP = 8192, 512, 8, 2048
FLOOR = 0.03


def gpt_params(stacked: bool):
  """(params, scanned mask) of a nanoGPT-shaped model, per-layer params stacked or not."""
  block = {"ln1": (D_MODEL,), "attn_qkv": (D_MODEL, 3 * D_MODEL),
           "attn_out": (D_MODEL, D_MODEL), "ln2": (D_MODEL,), "mlp_in": (D_MODEL, MLP),
           "mlp_out": (MLP, D_MODEL)}
  rng = np.random.default_rng(0)
  make = lambda shape: jnp.asarray(rng.normal(size=shape) * 0.02, jnp.float32)
  params = {"embed": make((VOCAB, D_MODEL)), "ln_f": make((D_MODEL,)),
            "head": make((D_MODEL, VOCAB))}
  mask = {"embed": False, "ln_f": False, "head": False}
  if stacked:
    params["blocks"] = {k: make((LAYERS, *s)) for k, s in block.items()}
    mask["blocks"] = {k: True for k in block}
  else:
    for i in range(LAYERS):
      params[f"block{i}"] = {k: make(s) for k, s in block.items()}
      mask[f"block{i}"] = {k: False for k in block}
  return params, mask


VARIANTS = ("kron", "kron_bf16", "kron_bf16_fit", "kron_bf16_cached")


def optimizers(mask, variants=VARIANTS, modes=()):
  """name -> optax transformation (bf16 momentum for all PSGD variants)."""
  common = dict(learning_rate=3e-4, b1=0.9, weight_decay=0.1, scanned_layers=mask,
                mu_dtype=jnp.bfloat16)
  opts = {"adamw": optax.adamw(3e-4, weight_decay=0.1)}
  # The defaults (float32), bf16 factors and bf16 operands where P is applied, then in
  # the fit too (the trainer's setting), then with cached P.
  bf16 = dict(precond_dtype=jnp.bfloat16, precond_grads_precision="bfloat16")
  settings = {"kron": {}, "kron_bf16": bf16,
              "kron_bf16_fit": dict(bf16, precond_update_precision="bfloat16"),
              "kron_bf16_cached": dict(bf16, cache_preconditioner=True)}
  settings = {name: settings[name] for name in variants}
  settings.update({f"kron_{mode}": dict(preconditioner_mode=mode) for mode in modes})
  for label, prob in (("p=1", 1.0), ("floor", FLOOR)):
    for name, extra in settings.items():
      opts[f"{name} {label}"] = psgd.kron(preconditioner_update_probability=prob, **extra,
                                          **common)
  try:
    import psgdax
  except ImportError:
    print("(psgdax not installed: pip install --no-deps psgdax to compare)")
    return opts
  for label, prob in (("p=1", 1.0), ("floor", FLOOR)):
    opts[f"psgdax {label}"] = psgdax.kron(preconditioner_update_probability=prob, **common)
  return opts


def state_bytes(state) -> int:
  return sum(x.nbytes for x in jax.tree.leaves(state) if hasattr(x, "nbytes"))


def bench(layout: str, rounds: int, variants, modes):
  params, mask = gpt_params(layout == "stacked")
  num_params = sum(x.size for x in jax.tree.leaves(params))
  grads = jax.tree.map(lambda p: jnp.asarray(
      np.random.default_rng(1).normal(size=p.shape), p.dtype), params)
  print(f"\n## {layout}: {num_params / 1e6:.1f}M params, "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s)")
  runs = {}
  for name, tx in optimizers(mask, variants, modes).items():
    state = jax.jit(tx.init)(params)
    step = jax.jit(tx.update, donate_argnums=(1,))
    start = time.perf_counter()
    compiled = step.lower(grads, state, params).compile()
    compile_s = time.perf_counter() - start
    _, state = compiled(grads, state, params)  # warm up
    jax.block_until_ready(state)
    runs[name] = dict(step=compiled, state=state, compile_s=compile_s, times=[],
                      bytes=state_bytes(state) / num_params)
  for _ in range(rounds):  # interleaved, so machine noise hits all alike
    for run in runs.values():
      start = time.perf_counter()
      updates, run["state"] = run["step"](grads, run["state"], params)
      jax.block_until_ready((updates, run["state"]))
      run["times"].append(time.perf_counter() - start)
  median = {name: statistics.median(run["times"]) for name, run in runs.items()}
  print("| optimizer | median update (ms) | x AdamW | psgdax's time / this | compile (s) "
        "| state bytes/param |")
  print("|---|---|---|---|---|---|")
  for name, run in runs.items():
    t = median[name]
    psgdax = median.get(f"psgdax {name.rsplit(' ', 1)[-1]}")
    speedup = f"{psgdax / t:.2f}" if psgdax and name.startswith("kron") else "-"
    print(f"| {name} | {t * 1e3:.1f} | {t / median['adamw']:.2f} | {speedup} | "
          f"{run['compile_s']:.1f} | {run['bytes']:.2f} |")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--layouts", default="stacked,unstacked")
  parser.add_argument("--variants", default=",".join(VARIANTS),
                      help=f"comma-separated, among {', '.join(VARIANTS)}")
  parser.add_argument("--modes", default="",
                      help="comma-separated preconditioner modes to add at the defaults")
  args = parser.parse_args()

  def chosen(flag: str, text: str, allowed) -> list[str]:
    names = [name for name in text.split(",") if name]
    unknown = sorted(set(names) - set(allowed))
    if unknown:
      parser.error(f"{flag}: unknown {unknown}; choose among {', '.join(allowed)}")
    return names

  variants = chosen("--variants", args.variants, VARIANTS)
  modes = chosen("--modes", args.modes, psgd.MODES)
  for layout in args.layouts.split(","):
    bench(layout, args.rounds, variants, modes)


if __name__ == "__main__":
  main()
