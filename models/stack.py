"""A stack of identical blocks: stacked and scanned (one compiled block), or a Python loop.

Scanned, every block parameter gains a leading axis named `LAYER_AXIS` in its logical
axis names (nnx.vmap at build, nnx.scan at call, both with that partition name), which
is how `models.metadata` tells stacked parameters apart. Either way the blocks live under
the attribute `layers`: the scanned layout's path `layers/...` holding [L, ...] arrays is
the loop layout's `layers/i/...`.
"""

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

LAYER_AXIS = "layers"
_TRANSFORM_METADATA = {nnx.PARTITION_NAME: LAYER_AXIS}

# Remat policy name -> jax.checkpoint policy; 'none' calls blocks without remat.
REMAT_POLICIES = {
    "full": None,  # save nothing; the backward pass recomputes the whole block
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # weight matmuls
}
REMAT_CHOICES = ("none", *REMAT_POLICIES)


def _block_call(remat: str) -> Callable:
  """(block, x) -> block(x), rematerialized as the policy says."""
  call = lambda block, x: block(x)
  return call if remat == "none" else nnx.remat(call, policy=REMAT_POLICIES[remat])


class LayerStack(nnx.Module):
  """num_layers blocks made by make_block(rngs), applied in order to the residual stream."""

  def __init__(self, make_block: Callable[[nnx.Rngs], nnx.Module], num_layers: int, *,
               scan: bool, remat: str, rngs: nnx.Rngs, unroll: bool = False):
    if scan:
      @nnx.split_rngs(splits=num_layers)
      @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata=_TRANSFORM_METADATA)
      def make_stacked(rngs):
        return make_block(rngs)

      self.layers = make_stacked(rngs)
    else:
      self.layers = nnx.List([make_block(rngs) for _ in range(num_layers)])
    self.scan = scan
    self.remat = remat
    self.unroll = unroll  # scanned layers traced one after another, with no loop

  def __call__(self, x: jax.Array) -> jax.Array:
    call = _block_call(self.remat)
    if not self.scan:
      for block in self.layers:
        x = call(block, x)
      return x

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry, unroll=self.unroll,
              transform_metadata=_TRANSFORM_METADATA)
    def run(x, block):
      return call(block, x)

    return run(x, self.layers)

  def decode(self, x: jax.Array, cache, start) -> tuple[jax.Array, object]:
    """x through every block's `decode(x, layer_cache, start)`; `cache` holds the layers'
    caches stacked on a leading layer axis, in both layouts."""
    if not self.scan:
      layer_caches = []
      for i, block in enumerate(self.layers):
        x, layer_cache = block.decode(x, jax.tree.map(lambda c, i=i: c[i], cache), start)
        layer_caches.append(layer_cache)
      return x, jax.tree.map(lambda *c: jnp.stack(c), *layer_caches)

    @nnx.scan(in_axes=(nnx.Carry, 0, 0), out_axes=(nnx.Carry, 0), unroll=self.unroll,
              transform_metadata=_TRANSFORM_METADATA)
    def run(x, block, layer_cache):
      return block.decode(x, layer_cache, start)

    return run(x, self.layers, cache)
