"""A run's workdir read back by the tools that use a trained run (eval, sample, export).

    python -m trainer.eval --workdir runs/cpu_lm --config.data.eval_batches=64

The run's config is the one trainer.main saved in <workdir>/config.json; `--config.<key>`
flags override it, as they override a config file for trainer.main.
"""

import argparse
import json
import sys

import ml_collections
from absl import flags
from etils import epath
from ml_collections import config_flags

from trainer import paths


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config the run in `workdir` was started with."""
  path = epath.Path(paths.absolute(workdir)) / "config.json"
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist: --workdir must be the workdir of a run "
                            "(trainer.main writes its config there).")
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def define_flags(argv: list[str]) -> None:
  """Defines the absl flags --workdir, --step and --config, the config of the run that
  argv's --workdir names, so `--config.<key>=<value>` overrides it. Call before app.run."""
  parser = argparse.ArgumentParser(add_help=False)
  parser.add_argument("--workdir")
  workdir = parser.parse_known_args(argv[1:])[0].workdir
  try:
    config = load_config(workdir) if workdir else ml_collections.ConfigDict()
  except FileNotFoundError as error:
    sys.exit(f"Error: {error}")  # one line and status 1, before any flag is parsed
  config_flags.DEFINE_config_dict("config", config, "The run's config (<workdir>/"
                                  "config.json); override any setting with --config.<key>.")
  flags.DEFINE_string("workdir", None, "The run's workdir.", required=True)
  flags.DEFINE_integer("step", None, "The step to read (default: the newest that restores "
                       "intact).")
