"""How the Kron preconditioner sees each parameter: as a batch of small tensors.

Every parameter becomes an array of shape (batch, *block_shape):
  * a leading layer axis of a scanned parameter becomes the batch axis, so each
    layer gets its own preconditioner;
  * by default the remaining dims are merged into the most square (rows, cols)
    split, with no padding, as in quad-torch (a scalar is (1, 1), a vector (1, n));
    with merge_dims=False a tensor of rank 3 or more keeps its dims, one factor each,
    as in psgd_torch. The factor of a size-1 dim is never fitted, so a vector has one
    diagonal factor, as in psgd_torch;
  * optionally a huge dim is cut into equal blocks, each block becoming one more batch
    entry with factors of its own.
Each dim of a block then gets a dense (d, d) or a diagonal (d,) factor.
"""

import dataclasses
import math
from typing import Literal, Optional, get_args

import jax.numpy as jnp

MemorySaveMode = Optional[Literal["one_diag", "all_diag"]]
MEMORY_SAVE_MODES = (None, *get_args(get_args(MemorySaveMode)[0]))


@dataclasses.dataclass(frozen=True)
class Layout:
  """Static description of one parameter's preconditioner."""

  param_shape: tuple[int, ...]
  scanned: bool
  layers: int  # size of the scanned axis (1 when not scanned)
  dims: tuple[int, ...]  # the tensor each layer is seen as, before blocking
  blocks: tuple[int, ...]  # number of equal blocks along each of `dims`
  dense: tuple[bool, ...]  # factor kind of each block dim

  @property
  def batch(self) -> int:
    return self.layers * math.prod(self.blocks)

  @property
  def block_shape(self) -> tuple[int, ...]:
    return tuple(d // b for d, b in zip(self.dims, self.blocks))

  @property
  def fitted(self) -> tuple[bool, ...]:
    """Which factors the fit moves. A size-1 dim's factor stays fixed (the others
    carry the scale), so a vector, laid out as (1, n), is fitted by one diagonal
    factor as in the reference, not by two that both fit its overall scale. When every
    dim has size 1 the last factor is fitted."""
    shape = self.block_shape
    if all(d == 1 for d in shape):
      return (False,) * (len(shape) - 1) + (True,)
    return tuple(d > 1 for d in shape)

  @property
  def num_factors(self) -> int:
    return len(self.dims)

  def factor_shapes(self) -> tuple[tuple[int, ...], ...]:
    """Shapes of the factor arrays, with the batch axis first."""
    return tuple(
        (self.batch, d, d) if dense else (self.batch, d)
        for d, dense in zip(self.block_shape, self.dense))

  def factor_numel(self) -> int:
    return sum(math.prod(s) for s in self.factor_shapes())


def most_square_split(shape: tuple[int, ...]) -> tuple[int, int]:
  """(rows, cols) with rows = prod(shape[:i]) for the i making them most equal."""
  if len(shape) == 0:
    return 1, 1
  if len(shape) == 1:
    return 1, shape[0]
  total = math.prod(shape)
  best = max(range(1, len(shape)),
             key=lambda i: min(math.prod(shape[:i]), total // math.prod(shape[:i])))
  rows = math.prod(shape[:best])
  return rows, total // rows


def num_blocks(size: int, block_size: Optional[int]) -> int:
  """Fewest equal blocks no larger than block_size (1 when no blocking)."""
  if block_size is None or size <= block_size:
    return 1
  return next(k for k in range(2, size + 1) if size % k == 0 and size // k <= block_size)


def plan_layout(shape: tuple[int, ...], scanned: bool, *, max_size: int, max_skew: float,
                min_ndim: int, memory_save_mode: Optional[str], block_size: Optional[int],
                merge_dims: bool = True) -> Layout:
  """Layout for one parameter of the given shape."""
  if scanned and len(shape) == 0:
    raise ValueError("scanned_layers marks a scalar parameter; a scanned parameter needs a "
                     "leading layer axis.")
  layers = shape[0] if scanned else 1
  inner = tuple(shape[1:] if scanned else shape)
  dims = most_square_split(inner) if merge_dims or len(inner) < 3 else inner
  blocks = tuple(num_blocks(d, block_size) for d in dims)
  sizes = [d // b for d, b in zip(dims, blocks)]
  numel = math.prod(sizes)
  dense = [d > 1 and d <= max_size and d * d <= max_skew * numel and len(inner) >= min_ndim
           for d in sizes]
  if memory_save_mode == "all_diag":
    dense = [False] * len(sizes)
  elif memory_save_mode == "one_diag":
    dense[max(range(len(sizes)), key=lambda i: (sizes[i], i))] = False
  return Layout(tuple(shape), scanned, layers, tuple(dims), blocks, tuple(dense))


def _block_axes(layout: Layout) -> tuple[int, ...]:
  """Permutation of (layers, blocks_0, size_0, blocks_1, size_1, ...) that puts the
  layer and block axes first."""
  n = layout.num_factors
  return (0, *(1 + 2 * i for i in range(n)), *(2 + 2 * i for i in range(n)))


def to_blocks(x: jnp.ndarray, layout: Layout) -> jnp.ndarray:
  """Parameter-shaped array -> (batch, *block_shape)."""
  split = [layout.layers]
  for b, s in zip(layout.blocks, layout.block_shape):
    split += [b, s]
  return x.reshape(split).transpose(_block_axes(layout)).reshape(
      layout.batch, *layout.block_shape)


def from_blocks(m: jnp.ndarray, layout: Layout) -> jnp.ndarray:
  """Inverse of `to_blocks`."""
  m = m.reshape(layout.layers, *layout.blocks, *layout.block_shape)
  axes = _block_axes(layout)
  inverse = sorted(range(len(axes)), key=axes.__getitem__)
  return m.transpose(inverse).reshape(layout.param_shape)


def format_table(paths: list[str], layouts: list[Layout], factor_bytes: int) -> str:
  """A printable table: path, shape, factor kinds and sizes, state bytes."""
  header = ("parameter", "shape", "batch", "factors", "factor bytes")
  rows = []
  for path, lay in zip(paths, layouts):
    kinds = " x ".join(f"{'dense' if dense else 'diag'}({d})"
                       for d, dense in zip(lay.block_shape, lay.dense))
    rows.append((path, str(lay.param_shape), str(lay.batch), kinds,
                 f"{lay.factor_numel() * factor_bytes:,}"))
  total = sum(lay.factor_numel() for lay in layouts) * factor_bytes
  rows.append(("total", "", "", "", f"{total:,}"))
  widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
  lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in [header, *rows]]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)
