"""The functional train and eval steps: params and optimizer state as plain pytrees.

The model is rebuilt from its graphdef inside the step (`nnx.merge`), so the optimizer
state never passes through nnx (whose per-variable sharding metadata does not fit PSGD
factors) and the whole state is one pytree that jit can donate and Orbax can save.
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import models
import psgd


class TrainState(NamedTuple):
  step: jax.Array  # int32
  params: Any
  opt_state: Any
  nonfinite_in_a_row: jax.Array  # int32: skipped steps since the last good one


def _logits(graphdef, rest, rules, params, inputs) -> jax.Array:
  """The model's logits, run under the logical axis rules that place its activations."""
  model = nnx.merge(graphdef, params, rest)
  with nnx.logical_axis_rules(rules):
    return model(inputs)


def make_loss_fn(graphdef, rest, rules=()) -> Callable:
  """loss(params, batch): mean next-token cross entropy over the batch's masked tokens."""
  def loss_fn(params, batch):
    logits = _logits(graphdef, rest, rules, params, batch["inputs"])
    return models.cross_entropy(logits, batch["targets"], batch.get("mask"))
  return loss_fn


def _precond_update_rate(opt_state) -> jax.Array:
  """Fraction of steps that refitted the PSGD preconditioner (0 for other optimizers)."""
  states = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, psgd.KronState))
            if isinstance(s, psgd.KronState)]
  if not states:
    return jnp.float32(0.0)
  return states[0].num_updates / jnp.maximum(states[0].count, 1)


def _is_schedule_state(x) -> bool:
  return isinstance(x, optax.ScaleByScheduleState)


def applied_updates(opt_state) -> jax.Array:
  """How many updates the optimizer has applied: the count its learning-rate schedule
  reads. It stands still on skipped steps, and carries over with the optimizer state
  when fine-tuning, so it can differ from the train step."""
  counts = [s.count for s in jax.tree.leaves(opt_state, is_leaf=_is_schedule_state)
            if _is_schedule_state(s)]
  if not counts:
    raise ValueError("The optimizer state holds no learning-rate schedule count "
                     "(optax.ScaleByScheduleState): build the optimizer with a schedule.")
  return counts[0]


def _all_finite(tree) -> jax.Array:
  return jnp.all(jnp.array([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]))


def make_train_step(loss_fn: Callable, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, microbatches: int,
                    unroll_microbatches: bool = False) -> Callable:
  """step(state, batch) -> (state, metrics); the loss and gradients of the whole batch,
  accumulated over microbatches in a loop or, with unroll_microbatches, one after
  another. `loss_fn` is a mean over the batch's `mask` (all of it without one), so each
  microbatch counts by its masked tokens, and the result is the whole batch's mean.

  A step whose loss, gradients or updated params are not finite changes nothing but
  the counter of such steps in a row; the loop decides when to give up.
  """
  grad_fn = jax.value_and_grad(loss_fn)

  def accumulated_grads(params, batch):
    if microbatches == 1:
      return grad_fn(params, batch)
    split = jax.tree.map(lambda x: x.reshape(microbatches, -1, *x.shape[1:]), batch)

    def body(carry, micro):
      weights, sums = carry
      weight = jnp.sum(micro["mask"], dtype=jnp.float32) if "mask" in micro else 1.0
      sums = jax.tree.map(lambda total, x: total + weight * x, sums, grad_fn(params, micro))
      return (weights + weight, sums), None

    zeros = (jnp.float32(0.0), jax.tree.map(jnp.zeros_like, params))
    (weights, sums), _ = jax.lax.scan(body, (jnp.float32(0.0), zeros), split,
                                      unroll=unroll_microbatches)
    return jax.tree.map(lambda x: x / jnp.maximum(weights, 1.0), sums)

  def step(state: TrainState, batch):
    loss, grads = accumulated_grads(state.params, batch)
    grad_norm = optax.tree.norm(grads)

    def skip(state):
      return state._replace(step=state.step + 1,
                            nonfinite_in_a_row=state.nonfinite_in_a_row + 1)

    def apply(state):
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
      applied = state._replace(step=state.step + 1, params=params, opt_state=opt_state,
                               nonfinite_in_a_row=jnp.int32(0))
      # Finite gradients can still overflow into the params (a huge learning rate, a
      # degenerate preconditioner): such a step is skipped as well.
      return jax.lax.cond(_all_finite(params), lambda: applied, lambda: skip(state))

    new_state = jax.lax.cond(jnp.isfinite(loss) & jnp.isfinite(grad_norm), apply, skip,
                             state)
    metrics = {"train/loss": loss, "train/grad_norm": grad_norm,
               # What this step applied (or would have): skipped steps do not advance it.
               "train/lr": schedule(applied_updates(state.opt_state)),
               "train/precond_update_rate": _precond_update_rate(new_state.opt_state),
               "train/skipped": (new_state.nonfinite_in_a_row > 0).astype(jnp.int32),
               "train/skipped_in_a_row": new_state.nonfinite_in_a_row}
    return new_state, metrics

  return step


def make_eval_step(graphdef, rest, rules=()) -> Callable:
  """eval(params, batch) -> (summed token loss, token count), so padded eval batches
  (mask False) average correctly across batches."""
  def eval_step(params, batch):
    mask = batch["mask"].astype(jnp.float32)
    logits = _logits(graphdef, rest, rules, params, batch["inputs"])
    loss = models.cross_entropy(logits, batch["targets"], mask)
    count = jnp.sum(mask)
    return loss * count, count
  return eval_step
