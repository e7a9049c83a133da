"""The optimizer from the config: schedules, baselines, width scaling."""

import jax
import jax.numpy as jnp
import pytest

import psgd
from configs.common import base_config
from trainer import optim


def test_warmup_then_cosine_to_the_floor():
  cfg = base_config().optimizer
  cfg.update(dict(learning_rate=1.0, warmup_steps=10, decay="cosine", min_lr_ratio=0.1))
  schedule = optim.learning_rate_schedule(cfg, total_steps=110)
  assert float(schedule(0)) == 0.0 and float(schedule(5)) == pytest.approx(0.5)
  assert float(schedule(10)) == pytest.approx(1.0)
  assert float(schedule(60)) == pytest.approx(0.55, abs=1e-3)  # halfway down the cosine
  assert float(schedule(110)) == pytest.approx(0.1)


def test_warmup_then_linear_to_the_floor_of_the_width_scaled_peak():
  cfg = base_config().optimizer
  cfg.update(dict(learning_rate=1.0, warmup_steps=10, decay="linear", min_lr_ratio=0.1))
  schedule = optim.learning_rate_schedule(cfg, total_steps=110, width_multiplier=4)
  assert float(schedule(10)) == pytest.approx(0.25)
  assert float(schedule(60)) == pytest.approx(0.1375)  # halfway from 0.25 to 0.025
  assert float(schedule(110)) == pytest.approx(0.025)


def test_warmup_longer_than_the_run_ends_at_the_peak():
  cfg = base_config().optimizer
  cfg.update(dict(learning_rate=1.0, warmup_steps=20, decay="cosine", min_lr_ratio=0.1))
  schedule = optim.learning_rate_schedule(cfg, total_steps=10)
  assert float(schedule(5)) == pytest.approx(0.5) and float(schedule(10)) == pytest.approx(1.0)


def test_gradients_are_clipped_to_the_global_norm_before_the_optimizer():
  cfg = base_config().optimizer
  cfg.update(dict(name="sgd", b1=0.0, learning_rate=1.0, warmup_steps=0, decay="constant",
                  weight_decay=0.0, grad_clip_norm=1.0))
  tx, _ = optim.make_optimizer(cfg, 10)
  grads = {"w": jnp.full((10,), 10.0 / 10**0.5)}  # global norm 10
  updates, _ = tx.update(grads, tx.init(grads), grads)
  assert float(jnp.linalg.norm(updates["w"])) == pytest.approx(1.0, rel=1e-5)


def test_muon_decays_only_where_the_mask_says():
  cfg = base_config().optimizer
  cfg.update(dict(name="muon", learning_rate=0.1, warmup_steps=0, decay="constant",
                  weight_decay=0.5))
  params = {"w": jnp.ones((4, 3)), "v": jnp.ones((4, 3))}
  tx, _ = optim.make_optimizer(cfg, 10, weight_decay_mask={"w": True, "v": False},
                               matrix_axes={"w": ((0,), (1,)), "v": ((0,), (1,))})
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  assert float(jnp.abs(updates["w"]).max()) > 0
  assert float(jnp.abs(updates["v"]).max()) == 0


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_every_named_optimizer_decays_the_masked_params_as_adamw_does(name):
  """With zero gradients an update is -lr * wd * p on the params the mask marks (a
  matrix and a vocabulary table, which Muon hands to its AdamW part) and 0 on the
  others (a norm's scale), at every step: outside the momentum and the sign. Muon's
  AdamW part decays its norm's scale too, as optax's muon does."""
  cfg = base_config().optimizer
  cfg.update(dict(name=name, learning_rate=0.1, warmup_steps=0, decay="constant",
                  weight_decay=0.5))
  params = {"w": jnp.full((4, 3), 2.0), "table": jnp.full((6, 4), 3.0),
            "scale": jnp.ones(4)}
  tx, _ = optim.make_optimizer(
      cfg, 10, scanned_layers=jax.tree.map(lambda _: False, params),
      weight_decay_mask={"w": True, "table": True, "scale": False},
      matrix_axes={"w": ((0,), (1,)), "table": None, "scale": None})
  state = tx.init(params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  for _ in range(3):
    updates, state = tx.update(zeros, state, params)
    for key, decayed in (("w", True), ("table", True), ("scale", name == "muon")):
      expected = -0.1 * 0.5 * params[key] if decayed else jnp.zeros_like(params[key])
      assert jnp.allclose(updates[key], expected, rtol=1e-5, atol=1e-7), (key, updates[key])


def test_sign_sgd_decay_is_not_inside_the_sign():
  cfg = base_config().optimizer
  cfg.update(dict(name="sign_sgd", learning_rate=0.1, warmup_steps=0, decay="constant",
                  weight_decay=0.5))
  params = {"w": jnp.full((3,), 1.0)}
  tx, _ = optim.make_optimizer(cfg, 10, weight_decay_mask={"w": True})
  updates, _ = tx.update({"w": jnp.full((3,), -1e-3)}, tx.init(params), params)
  # sign(g) + wd * p = -0.5, where sign(g + wd * p) would be +1.
  assert jnp.allclose(updates["w"], -0.1 * (-1.0 + 0.5 * 1.0))


def test_width_multiplier_scales_the_peak_learning_rate():
  cfg = base_config().optimizer
  cfg.update(dict(learning_rate=0.4, warmup_steps=0, decay="constant"))
  assert float(optim.learning_rate_schedule(cfg, 100, width_multiplier=4)(50)) == \
      pytest.approx(0.1)


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_every_named_optimizer_steps_downhill(name):
  cfg = base_config().optimizer
  cfg.update(dict(name=name, learning_rate=0.05, warmup_steps=0, decay="constant",
                  weight_decay=0.0))
  params = {"w": jnp.ones((4, 3)), "b": jnp.ones(3)}
  mask = {"w": True, "b": False}
  tx, _ = optim.make_optimizer(cfg, 100, scanned_layers={"w": False, "b": False},
                               weight_decay_mask=mask,
                               matrix_axes={"w": ((0,), (1,)), "b": None})
  loss = lambda p: sum(jnp.sum(x**2) for x in jax.tree.leaves(p))
  state = tx.init(params)
  for _ in range(5):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    params = jax.tree.map(jnp.add, params, updates)
  assert float(loss(params)) < 15.0 - 0.5
  has_kron = any(isinstance(s, psgd.KronState) for s in
                 jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, psgd.KronState)))
  assert has_kron == (name == "kron")


def test_unknown_optimizer_and_schedule_are_refused():
  cfg = base_config().optimizer
  cfg.name = "adamm"
  with pytest.raises(ValueError, match="optimizer.name"):
    optim.check_config(cfg)
  cfg.name, cfg.decay = "kron", "step"
  with pytest.raises(ValueError, match="optimizer.decay"):
    optim.check_config(cfg)
