"""Export a trained run to one .npz file and load it back into the NNX model."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from trainer import checkpoint as checkpoint_lib
from trainer import export
from trainer import main as trainer_main
from trainer_utils import tiny_config


def test_export_then_load_gives_the_checkpoints_params_and_logits_bitwise(tmp_path, capsys):
  workdir = tmp_path / "run"
  config = tiny_config(steps=10, eval_every=0)
  trainer_main.train(config, str(workdir))
  before = sorted(p.relative_to(workdir) for p in workdir.rglob("*"))
  out = tmp_path / "model.npz"
  export.main(["--workdir", str(workdir), "--out", str(out)])
  assert sorted(p.relative_to(workdir) for p in workdir.rglob("*")) == before  # untouched

  model = export.load(str(out))
  loaded = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          loaded)
  saved = checkpoint_lib.read_verified(str(workdir), {"params": abstract})[1]["params"]
  flat_loaded, flat_saved = jax.tree.leaves(loaded), jax.tree.leaves(saved)
  assert len(flat_loaded) == len(flat_saved) > 0
  for a, b in zip(flat_loaded, flat_saved):
    np.testing.assert_array_equal(a, b)

  # The same params put into a model by hand give the same logits; an untrained model's
  # differ (the file holds the trained params, not an init).
  fresh, init_params = export._params_template(config.model.to_dict())
  assert not all(np.array_equal(a, b) for a, b in zip(flat_loaded,
                                                       jax.tree.leaves(init_params)))
  tokens = jnp.arange(2 * 16, dtype=jnp.int32).reshape(2, 16) % config.model.vocab_size
  untrained_logits = fresh(tokens)
  state = nnx.state(fresh, nnx.Param)
  nnx.replace_by_pure_dict(state, saved)
  nnx.update(fresh, state)
  np.testing.assert_array_equal(model(tokens), fresh(tokens))
  assert not np.array_equal(model(tokens), untrained_logits)
  with np.load(out, allow_pickle=False) as data:  # plain arrays and a JSON string only
    assert export.CONFIG_KEY in data.files

  # The file is written under the name given, which the message names, suffix or not.
  other = tmp_path / "model_without_suffix"
  export.main(["--workdir", str(workdir), "--out", str(other)])
  assert f"Wrote {other}" in capsys.readouterr().out
  with np.load(other, allow_pickle=False) as a, np.load(out, allow_pickle=False) as b:
    assert a.files == b.files and all(np.array_equal(a[k], b[k]) for k in a.files)
  assert not other.with_suffix(".npz").exists()
