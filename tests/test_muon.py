"""Muon (optax.contrib.muon) as a baseline in the trainer: matrices from metadata, each
scanned layer its own matrix, state sharded like the params, exact resume."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

import models
from trainer import main as trainer_main
from trainer import optim
from trainer_utils import losses_by_step, tiny_config


def _muon_config(**train):
  config = tiny_config(**train)
  config.optimizer.update(dict(name="muon", learning_rate=3e-3))
  return config


def test_matrix_axes_split_each_weight_at_the_residual_width():
  config = tiny_config()
  abstract = nnx.eval_shape(lambda: models.build(config.model, nnx.Rngs(0)))
  axes = nnx.to_pure_dict(models.matrix_axes(nnx.state(abstract, nnx.Param)))
  layers = axes["blocks"]["layers"]
  assert layers["attn"]["wq"] == ((1,), (2, 3))  # (layers, embed, heads, head_dim)
  assert layers["attn"]["wo"] == ((1, 2), (3,))  # (layers, heads, head_dim, embed)
  assert layers["mlp"]["up"] == ((1,), (2,)) and layers["mlp"]["down"] == ((1,), (2,))
  assert axes["embed"]["table"] is None and layers["attn_norm"]["scale"] is None


def test_a_scanned_weight_is_orthogonalised_per_layer():
  cfg = ml_collections.ConfigDict(dict(b1=0.9, b2=0.95, weight_decay=0.0,
                                       muon=dict(consistent_rms=0.2)))
  grads = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 4))
  stacked = optim.muon(1.0, cfg, None, {"w": ((1,), (2,))})
  per_layer = optim.muon(1.0, cfg, None, {"w0": ((0,), (1,)), "w1": ((0,), (1,))})
  params = {"w": jnp.zeros((2, 8, 4))}
  update, _ = stacked.update({"w": grads}, stacked.init(params), params)
  split = {"w0": grads[0], "w1": grads[1]}
  expected, _ = per_layer.update(split, per_layer.init(split), split)
  np.testing.assert_allclose(update["w"][0], expected["w0"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(update["w"][1], expected["w1"], rtol=1e-5, atol=1e-6)
  # Orthogonalised: each layer's singular values are equal (Newton-Schulz, roughly).
  singular = jnp.linalg.svd(update["w"][0], compute_uv=False)
  assert float(singular.max() / singular.min()) < 1.5


def test_muon_trains_on_8_devices_resumes_bitwise_and_shards_like_the_params(tmp_path):
  straight, resumed = tmp_path / "straight", tmp_path / "resumed"
  for workdir, stop_at in ((straight, 0), (resumed, 4), (resumed, 0)):
    config = _muon_config(steps=8, log_every=1, eval_every=0, stop_at=stop_at)
    config.mesh.shape = (2, 2, 2)
    state, _ = trainer_main.train(config, str(workdir))
  losses = losses_by_step(straight)
  assert losses == losses_by_step(resumed)  # bitwise
  assert losses[8] < losses[1]
  up = state.params["blocks"]["layers"]["mlp"]["up"]
  momenta = [x for p, x in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
             if jax.tree_util.keystr(p).endswith("['mlp']['up']")]
  assert momenta and all(m.sharding.spec == up.sharding.spec for m in momenta)
  assert any(isinstance(s, optax.contrib.MuonState) for s in jax.tree.leaves(
      state.opt_state, is_leaf=lambda x: isinstance(x, optax.contrib.MuonState)))
