"""PartitionSpecs for PSGD Kron state, given the params' PartitionSpecs.

The rule (each state leaf of a parameter with spec `ps`):
  * momentum: `ps`, like its parameter;
  * factors (one params-shaped tree per factor slot), each (batch, d, d) or (batch, d):
    the batch axis, ordered (shards, layers, blocks) (see `psgd.layout`), takes the
    mesh axes of the parameter's sharded dims when the optimizer was given
    `param_sharding` (shard-local blocks), then those of its layer axis when
    `scanned_layers` marks it. With shard-local blocks that is all: each device holds
    the factors of its own shards and no more, as it holds its shards of the momentum.
    Otherwise the first d axis is also spread over the remaining mesh axes, largest
    first, taking each axis whose size still divides d, so that no device holds
    every factor;
  * cached P factors (cache_preconditioner): as the factors;
  * Lipschitz memory (batch, number of factors): the batch axis as above;
  * step count, key and flags: replicated.
Any other leaf of the optimizer's state that has a parameter's shape at that
parameter's path (optax.MultiSteps' accumulated gradients, another optimizer's moments)
is placed like the parameter; the rest (a schedule's count) is replicated. Parameters
that optax.masked leaves out have no state, and no specs.
"""

import math
from typing import Any

import jax
import optax
from jax.sharding import PartitionSpec as P

from psgd.kron import (KronState, axis_names, batch_mesh_axes, check_auto_axes, mask_like,
                       padded_spec)


def _entry(axes: tuple[str, ...]):
  """A PartitionSpec entry naming these mesh axes."""
  return None if not axes else axes[0] if len(axes) == 1 else tuple(axes)


def _spread(d: int, mesh_shape: dict[str, int], taken: tuple[str, ...]):
  """Mesh axes (largest first) whose sizes multiply to a divisor of d."""
  chosen, product = [], 1
  for name, size in sorted(mesh_shape.items(), key=lambda kv: -kv[1]):
    if name not in taken and size > 1 and d % (product * size) == 0:
      chosen.append(name)
      product *= size
  return _entry(tuple(chosen))


def _batch_axes(path, param, spec: P, scanned: bool, lipschitz, mesh_shape,
                shard_local: bool) -> tuple[str, ...]:
  """Mesh axes of the factors' batch axis: the shard axes (shard-local blocks), then
  the layer axis's; ValueError when the state's batch cannot hold them."""
  spec = padded_spec(spec, len(param.shape))
  axes = batch_mesh_axes(spec, scanned, shard_local)
  parts = math.prod(mesh_shape[a] for a in axes)
  if lipschitz.shape[0] % parts:
    raise ValueError(
        f"The Kron state of parameter {jax.tree_util.keystr(path)} has {lipschitz.shape[0]} "
        f"blocks, which cannot be placed over mesh axes {axes} ({parts} devices): pass "
        "shard_local=True exactly when the optimizer was given param_sharding, and the "
        "same scanned_layers.")
  return axes


def kron_state_specs(state: KronState, params, param_specs, mesh, scanned_layers=None,
                     shard_local: bool = False) -> KronState:
  """KronState of PartitionSpecs for `state` (arrays or ShapeDtypeStructs)."""
  mesh_shape = dict(mesh.shape)
  scanned = mask_like(scanned_layers, params, "scanned_layers")
  is_spec = lambda x: isinstance(x, P)
  # Left out by optax.masked, or zero-size (no state).
  masked = lambda x: x is None or isinstance(x, optax.MaskedNode)
  batch_axes = jax.tree_util.tree_map_with_path(
      lambda path, p, spec, s, lip: lip if masked(lip) else P(
          _batch_axes(path, p, spec, s, lip, mesh_shape, shard_local)),
      params, param_specs, scanned, state.lipschitz, is_leaf=is_spec)

  def factor_spec(batch, factor):
    taken = axis_names(batch[0])
    spread = None if shard_local else _spread(factor.shape[1], mesh_shape, taken)
    return P(_entry(taken), spread, *([None] * (factor.ndim - 2)))

  def slot_specs(slots):
    return tuple(jax.tree.map(factor_spec, batch_axes, slot, is_leaf=is_spec)
                 for slot in slots)

  return KronState(
      count=P(), key=P(),
      mu=None if state.mu is None else jax.tree.map(
          lambda spec, m: m if masked(m) else spec, param_specs, state.mu, is_leaf=is_spec),
      factors=slot_specs(state.factors),
      precond=None if state.precond is None else slot_specs(state.precond),
      lipschitz=jax.tree.map(lambda b, _: P(_entry(axis_names(b[0])), None), batch_axes,
                             state.lipschitz, is_leaf=is_spec),
      initialized=P(), num_updates=P())


def _like_params(params, param_specs):
  """f(path, leaf): the spec of the parameter whose path ends `path` and whose shape is
  the leaf's, else replicated. Read from paths rather than through
  optax.tree_map_params, which cannot trace optimizers that label params by a function
  of them, such as optax.contrib.muon."""
  by_path = {tuple(path): (leaf.shape, spec) for (path, leaf), spec in zip(
      jax.tree_util.tree_flatten_with_path(params)[0],
      jax.tree.leaves(param_specs, is_leaf=lambda x: isinstance(x, P)))}
  longest = max(map(len, by_path), default=0)

  def spec_of(path, leaf):
    for n in range(min(longest, len(path)), 0, -1):
      shape, spec = by_path.get(tuple(path[-n:]), (None, None))
      if shape == tuple(leaf.shape):
        return spec
    return P()
  return spec_of


def state_partition_specs(opt_state: Any, params, param_specs, mesh, scanned_layers=None,
                          shard_local: bool = False) -> Any:
  """PartitionSpecs for an optimizer state: `KronState`s (e.g. `psgd.kron`'s) by the
  rule above, every other leaf like the parameter it has the shape and path of, or
  replicated. Any optax optimizer's state works (its moments go like the params).

  `opt_state` may be abstract (`jax.eval_shape(tx.init, params)`); `param_specs` is a
  tree of PartitionSpecs matching `params`; `mesh` gives the axis sizes;
  `scanned_layers` is the mask the optimizer was given (its factors of a scanned param
  are then placed along the layer axis like the param; without it, nowhere);
  `shard_local=True` when the optimizer was given `param_sharding` with these specs
  (each device then holds the factors of its own shards).
  """
  check_auto_axes(mesh)
  is_kron = lambda x: isinstance(x, KronState)
  like_params = _like_params(params, param_specs)
  return jax.tree_util.tree_map_with_path(
      lambda path, s: (kron_state_specs(s, params, param_specs, mesh, scanned_layers,
                                        shard_local)
                       if is_kron(s) else like_params(path, s)),
      opt_state, is_leaf=is_kron)
