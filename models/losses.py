"""Losses on float32 logits."""

from typing import Optional

import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits: jax.Array, targets: jax.Array,
                  mask: Optional[jax.Array] = None) -> jax.Array:
  """Mean next-token cross-entropy in nats, float32.

  logits [..., vocab], targets int [...]; mask [...] (bool or 0/1) selects the positions
  averaged over (e.g. no padding); a mask with no position set gives 0.
  """
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                           targets)
  if mask is None:
    return jnp.mean(losses)
  mask = mask.astype(jnp.float32)
  return jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.0)
