"""The device mesh from the config, checked before anything is compiled."""

import math
from typing import Sequence

import jax
from jax.experimental import mesh_utils


def resolve_shape(axes: Sequence[str], shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Mesh shape with the one allowed -1 filled in; ValueError naming mesh.shape if bad."""
  if len(axes) != len(shape):
    raise ValueError(f"mesh.axes={tuple(axes)} and mesh.shape={tuple(shape)} must have the "
                     "same length.")
  if list(shape).count(-1) > 1:
    raise ValueError(f"mesh.shape={tuple(shape)}: at most one size may be -1.")
  if any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"mesh.shape={tuple(shape)}: sizes must be positive or -1.")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise ValueError(f"mesh.shape={tuple(shape)}: the fixed sizes ({known}) do not divide "
                       f"the {num_devices} devices.")
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if math.prod(shape) != num_devices:
    raise ValueError(f"mesh.shape={tuple(shape)} multiplies to {math.prod(shape)}, but there "
                     f"are {num_devices} devices; make the sizes multiply to {num_devices} "
                     "(or use -1 for one of them).")
  return tuple(shape)


def make_mesh(axes: Sequence[str], shape: Sequence[int], devices=None) -> jax.sharding.Mesh:
  """A mesh with Auto axes (sharding propagated by the compiler) over `devices`.

  TPU devices are laid out along the torus as jax.make_mesh lays them out, keeping its
  physical axes whole; where no such layout exists (a tensor axis of 2 on v5p-128's
  4x4x4 torus) they are split. The dry run's topology devices take the same path, so it
  compiles the mesh the run will build.
  """
  devices = jax.devices() if devices is None else list(devices)
  shape = resolve_shape(axes, shape, len(devices))
  try:
    grid = mesh_utils.create_device_mesh(shape, devices)
  except NotImplementedError:
    grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  return jax.sharding.Mesh(grid, tuple(axes),
                           axis_types=(jax.sharding.AxisType.Auto,) * len(axes))


def axis_names(entry) -> tuple[str, ...]:
  """The mesh axes of one PartitionSpec entry or rule target (None, a name, or names)."""
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def batch_axes(rules: Sequence[tuple[str, object]]) -> tuple[str, ...]:
  """Mesh axes the 'batch' logical axis is sharded over (data parallelism)."""
  return next((axis_names(target) for name, target in rules if name == "batch"), ())


def batch_sharding(mesh: jax.sharding.Mesh, rules) -> jax.sharding.NamedSharding:
  """Rows of a batch split over the 'batch' rule's mesh axes (replicated without one)."""
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(batch_axes(rules) or None))


def data_parallel_size(mesh: jax.sharding.Mesh, rules) -> int:
  return math.prod(mesh.shape[a] for a in batch_axes(rules))
