"""Compile and step time of a transformer training step, scanned vs unscanned layers.

Times jax.jit(jax.value_and_grad(loss)) at several depths: with scanned layers XLA
compiles one block whatever the depth; a Python loop compiles every block. Run from the
repository root:

    JAX_PLATFORMS=cpu python -m scripts.bench_model
"""

import argparse
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

# The trainer is used from this checkout, not installed: put the checkout on the path.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from configs import common
import models


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--layers", type=int, nargs="+", default=[2, 8, 32])
  parser.add_argument("--d_model", type=int, default=256)
  parser.add_argument("--num_heads", type=int, default=4)
  parser.add_argument("--vocab_size", type=int, default=256)
  parser.add_argument("--seq_len", type=int, default=64)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--remat", default="none")
  parser.add_argument("--compiles", type=int, default=3, help="compilations (best reported)")
  parser.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
  return parser.parse_args()


def model_config(args, num_layers: int, scan: bool):
  config = common.base_config().model
  config.update(dict(vocab_size=args.vocab_size, d_model=args.d_model, num_layers=num_layers,
                     num_heads=args.num_heads, mlp_dim=4 * args.d_model,
                     max_seq_len=args.seq_len, scan_layers=scan, remat=args.remat))
  return config


def compile_step(graphdef, params, tokens):
  """(compiled step, trace s, compile s) of a fresh jit(value_and_grad(loss)).

  A new loss function each call, so no in-memory cache returns an earlier compilation.
  """
  def loss(params, tokens):
    logits = nnx.merge(graphdef, params)(tokens)
    return models.cross_entropy(logits[:, :-1], tokens[:, 1:])

  start = time.perf_counter()
  lowered = jax.jit(jax.value_and_grad(loss)).lower(params, tokens)
  traced = time.perf_counter()
  compiled = lowered.compile()
  return compiled, traced - start, time.perf_counter() - traced


def bench(args, num_layers: int, scan: bool) -> dict:
  """Best-of trace and compile times and the median step time of one configuration."""
  graphdef, params = nnx.split(models.build(model_config(args, num_layers, scan),
                                            nnx.Rngs(0)), nnx.Param)
  tokens = jax.random.randint(jax.random.key(1), (args.batch, args.seq_len), 0,
                              args.vocab_size, jnp.int32)
  compiled, trace_times, compile_times = None, [], []
  for _ in range(args.compiles):
    compiled, trace_s, compile_s = compile_step(graphdef, params, tokens)
    trace_times.append(trace_s)
    compile_times.append(compile_s)
  jax.block_until_ready(compiled(params, tokens))  # warm-up
  step_times = []
  for _ in range(args.steps):
    start = time.perf_counter()
    jax.block_until_ready(compiled(params, tokens))
    step_times.append(time.perf_counter() - start)
  return dict(params=models.param_count(params), trace=min(trace_times),
              compile=min(compile_times), step=statistics.median(step_times))


def main():
  args = parse_args()
  # Compile time is what is measured: never read compiled programs from a cache.
  jax.config.update("jax_enable_compilation_cache", False)
  print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}; d_model "
        f"{args.d_model}, heads {args.num_heads}, mlp {4 * args.d_model}, vocab "
        f"{args.vocab_size}, batch {args.batch} x seq {args.seq_len}, remat {args.remat}")
  print(f"{'layers':>6} {'scan':>5} {'params':>11} {'trace s':>8} {'compile s':>9} "
        f"{'step ms':>8}")
  for num_layers in args.layers:
    for scan in (True, False):
      r = bench(args, num_layers, scan)
      print(f"{num_layers:>6} {str(scan):>5} {r['params']:>11,} {r['trace']:>8.2f} "
            f"{r['compile']:>9.2f} {1e3 * r['step']:>8.1f}", flush=True)


if __name__ == "__main__":
  main()
