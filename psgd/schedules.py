"""Schedules for how often the preconditioner is refitted."""

import jax.numpy as jnp


def precond_update_prob_schedule(max_prob: float = 1.0, min_prob: float = 0.03,
                                 decay: float = 0.001, flat_start: int = 500):
  """p(n) = clip(max_prob * exp(-decay * (n - flat_start)), min_prob, max_prob).

  Every step refits the preconditioner for the first `flat_start` steps, while it is far
  from fitted; then the rate anneals to a floor, where a step costs little more than
  applying the preconditioner.
  """
  for name, value in (("max_prob", max_prob), ("min_prob", min_prob)):
    if not 0.0 <= value <= 1.0:
      raise ValueError(f"precond_update_prob_schedule: {name}={value} must be in [0, 1].")

  def schedule(count):
    prob = max_prob * jnp.exp(-decay * (jnp.asarray(count, jnp.float32) - flat_start))
    return jnp.clip(prob, min_prob, max_prob)

  return schedule
