"""PartitionSpecs for PSGD Kron state, given the params' PartitionSpecs.

The rule (each state leaf of a parameter with spec `ps`):
  * momentum: `ps`, like its parameter;
  * factors (one params-shaped tree per factor slot), each (batch, d, d) or (batch, d):
    the batch axis takes the spec of the parameter's layer axis when `scanned_layers`
    marks it and the batch is that axis (no blocks), else None; the first d axis is
    spread over the remaining mesh axes, largest first, taking each axis whose size
    still divides d, so that no device holds every factor;
  * cached P factors (cache_preconditioner): as the factors;
  * Lipschitz memory (batch, number of factors): the batch axis as above;
  * step count, key and flags: replicated.
Any other leaf of an optax chain around `scale_by_kron` (e.g. a schedule's count) is a
scalar and replicated.
"""

from typing import Any

import jax
from jax.sharding import PartitionSpec as P

from psgd.kron import KronState, mask_like


def _axis_names(entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def _spread(d: int, mesh_shape: dict[str, int], taken: tuple[str, ...]):
  """Mesh axes (largest first) whose sizes multiply to a divisor of d."""
  chosen, product = [], 1
  for name, size in sorted(mesh_shape.items(), key=lambda kv: -kv[1]):
    if name not in taken and size > 1 and d % (product * size) == 0:
      chosen.append(name)
      product *= size
  if not chosen:
    return None
  return chosen[0] if len(chosen) == 1 else tuple(chosen)


def _batch_spec(param, spec: P, scanned: bool, lipschitz) -> P:
  """P(entry) for the factors' batch axis: the entry of the param's layer axis if it is
  scanned and the batch is that axis (no blocks), else None. (A PartitionSpec is a
  pytree leaf, a bare entry such as None or a tuple of axis names would not be.)"""
  layer_batch = scanned and len(spec) > 0 and lipschitz.shape[0] == param.shape[0]
  return P(spec[0] if layer_batch else None)


def kron_state_specs(state: KronState, params, param_specs, mesh,
                     scanned_layers=None) -> KronState:
  """KronState of PartitionSpecs for `state` (arrays or ShapeDtypeStructs)."""
  mesh_shape = dict(mesh.shape)
  scanned = mask_like(scanned_layers, params, "scanned_layers")
  batch_specs = jax.tree.map(_batch_spec, params, param_specs, scanned, state.lipschitz)

  def factor_spec(batch_spec, factor):
    spread = _spread(factor.shape[1], mesh_shape, _axis_names(batch_spec[0]))
    return P(batch_spec[0], spread, *([None] * (factor.ndim - 2)))

  def slot_specs(slots):
    return tuple(jax.tree.map(factor_spec, batch_specs, slot) for slot in slots)

  factor_specs = slot_specs(state.factors)
  return KronState(
      count=P(), key=P(),
      mu=None if state.mu is None else param_specs,
      factors=factor_specs,
      precond=None if state.precond is None else slot_specs(state.precond),
      lipschitz=jax.tree.map(lambda b, _: P(b[0], None), batch_specs, state.lipschitz),
      initialized=P(), num_updates=P())


def state_partition_specs(opt_state: Any, params, param_specs, mesh,
                          scanned_layers=None) -> Any:
  """PartitionSpecs for an optimizer state holding `KronState`s (e.g. `psgd.kron`'s).

  `opt_state` may be abstract (`jax.eval_shape(tx.init, params)`); `param_specs` is a
  tree of PartitionSpecs matching `params`; `mesh` gives the axis sizes;
  `scanned_layers` is the mask the optimizer was given (its factors of a scanned param
  are then placed along the layer axis like the param; without it, nowhere).
  """
  is_kron = lambda x: isinstance(x, KronState)
  return jax.tree.map(
      lambda s: (kron_state_specs(s, params, param_specs, mesh, scanned_layers)
                 if is_kron(s) else P()),
      opt_state, is_leaf=is_kron)
