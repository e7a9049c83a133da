"""How long a checkpoint save blocks the training loop, as a fraction of training time.

Builds the run of a config (default: the CPU LM), measures its step time, then times
the blocking part of saves (async and synchronous) of the full state and data iterator,
and prints blocking time / (save interval x step time).

    python scripts/bench_checkpoint.py [--config configs/cpu_lm.py] [--saves 5]
"""

import argparse
import importlib.util
import pathlib
import statistics
import sys
import tempfile
import time

import jax
import numpy as np

# The trainer is used from this checkout, not installed: put the checkout on the path.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from trainer import checkpoint as checkpoint_lib
from trainer import data as data_lib
from trainer import setup as setup_lib


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/cpu_lm.py")
  parser.add_argument("--saves", type=int, default=5)
  parser.add_argument("--steps_between", type=int, default=10)
  args = parser.parse_args()
  spec = importlib.util.spec_from_file_location("bench_config", args.config)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()

  run = setup_lib.build_setup(config)
  it = data_lib.make_train_iterator(config.data, config.train.global_batch_size)
  to_global = lambda b: {k: jax.make_array_from_process_local_data(run.batch_sharding,
                                                                  np.asarray(v))
                         for k, v in b.items()}
  with jax.set_mesh(run.mesh):
    state = run.init_state()
    state, _ = run.train_step(state, to_global(next(it)))  # compile
    jax.block_until_ready(state)

    def steps(n):
      nonlocal state
      start = time.perf_counter()
      for _ in range(n):
        state, _ = run.train_step(state, to_global(next(it)))
      jax.block_until_ready(state)
      return (time.perf_counter() - start) / n

    step_time = steps(args.steps_between)
    config_dict = config.to_dict()
    results = {}
    for mode in ("async", "sync"):
      with tempfile.TemporaryDirectory() as workdir:
        ckpt = checkpoint_lib.Checkpointer(workdir, save_every=1, max_to_keep=2,
                                           keep_every=None, async_save=mode == "async")
        blocking = []
        for i in range(args.saves):
          start = time.perf_counter()
          ckpt.save(1000 + i, state, it, config_dict)
          blocking.append(time.perf_counter() - start)
          steps(args.steps_between)  # training goes on while an async save writes
        ckpt.close()
      results[mode] = statistics.median(blocking)

  interval = config.checkpoint.save_every
  print(f"step time {step_time * 1e3:.1f} ms; save interval {interval} steps")
  print("| save | blocking (ms) | fraction of training time |")
  print("|---|---|---|")
  for mode, seconds in results.items():
    print(f"| {mode} | {seconds * 1e3:.1f} | {seconds / (interval * step_time):.2%} |")


if __name__ == "__main__":
  main()
