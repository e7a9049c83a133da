"""Export a run's params and model config to one portable .npz file, and load it back.

    python -m trainer.export --workdir runs/cpu_lm --out runs/cpu_lm.npz

writes the params of the run's newest checkpoint that restores intact, each under its
path ('blocks/layers/attn/wq'), and the model section of the run's config as JSON under
'__model_config__'; the file opens with plain numpy (no pickle). In Python:

    model = trainer.export.load("runs/cpu_lm.npz")  # the Flax NNX model, params in place
    logits = model(tokens)

Nothing in the workdir is written.
"""

import argparse
import json

import jax
import numpy as np
from flax import nnx

import models
from trainer import checkpoint as checkpoint_lib
from trainer import paths, saved_run

CONFIG_KEY = "__model_config__"


def _key(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _params_template(model_config):
  """(model, its params as a pure dict) of the model the config describes."""
  model = models.build(model_config, nnx.Rngs(0))
  return model, nnx.to_pure_dict(nnx.state(model, nnx.Param))


def export(workdir: str, out: str) -> None:
  """Write the newest checkpoint's params of the run in `workdir` to `out` (.npz)."""
  workdir = paths.absolute(workdir)
  model_config = saved_run.load_config(workdir).model.to_dict()
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          nnx.eval_shape(lambda: _params_template(model_config)[1]))
  _, restored = checkpoint_lib.read_verified(workdir, {"params": abstract})
  params = restored["params"]
  arrays = {_key(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
  with open(out, "wb") as file:  # a path would get ".npz" added when it lacks it
    np.savez(file, **arrays, **{CONFIG_KEY: np.array(json.dumps(model_config))})


def load(path: str) -> nnx.Module:
  """The model an `export` file describes, with its params."""
  with np.load(path, allow_pickle=False) as data:
    model, template = _params_template(json.loads(str(data[CONFIG_KEY])))
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    params = treedef.unflatten([data[_key(p)] for p, _ in leaves])
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, params)
  nnx.update(model, state)
  return model


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="the run's workdir")
  parser.add_argument("--out", required=True, help="the .npz file to write")
  args = parser.parse_args(argv)
  export(args.workdir, args.out)
  print(f"Wrote {args.out}")


if __name__ == "__main__":
  main()
