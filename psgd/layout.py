"""How the Kron preconditioner sees each parameter: as a batch of small tensors.

Every parameter becomes an array of shape (batch, *block_shape):
  * a leading layer axis of a scanned parameter becomes the batch axis, so each
    layer gets its own preconditioner;
  * optionally (shard-local blocks) each dim is cut into the shards the devices hold,
    so that each device fits and applies the factors of its own shard: the batch axis
    is then ordered (shards, layers, blocks), which keeps it shardable over the
    params' mesh axes (shards major, then layers);
  * by default the remaining dims are merged into the most square (rows, cols)
    split, with no padding, as in quad-torch (a scalar is (1, 1), a vector (1, n));
    with merge_dims=False a tensor of rank 3 or more keeps its dims, one factor each,
    as in psgd_torch. The factor of a size-1 dim is never fitted, so a vector has one
    diagonal factor, as in psgd_torch;
  * optionally a huge dim is cut into equal blocks, each block becoming one more batch
    entry with factors of its own.
Each dim of a block then gets a dense (d, d) or a diagonal (d,) factor: diagonal when
the block's dim exceeds max_size, or when the layer's dim is too skewed for its size:
d^2 above max_skew times the layer's elements (max_skew_small_dim for dims up to
max_size_small_dim). Judged without shard-local cuts, so shard-local blocks keep the
whole layer's kinds.
"""

import dataclasses
import math
import warnings
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
  shards: tuple[int, ...]  # shard-local blocks along each dim of a layer (1: whole)
  dims: tuple[int, ...]  # the tensor each layer's shard is seen as, before blocking
  blocks: tuple[int, ...]  # number of equal blocks along each of `dims`
  dense: tuple[bool, ...]  # factor kind of each block dim

  @property
  def batch(self) -> int:
    return math.prod(self.shards) * self.layers * math.prod(self.blocks)

  @property
  def layer_shape(self) -> tuple[int, ...]:
    return self.param_shape[1:] if self.scanned else self.param_shape

  @property
  def shard_shape(self) -> tuple[int, ...]:
    """Shape of one layer's shard (the whole layer without shard-local blocks)."""
    return tuple(d // s for d, s in zip(self.layer_shape, self.shards))

  @property
  def block_shape(self) -> tuple[int, ...]:
    return tuple(d // b for d, b in zip(self.dims, self.blocks))

  @property
  def fitted(self) -> tuple[bool, ...]:
    """Which factors the fit moves. A size-1 dim's factor is not fitted (the others
    carry the scale; rebalancing may rescale it, leaving P as it was), so a vector,
    laid out as (1, n), is fitted by one diagonal factor as in the reference, not by
    two that both fit its overall scale. When every dim has size 1 the last factor is
    fitted."""
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


def _groups(shape: tuple[int, ...], merge: bool) -> tuple[tuple[int, ...], ...]:
  """The dims of `shape` each factor covers: with `merge`, the two groups making the
  most square (rows, cols) split (a vector: rows (), a scalar: both ()); else one dim
  each."""
  if not merge and len(shape) >= 3:
    return tuple((i,) for i in range(len(shape)))
  if len(shape) < 2:
    return ((), tuple(range(len(shape))))
  total = math.prod(shape)
  best = max(range(1, len(shape)),
             key=lambda i: min(math.prod(shape[:i]), total // math.prod(shape[:i])))
  return tuple(range(best)), tuple(range(best, len(shape)))


def num_blocks(size: int, block_size: Optional[int]) -> int:
  """Fewest equal blocks no larger than block_size (1 when no blocking); a warning when
  they come out under half of it (a size with no divisor near it: a prime is cut into
  blocks of 1, as good as a diagonal factor)."""
  if block_size is None or size <= block_size:
    return 1
  count = next(k for k in range(2, size + 1) if size % k == 0 and size // k <= block_size)
  if size // count < block_size / 2:
    warnings.warn(
        f"block_size={block_size} cuts a dim of size {size} into {count} blocks of "
        f"{size // count}: {size} has no divisor near {block_size}. Pad that dim (e.g. the "
        "vocabulary) to a multiple of a size near block_size, or pick a block_size that "
        "divides it.", stacklevel=2)
  return count


def plan_layout(shape: tuple[int, ...], scanned: bool, *, max_size: int, max_skew: float,
                max_size_small_dim: int, max_skew_small_dim: float, min_ndim: int,
                memory_save_mode: Optional[str], block_size: Optional[int],
                merge_dims: bool = True, shards: Optional[tuple[int, ...]] = None) -> Layout:
  """Layout for one parameter of the given shape; `shards`: the number of shard-local
  blocks along each dim of a layer (None: one)."""
  if scanned and len(shape) == 0:
    raise ValueError("scanned_layers marks a scalar parameter; a scanned parameter needs a "
                     "leading layer axis.")
  layers = shape[0] if scanned else 1
  inner = tuple(shape[1:] if scanned else shape)
  shards = tuple(shards) if shards is not None else (1,) * len(inner)
  if len(shards) != len(inner) or any(s < 1 or d % s for d, s in zip(inner, shards)):
    raise ValueError(f"shards {shards} do not cut a parameter of shape {shape} (layers "
                     f"{'scanned' if scanned else 'not scanned'}) into equal blocks.")
  # The factors' dims come from the whole layer, so that shard-local blocks change only
  # which entries P couples, not which factors are dense.
  groups = _groups(inner, merge_dims)
  dims = tuple(math.prod(inner[i] // shards[i] for i in g) for g in groups)
  blocks = tuple(num_blocks(d, block_size) for d in dims)
  sizes = [d // b for d, b in zip(dims, blocks)]
  unsharded = [size * math.prod(shards[i] for i in g) for size, g in zip(sizes, groups)]
  numel = math.prod(unsharded)
  skew = lambda w: max(max_skew, max_skew_small_dim) if w <= max_size_small_dim else max_skew
  dense = [d > 1 and w <= max_size and w * w <= skew(w) * numel and len(inner) >= min_ndim
           for d, w in zip(sizes, unsharded)]
  if memory_save_mode == "all_diag":
    dense = [False] * len(sizes)
  elif memory_save_mode == "one_diag":
    dense[max(range(len(sizes)), key=lambda i: (unsharded[i], i))] = False
  return Layout(tuple(shape), scanned, layers, shards, tuple(dims), blocks, tuple(dense))


def _cut(x: jnp.ndarray, lead: int, counts: tuple[int, ...], sizes: tuple[int, ...],
         after_lead: bool) -> jnp.ndarray:
  """(lead, *[c * s]) -> (batch, *sizes): cut dim i into counts[i] blocks of sizes[i]
  and fold the block axes into the leading one, after it (batch = (lead, blocks)) or
  before it (batch = (blocks, lead))."""
  split = [lead]
  for c, s in zip(counts, sizes):
    split += [c, s]
  n = len(counts)
  block_axes = tuple(1 + 2 * i for i in range(n))
  order = (0, *block_axes) if after_lead else (*block_axes, 0)
  return x.reshape(split).transpose(*order, *(2 + 2 * i for i in range(n))).reshape(
      -1, *sizes)


def _uncut(x: jnp.ndarray, lead: int, counts: tuple[int, ...], sizes: tuple[int, ...],
           after_lead: bool) -> jnp.ndarray:
  """Inverse of `_cut`."""
  n = len(counts)
  x = x.reshape(*((lead, *counts) if after_lead else (*counts, lead)), *sizes)
  lead_axis = 0 if after_lead else n
  count_axis = lambda i: 1 + i if after_lead else i
  order = [lead_axis] + [a for i in range(n) for a in (count_axis(i), n + 1 + i)]
  return x.transpose(order).reshape(lead, *(c * s for c, s in zip(counts, sizes)))


def to_blocks(x: jnp.ndarray, layout: Layout) -> jnp.ndarray:
  """Parameter-shaped array -> (batch, *block_shape), batch ordered (shards, layers,
  blocks)."""
  shards = math.prod(layout.shards)
  x = _cut(x.reshape(layout.layers, *layout.layer_shape), layout.layers, layout.shards,
           layout.shard_shape, after_lead=False)
  x = x.reshape(shards * layout.layers, *layout.dims)
  return _cut(x, shards * layout.layers, layout.blocks, layout.block_shape, after_lead=True)


def from_blocks(m: jnp.ndarray, layout: Layout) -> jnp.ndarray:
  """Inverse of `to_blocks`."""
  lead = math.prod(layout.shards) * layout.layers
  x = _uncut(m, lead, layout.blocks, layout.block_shape, after_lead=True)
  x = _uncut(x.reshape(lead, *layout.shard_shape), layout.layers, layout.shards,
             layout.shard_shape, after_lead=False)
  return x.reshape(layout.param_shape)


def format_table(paths: list[str], layouts: list[Layout], factor_bytes: int) -> str:
  """A printable table: path, shape, shard-local blocks per dim, batch, factor kinds
  and sizes, state bytes."""
  header = ("parameter", "shape", "shards", "batch", "factors", "factor bytes")
  rows = []
  for path, lay in zip(paths, layouts):
    kinds = " x ".join(f"{'dense' if dense else 'diag'}({d})"
                       for d, dense in zip(lay.block_shape, lay.dense))
    shards = "x".join(map(str, lay.shards)) if math.prod(lay.shards) > 1 else "-"
    rows.append((path, str(lay.param_shape), shards, str(lay.batch), kinds,
                 f"{lay.factor_numel() * factor_bytes:,}"))
  total = sum(lay.factor_numel() for lay in layouts) * factor_bytes
  rows.append(("total", "", "", "", "", f"{total:,}"))
  widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
  lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in [header, *rows]]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)
