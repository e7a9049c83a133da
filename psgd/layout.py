"""How the Kron preconditioner sees each parameter: as a batch of matrices.

Every parameter becomes an array of shape (batch, rows, cols):
  * a leading layer axis of a scanned parameter becomes the batch axis, so each
    layer gets its own preconditioner;
  * the remaining dims are merged into the most square (rows, cols) split, with no
    padding (a scalar is (1, 1), a vector (1, n)), as in quad-torch; the factor of a
    size-1 dim is never fitted, so a vector has one diagonal factor, as in psgd_torch;
  * optionally a huge rows/cols dim is cut into equal blocks, each block becoming
    one more batch entry with factors of its own.
Each of the two matrix dims then gets a dense (d, d) or a diagonal (d,) factor.
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
  rows: int  # rows of the merged matrix, before blocking
  cols: int
  row_blocks: int
  col_blocks: int
  dense: tuple[bool, bool]  # factor kind of (block rows, block cols)

  @property
  def batch(self) -> int:
    return self.layers * self.row_blocks * self.col_blocks

  @property
  def block_shape(self) -> tuple[int, int]:
    return self.rows // self.row_blocks, self.cols // self.col_blocks

  @property
  def fitted(self) -> tuple[bool, bool]:
    """Which factors the fit moves. A size-1 dim's factor stays fixed (the other one
    carries the scale), so a vector, laid out as (1, n), is fitted by one diagonal
    factor as in the reference, not by two that both fit its overall scale. A (1, 1)
    scalar keeps its second factor fitted."""
    rows, cols = self.block_shape
    return rows > 1, cols > 1 or rows == 1

  @property
  def num_factors(self) -> int:
    return len(self.dense)

  def factor_shapes(self) -> tuple[tuple[int, ...], ...]:
    """Shapes of the two factor arrays, with the batch axis first."""
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
                min_ndim: int, memory_save_mode: Optional[str],
                block_size: Optional[int]) -> Layout:
  """Layout for one parameter of the given shape."""
  if scanned and len(shape) == 0:
    raise ValueError("scanned_layers marks a scalar parameter; a scanned parameter needs a "
                     "leading layer axis.")
  layers = shape[0] if scanned else 1
  inner = shape[1:] if scanned else shape
  rows, cols = most_square_split(inner)
  row_blocks, col_blocks = num_blocks(rows, block_size), num_blocks(cols, block_size)
  sizes = (rows // row_blocks, cols // col_blocks)
  numel = sizes[0] * sizes[1]
  dense = [d > 1 and d <= max_size and d * d <= max_skew * numel and len(inner) >= min_ndim
           for d in sizes]
  if memory_save_mode == "all_diag":
    dense = [False, False]
  elif memory_save_mode == "one_diag":
    dense[0 if sizes[0] > sizes[1] else 1] = False
  return Layout(tuple(shape), scanned, layers, rows, cols, row_blocks, col_blocks,
                tuple(dense))


def to_matrices(x: jnp.ndarray, layout: Layout) -> jnp.ndarray:
  """Parameter-shaped array -> (batch, block_rows, block_cols)."""
  br, bc = layout.block_shape
  x = x.reshape(layout.layers, layout.row_blocks, br, layout.col_blocks, bc)
  return x.transpose(0, 1, 3, 2, 4).reshape(layout.batch, br, bc)


def from_matrices(m: jnp.ndarray, layout: Layout) -> jnp.ndarray:
  """Inverse of `to_matrices`."""
  br, bc = layout.block_shape
  m = m.reshape(layout.layers, layout.row_blocks, layout.col_blocks, br, bc)
  return m.transpose(0, 1, 3, 2, 4).reshape(layout.param_shape)


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
