"""The train step on a toy loss: skipped steps, and the learning rate it reports."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import common
from trainer import optim
from trainer import step as step_lib


def linear_loss(params, batch):
  """sum(w * g) * scale: the gradient is g * scale, and scale=NaN makes the loss NaN."""
  return jnp.sum(params["w"] * batch["g"]) * batch["scale"]


def fresh_state(tx, params):
  return step_lib.TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params),
                             nonfinite_in_a_row=jnp.int32(0))


def batch(g, scale=1.0):
  return {"g": jnp.asarray(g, jnp.float32), "scale": jnp.float32(scale)}


@pytest.mark.parametrize("name", ["kron", "adamw"])
def test_lr_is_the_one_applied_when_steps_are_skipped(name):
  cfg = common.base_config().optimizer
  cfg.update(dict(name=name, warmup_steps=3))  # the lr changes at every count
  tx, schedule = optim.make_optimizer(cfg, total_steps=10)
  step = jax.jit(step_lib.make_train_step(linear_loss, tx, schedule, microbatches=1))
  state = fresh_state(tx, {"w": jnp.ones((4, 4))})
  g = np.linspace(-1, 1, 16).reshape(4, 4)
  skip_pattern = [False, True, False, True, True, False, False]
  applied = 0
  for i, skipped in enumerate(skip_pattern):
    state, metrics = step(state, batch(g, np.nan if skipped else 1.0))
    assert int(metrics["train/skipped"]) == skipped
    np.testing.assert_allclose(float(metrics["train/lr"]), float(schedule(applied)),
                               rtol=1e-6)
    if i > 1:  # past the first skip the train step runs ahead of the optimizer's count
      assert float(metrics["train/lr"]) != float(schedule(i))
    applied += not skipped
  assert int(step_lib.applied_updates(state.opt_state)) == applied


def test_finite_step_that_writes_nonfinite_params_is_skipped():
  huge = optax.constant_schedule(3e38)  # finite, but lr * gradient overflows float32
  tx = optax.sgd(huge)
  step = jax.jit(step_lib.make_train_step(linear_loss, tx, huge, microbatches=1))
  state = fresh_state(tx, {"w": jnp.ones(2)})

  state, metrics = step(state, batch([2.0, 2.0]))  # update -6e38: -inf params
  assert np.isfinite(float(metrics["train/loss"])) and np.isfinite(
      float(metrics["train/grad_norm"]))
  assert int(metrics["train/skipped"]) == 1 and int(metrics["train/skipped_in_a_row"]) == 1
  np.testing.assert_array_equal(state.params["w"], np.ones(2))  # unchanged
  assert int(step_lib.applied_updates(state.opt_state)) == 0
  assert int(state.step) == 1  # a skipped step is still a step: checkpoints count it

  state, metrics = step(state, batch([1e-37, 1e-37]))  # update -30: finite, applied
  assert int(metrics["train/skipped"]) == 0 and int(metrics["train/skipped_in_a_row"]) == 0
  np.testing.assert_allclose(state.params["w"], np.ones(2) - 3e38 * 1e-37, rtol=1e-5)
  assert int(step_lib.applied_updates(state.opt_state)) == 1
  assert int(state.step) == 2


def test_microbatches_average_to_the_full_batch_gradient():
  """The loss is a mean over rows, so 2 microbatches of 2 rows give the gradient of 4."""
  mean_loss = lambda params, batch: jnp.mean(jnp.sum(params["w"] * batch["g"], axis=(1, 2)))
  tx = optax.sgd(optax.constant_schedule(1.0))  # the step reads its schedule's count
  rows = {"g": jnp.arange(16.0).reshape(4, 2, 2)}
  results = []
  for micro in (1, 2):
    step = jax.jit(step_lib.make_train_step(mean_loss, tx, optax.constant_schedule(1.0),
                                            microbatches=micro))
    results.append(step(fresh_state(tx, {"w": jnp.zeros((2, 2))}), rows))
  (one, one_metrics), (two, two_metrics) = results
  np.testing.assert_allclose(two.params["w"], -rows["g"].mean(0), rtol=1e-6)
  np.testing.assert_allclose(two.params["w"], one.params["w"], rtol=1e-6)
  assert float(two_metrics["train/grad_norm"]) == pytest.approx(
      float(one_metrics["train/grad_norm"]))


def test_microbatches_with_unequal_masked_tokens_give_the_whole_batch_mean():
  """A mean over masked tokens: microbatches holding 1 and 6 tokens must weigh 1 : 6, as
  one pass over the batch does, not 1 : 1."""
  def masked_mean(params, batch):
    per_token = jnp.sum(params["w"] * batch["g"], axis=-1)
    return jnp.sum(per_token * batch["mask"]) / jnp.maximum(jnp.sum(batch["mask"]), 1)
  tx = optax.sgd(optax.constant_schedule(1.0))
  rows = {"g": jnp.arange(24.0).reshape(4, 3, 2),
          "mask": jnp.array([[1, 0, 0], [0, 0, 0], [1, 1, 1], [1, 1, 1]], bool)}
  results = []
  for micro in (1, 2):
    step = jax.jit(step_lib.make_train_step(masked_mean, tx, optax.constant_schedule(1.0),
                                            microbatches=micro))
    results.append(step(fresh_state(tx, {"w": jnp.ones(2)}), rows))
  (one, one_metrics), (two, two_metrics) = results
  np.testing.assert_allclose(two.params["w"], one.params["w"], rtol=1e-6)
  assert float(two_metrics["train/loss"]) == pytest.approx(float(one_metrics["train/loss"]))


def test_a_non_finite_loss_with_finite_gradients_is_skipped():
  """A NaN term that carries no gradient: the gradients alone would let the step pass."""
  nan_loss = lambda params, batch: (jnp.sum(params["w"] * batch["g"])
                                    + jax.lax.stop_gradient(jnp.float32(jnp.nan)))
  tx = optax.sgd(optax.constant_schedule(1.0))
  step = jax.jit(step_lib.make_train_step(nan_loss, tx, optax.constant_schedule(1.0),
                                          microbatches=1))
  state, metrics = step(fresh_state(tx, {"w": jnp.ones(2)}), batch([1.0, 1.0]))
  assert np.isfinite(float(metrics["train/grad_norm"]))
  assert int(metrics["train/skipped"]) == 1
  np.testing.assert_array_equal(state.params["w"], np.ones(2))
