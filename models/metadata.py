"""What the trainer needs to know about parameters, read from their axis-name metadata.

Everything here comes from the logical axis names each `nnx.Param` stores as its
`out_sharding` metadata (a stacked parameter's names start with 'layers'), never from
parameter names or paths.

The params state is an `nnx.State` of Params:

    graphdef, params = nnx.split(model, nnx.Param)   # or nnx.state(model, nnx.Param)
    model = nnx.merge(graphdef, params)

`scanned_mask`, `weight_decay_mask` and `partition_specs` return that same State with
each Param's value replaced (a bool, a PartitionSpec), so the result has the params'
tree structure: `jax.tree.map(f, params, mask)` works, and it can be passed as an
optimizer mask (e.g. `psgd.kron(scanned_layers=...)`). `nnx.to_pure_dict` turns either
into nested dicts of the same shape.
"""

import dataclasses
import math
from typing import Any, Callable, Optional, Sequence

import jax
from flax import nnx
from jax.sharding import PartitionSpec

from models.stack import LAYER_AXIS

# (logical axis name, mesh axis name / tuple of names / None), as in nnx.logical_axis_rules.
AxisRules = Sequence[tuple[str, Any]]


@dataclasses.dataclass(frozen=True)
class ParamInfo:
  """One parameter's axes: logical names, whether (and where) layers are stacked, spec."""

  logical_axes: tuple[Optional[str], ...]
  stacked: bool
  layer_axis: Optional[int]
  spec: PartitionSpec


def param_count(params_state: Any) -> int:
  """Number of parameter entries (arrays or ShapeDtypeStructs, any pytree)."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(params_state))


def logical_axes(path: tuple, param: nnx.Variable) -> tuple[Optional[str], ...]:
  """The parameter's logical axis names; ValueError unless there is one per dim."""
  axes = param.get_metadata().get("out_sharding")
  if axes is None or len(axes) != param.ndim:
    raise ValueError(f"parameter {'/'.join(map(str, path))} of shape {param.shape} needs one "
                     f"logical axis name per dim as 'out_sharding' metadata; it has {axes}.")
  return tuple(axes)


def layer_axis(axes: tuple[Optional[str], ...]) -> Optional[int]:
  """Position of the stacked-layers axis in the names, or None."""
  return axes.index(LAYER_AXIS) if LAYER_AXIS in axes else None


def logical_to_spec(axes: tuple[Optional[str], ...], rules: AxisRules) -> PartitionSpec:
  """PartitionSpec of logical axes under rules; every name must have exactly one rule."""
  logical_names = [name for name, _ in rules]
  repeated = {name for name in logical_names if logical_names.count(name) > 1}
  if repeated:
    raise ValueError(f"axis rules name {sorted(repeated)} more than once: {tuple(rules)}.")
  table = dict(rules)
  missing = [name for name in axes if name is not None and name not in table]
  if missing:
    raise ValueError(f"logical axis {missing[0]!r} has no axis rule; rules: {tuple(rules)}.")
  return PartitionSpec(*(None if name is None else table[name] for name in axes))


def _is_param(x) -> bool:
  return isinstance(x, nnx.Variable)


def _key_path(jax_path) -> tuple:
  """A jax key path into a State as nnx's path tuple, e.g. ('blocks', 'layers', 'mlp')."""
  return tuple(entry.key for entry in jax_path)


def _map_params(fn: Callable[[tuple, nnx.Variable], Any], params_state: nnx.State):
  """params_state with each Param's value replaced by fn(path, param)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, param: param.replace(fn(_key_path(path), param)), params_state,
      is_leaf=_is_param)


def param_info(params_state: nnx.State, rules: AxisRules) -> dict[tuple, ParamInfo]:
  """{nnx path tuple: ParamInfo} for every parameter, specs under `rules`."""
  def describe(path, param):
    axes = logical_axes(path, param)
    axis = layer_axis(axes)
    return ParamInfo(logical_axes=axes, stacked=axis is not None, layer_axis=axis,
                     spec=logical_to_spec(axes, rules))

  flat, _ = jax.tree_util.tree_flatten_with_path(params_state, is_leaf=_is_param)
  return {_key_path(path): describe(_key_path(path), param) for path, param in flat}


def scanned_mask(params_state: nnx.State) -> nnx.State:
  """True for parameters stacked over layers (their names include 'layers')."""
  return _map_params(lambda path, param: layer_axis(logical_axes(path, param)) is not None,
                     params_state)


def weight_decay_mask(params_state: nnx.State) -> nnx.State:
  """True for parameters with two or more dims besides the layer axis.

  Norm scales and biases (vectors per layer) are conventionally left undecayed.
  """
  def decayed(path, param):
    axes = logical_axes(path, param)
    return len(axes) - (layer_axis(axes) is not None) >= 2

  return _map_params(decayed, params_state)


def partition_specs(params_state: nnx.State, rules: AxisRules) -> nnx.State:
  """Each parameter's PartitionSpec under `rules`, one entry per dim."""
  return _map_params(lambda path, param: logical_to_spec(logical_axes(path, param), rules),
                     params_state)


def matrix_axes(params_state: nnx.State) -> nnx.State:
  """(input axes, output axes) of each hidden weight matrix, or None.

  A hidden weight maps between the residual stream's width ('embed') and the rest of
  its axes (heads, head dims, MLP units): 'embed' is the input when it comes first
  (wq, up), the output otherwise (wo, down). A scanned weight's layer axis is in
  neither, so each layer is its own matrix. None for vectors (norms, biases) and for
  tables over the vocabulary (embedding, output head): matrix optimizers such as Muon
  leave those to Adam.
  """
  def axes_of(path, param):
    axes = logical_axes(path, param)
    dims = tuple(i for i in range(len(axes)) if i != layer_axis(axes))
    if len(dims) < 2 or "vocab" in axes:
      return None
    if axes[dims[0]] == "embed":
      return dims[:1], dims[1:]
    return dims[:-1], dims[-1:]

  return _map_params(axes_of, params_state)
