r"""Evaluate a run's checkpoint: `python -m trainer.eval --workdir runs/cpu_lm`.

    python -m trainer.eval --workdir runs/cpu_lm [--step 400] \
        [--config.data.eval_split=... --config.data.eval_batches=64]

restores the params of the newest step that restores intact (or of --step), evaluates
them on the run's eval split (or the one the overrides name) exactly as training does,
and prints one JSON line: {"step": ..., "eval/loss": ..., "eval/bits_per_byte": ...}.
It reads the workdir only, so it can run beside the training run.
"""

import json
import sys
from typing import Optional

import jax
from absl import app, flags

from trainer import distributed, paths, saved_run, validate


def evaluate_checkpoint(config, workdir: str, step: Optional[int] = None,
                        devices=None) -> tuple[int, dict[str, float]]:
  """(step, eval metrics) of the run in `workdir`, built from `config` (the run's own,
  from saved_run.load_config, with any changes) on `devices` (default: all)."""
  config = paths.resolve_config_paths(config)
  # The eval split and tokenizer, checked as a training run checks them.
  validate.check_data(config, jax.process_index(), jax.process_count())
  step, params, run = saved_run.restore_params(config, workdir, step, devices)
  with jax.set_mesh(run.mesh):
    return step, run.evaluate(params)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments {argv[1:]}.")
  config = flags.FLAGS.config
  distributed.initialize(config.distributed)
  step, metrics = evaluate_checkpoint(config, flags.FLAGS.workdir, flags.FLAGS.step)
  if jax.process_index() == 0:
    print(json.dumps({"step": step, **metrics}))


if __name__ == "__main__":
  saved_run.define_flags(sys.argv)
  app.run(saved_run.one_line_errors(main))
