"""Schedules for how often the preconditioner is refitted, and with what step."""

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
  for name, value in (("decay", decay), ("flat_start", flat_start)):
    if not value >= 0:
      raise ValueError(f"precond_update_prob_schedule: {name}={value} must be >= 0.")

  def schedule(count):
    prob = max_prob * jnp.exp(-decay * (jnp.asarray(count, jnp.float32) - flat_start))
    return jnp.clip(prob, min_prob, max_prob)

  return schedule


def precond_lr_schedule(start: float = 0.7, end: float = 0.1, decay_refits: float = 50.0):
  """lr(n) = end + (start - end) * exp(-n / decay_refits), n the refits done so far.

  A schedule for `preconditioner_lr`: large steps while P is far from fitted (it gets
  close in tens of refits), then small ones, which average over more gradients and so
  leave a less noisy P (tests/test_psgd_fitting.py measures both ends).
  """
  for name, value in (("start", start), ("end", end), ("decay_refits", decay_refits)):
    if not value > 0:
      raise ValueError(f"precond_lr_schedule: {name}={value} must be positive.")

  def schedule(num_refits):
    n = jnp.asarray(num_refits, jnp.float32)
    return end + (start - end) * jnp.exp(-n / decay_refits)

  return schedule
