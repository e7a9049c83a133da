"""A run's workdir read back by the tools that use a trained run (eval, sample, export).

    python -m trainer.eval --workdir runs/cpu_lm --config.data.eval_batches=64

The run's config is the one trainer.main saved in <workdir>/config.json, laid over the
schema of configs/common.py (so every setting keeps its type and can be overridden);
`--config.<key>` flags override it, as they override a config file for trainer.main.
The `distributed` section is this launch's, not the saved run's: a reader usually runs
elsewhere (default 'auto'; set it with --config.distributed.*).
"""

import argparse
import json
import sys
from typing import Optional

import jax
import ml_collections
from absl import flags
from etils import epath
from ml_collections import config_flags

from configs import common
from trainer import checkpoint as checkpoint_lib
from trainer import paths
from trainer import setup as setup_lib


def _typed(value):
  """JSON lists back to the tuples the schema holds (mesh shape, axis rules)."""
  return tuple(_typed(v) for v in value) if isinstance(value, list) else value


def _lay_over(config: ml_collections.ConfigDict, saved: dict) -> None:
  for key, value in saved.items():
    if isinstance(value, dict) and isinstance(config.get(key), ml_collections.ConfigDict):
      _lay_over(config[key], value)
    elif key in config and value is None:
      config[key] = None  # a placeholder keeps its type
    else:
      config[key] = _typed(value)


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config the run in `workdir` was started with, typed by configs/common.py."""
  path = epath.Path(paths.absolute(workdir)) / "config.json"
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist: --workdir must be the workdir of a run "
                            "(trainer.main writes its config there).")
  saved = json.loads(path.read_text())
  saved.pop("distributed", None)
  config = common.base_config()
  _lay_over(config, saved)
  return config


def restore_params(config, workdir: str, step: Optional[int] = None, devices=None):
  """(step, params, run setup): the run `config` describes (its own, from load_config,
  with any changes) built on `devices` (default: all), and the params of the run in
  `workdir` at `step` (default: the newest that restores intact), placed on its mesh."""
  run = setup_lib.build_setup(paths.resolve_config_paths(config), devices)
  with jax.set_mesh(run.mesh):
    step, restored = checkpoint_lib.read_verified(
        paths.absolute(workdir), {"params": run.abstract_state.params}, step)
  return step, restored["params"], run


def one_line_errors(main):
  """main(argv) that reports a step that does not restore or a setting that cannot work
  in one line with status 1, as trainer.main does, rather than with a traceback."""
  def wrapped(argv):
    try:
      return main(argv)
    except (checkpoint_lib.CheckpointRestoreError, ValueError) as error:
      sys.exit(f"Error: {error}")
  return wrapped


def define_flags(argv: list[str]) -> None:
  """Defines the absl flags --workdir, --step and --config, the config of the run that
  argv's --workdir names, so `--config.<key>=<value>` overrides it. Call before app.run."""
  parser = argparse.ArgumentParser(add_help=False)
  parser.add_argument("--workdir", "-workdir")
  workdir = parser.parse_known_args(argv[1:])[0].workdir
  if not workdir and not {"--help", "-h", "--helpfull"} & set(argv[1:]):
    sys.exit("Error: --workdir is required: the workdir of a run (trainer.main's).")
  try:
    config = load_config(workdir) if workdir else common.base_config()
  except (OSError, ValueError) as error:
    sys.exit(f"Error: {error}")  # one line and status 1, before any flag is parsed
  config_flags.DEFINE_config_dict("config", config, "The run's config (<workdir>/"
                                  "config.json); override any setting with --config.<key>.")
  flags.DEFINE_string("workdir", None, "The run's workdir.", required=True)
  flags.DEFINE_integer("step", None, "The step to read (default: the newest that restores "
                       "intact).")
