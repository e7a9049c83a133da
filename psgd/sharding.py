"""PartitionSpecs for PSGD Kron state, given the params' PartitionSpecs.

The rule (each state leaf of a parameter with spec `ps`):
  * momentum: `ps`, like its parameter;
  * factors, shape (batch, d, d) or (batch, d): the batch axis takes the spec of the
    parameter's first dim when it is the layer axis (batch == shape[0] > 1), else None;
    the first d axis is spread over the remaining mesh axes, largest first, taking each
    axis whose size still divides d, so that no device holds every factor;
  * cached P factors (cache_preconditioner): as the factors;
  * Lipschitz memory (batch, 2): the batch axis as above;
  * step count, key and flags: replicated.
Any other leaf of an optax chain around `scale_by_kron` (e.g. a schedule's count) is a
scalar and replicated.
"""

from typing import Any

import jax
from jax.sharding import PartitionSpec as P

from psgd.kron import KronState


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


def _param_state_specs(param, spec: P, factors, mesh_shape):
  batch = factors[0].shape[0]
  first = spec[0] if len(spec) > 0 else None
  batch_entry = first if (param.ndim > 0 and batch == param.shape[0] and batch > 1) else None
  taken = _axis_names(batch_entry)
  factor_specs = tuple(P(batch_entry, _spread(f.shape[1], mesh_shape, taken),
                         *([None] * (f.ndim - 2))) for f in factors)
  return factor_specs, P(batch_entry, None)


def kron_state_specs(state: KronState, params, param_specs, mesh) -> KronState:
  """KronState of PartitionSpecs for `state` (arrays or ShapeDtypeStructs)."""
  mesh_shape = dict(mesh.shape)
  treedef = jax.tree.structure(params)
  per_param = [
      _param_state_specs(p, s, f, mesh_shape) for p, s, f in zip(
          jax.tree.leaves(params), treedef.flatten_up_to(param_specs),
          treedef.flatten_up_to(state.factors))
  ]
  factor_specs = treedef.unflatten([f for f, _ in per_param])
  return KronState(
      count=P(), key=P(),
      mu=None if state.mu is None else param_specs,
      factors=factor_specs,
      precond=None if state.precond is None else factor_specs,
      lipschitz=treedef.unflatten([lip for _, lip in per_param]),
      initialized=P(), num_updates=P())


def state_partition_specs(opt_state: Any, params, param_specs, mesh) -> Any:
  """PartitionSpecs for an optimizer state holding `KronState`s (e.g. `psgd.kron`'s).

  `opt_state` may be abstract (`jax.eval_shape(tx.init, params)`); `param_specs` is a
  tree of PartitionSpecs matching `params`; `mesh` gives the axis sizes.
  """
  is_kron = lambda x: isinstance(x, KronState)
  return jax.tree.map(
      lambda s: kron_state_specs(s, params, param_specs, mesh) if is_kron(s) else P(),
      opt_state, is_leaf=is_kron)
