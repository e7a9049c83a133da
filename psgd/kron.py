"""PSGD Kron as optax transformations: `scale_by_kron` and `kron`.

A step: momentum (EMA of gradients); until it is set, the scale of P from the first
nonzero gradients; with some probability a refit of each parameter's Kronecker factors
on the gradient (or momentum); then the momentum (or its Nesterov look-ahead) is
preconditioned, clipped per block and, with lr_style='adam', scaled to Adam's update
size (or, with update_rms, each block scaled to that RMS). See `fitting.py` for the math
and `layout.py` for how parameters become batches of small tensors (blocks).

Every per-parameter field of the state is a tree with the params' structure whose
leaves are arrays (the factors: one such tree per factor slot), as in optax's own
optimizers: wrappers that map over params (nnx.Optimizer, optax.masked, MultiSteps)
then see one state structure from `init` on.
"""

import dataclasses
import functools
import inspect
import itertools
import math
from typing import Any, Callable, Literal, NamedTuple, Optional, Union, get_args

import jax
import jax.numpy as jnp
import numpy as np
import optax

from psgd import fitting
from psgd import layout as layout_lib
from psgd.schedules import precond_update_prob_schedule

ScalarOrSchedule = Union[float, Callable[[jax.Array], jax.Array]]
MaskOrFn = Optional[Union[Any, Callable[[Any], Any]]]
# Names `jax.default_matmul_precision` takes; 'bfloat16' also casts operands (see below).
Precision = Literal["default", "high", "highest", "bfloat16", "tensorfloat32", "float32"]

BALANCE_PROBABILITY = 0.01


def adam_style_scale(b1: float, whiten_grad: bool) -> float:
  """Factor giving the update Adam's RMS, so AdamW's learning rate carries over.

  With P fitted to gradients, P g has unit RMS, so P applied to the momentum has the
  RMS of Adam's m / sqrt(v): about sqrt((1 - b1) / (1 + b1)) for noisy gradients, 1 for
  consistent ones that fill their matrix. It needs no factor. (A consistent gradient of
  low rank gets less: P whitens its few directions, not its entries, as Muon's
  orthogonalisation does.) With P fitted to the momentum itself, P m has
  unit RMS, so it is scaled by sqrt((1 - b1) / (1 + b1)), the reference's advice for
  whitening momentum.
  """
  return 1.0 if whiten_grad else ((1 - b1) / (1 + b1)) ** 0.5


class KronState(NamedTuple):
  """State of `scale_by_kron`; the per-parameter fields are trees shaped like params."""

  count: jax.Array  # int32 steps taken
  key: jax.Array  # uint32[2] PRNG key: update decisions, noise, norm estimates
  mu: Any  # momentum, or None when b1 == 0
  factors: tuple  # per factor slot k, a params tree of factor k: (batch, d, d) or (batch, d)
  precond: Any  # P's factors, shaped like `factors` (cache_preconditioner), or None
  lipschitz: Any  # params tree of (batch, num_factors) Lipschitz memories, compute dtype
  initialized: jax.Array  # bool: the preconditioner scale is set
  num_updates: jax.Array  # int32 preconditioner refits so far


# ------------------------------------------------------------------- arguments


def _like_params(value, params, name: str, what: str) -> list:
  """One entry of `value` per parameter (in the params' leaf order), from a tree shaped
  like params (or a prefix of it), or a callable of params returning one."""
  if callable(value):
    value = value(params)
  try:
    subtrees = jax.tree.structure(value).flatten_up_to(params)
  except (ValueError, TypeError) as error:
    raise ValueError(
        f"{name} does not match the params tree: give {what} per parameter in a tree of "
        f"the params' structure (params: {jax.tree.structure(params)}, {name}: "
        f"{jax.tree.structure(value)}), or a callable of params returning that.") from error
  return [v for v, sub in zip(jax.tree.leaves(value), subtrees) for _ in jax.tree.leaves(sub)]


def mask_like(mask, params, name: str):
  """A bool per parameter, in the params' structure, from a mask given as a tree of
  bools shaped like params (or a prefix of it), or a callable of params returning one."""
  if mask is None:
    return jax.tree.map(lambda _: False, params)
  flags = [bool(m) for m in _like_params(mask, params, name, "one bool")]
  return jax.tree.unflatten(jax.tree.structure(params), flags)


def axis_names(entry) -> tuple[str, ...]:
  """Mesh axis names of one PartitionSpec entry (None, a name or a tuple of names)."""
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def padded_spec(spec, ndim: int) -> tuple:
  """A PartitionSpec's entries, one per dim of an ndim array (None for the dims it
  leaves out)."""
  return tuple(spec) + (None,) * (ndim - len(spec))


def _shard_counts(param_sharding, params) -> list[tuple[int, ...]]:
  """Per parameter (in leaf order), the number of shards along each of its dims, from a
  tree of `NamedSharding`s shaped like params (or a callable of params returning one);
  all ones when param_sharding is None."""
  def counts(sharding, p):
    ndim = len(p.shape)
    if sharding is None:
      return (1,) * ndim
    spec = padded_spec(sharding.spec, ndim)
    return tuple(math.prod(sharding.mesh.shape[a] for a in axis_names(e)) for e in spec)

  leaves = jax.tree.leaves(params)
  shardings = ([None] * len(leaves) if param_sharding is None else
               _like_params(param_sharding, params, "param_sharding", "one NamedSharding"))
  return [counts(s, p) for s, p in zip(shardings, leaves)]


def _check_floating(params):
  """ValueError naming the first parameter PSGD cannot precondition."""
  for path, p in jax.tree_util.tree_flatten_with_path(params)[0]:
    if not jnp.issubdtype(p.dtype, jnp.floating):
      raise ValueError(
          f"Parameter {jax.tree_util.keystr(path)} has dtype {p.dtype}; psgd preconditions "
          "floating-point parameters only. Leave it out of the params passed to the "
          "optimizer (e.g. optax.masked, or nnx.Optimizer(..., wrt=nnx.Param)).")


def _without_empty(tree):
  """Zero-size leaves as None: there is nothing in them to precondition (their update is
  their own empty gradient), and no layout fits them."""
  return jax.tree.map(lambda x: None if x.size == 0 else x, tree)


def _is_number(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_args(args: dict):
  """ValueError naming the first bad argument (numbers only: injected ones are arrays)."""
  mode = args["preconditioner_mode"]
  if mode not in fitting.MODES:
    raise ValueError(f"preconditioner_mode={mode!r} is unknown; choose one of "
                     f"{', '.join(fitting.MODES)}.")
  if args["nesterov"] and args["b1"] == 0:
    raise ValueError("nesterov=True looks ahead along the momentum, which needs b1 > 0; "
                     "set b1 (e.g. 0.9) or nesterov=False.")
  if not args["whiten_grad"] and args["b1"] == 0:
    raise ValueError("whiten_grad=False whitens the momentum, which needs b1 > 0; set b1 "
                     "(e.g. 0.9) or whiten_grad=True.")
  seed = args["seed"]
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
    raise TypeError(f"seed={seed!r} must be a Python int (the refits' random draws start "
                    "from jax.random.PRNGKey(seed)); a key or an array cannot be one.")
  if args["memory_save_mode"] not in layout_lib.MEMORY_SAVE_MODES:
    raise ValueError(f"memory_save_mode={args['memory_save_mode']!r} must be one of "
                     f"{layout_lib.MEMORY_SAVE_MODES}.")
  if args["lr_style"] not in (None, "adam"):
    raise ValueError(f"lr_style={args['lr_style']!r} must be 'adam' or None.")
  for name in ("precond_update_precision", "precond_grads_precision"):
    if args[name] not in (None, *get_args(Precision)):
      raise ValueError(f"{name}={args[name]!r} must be None or one of "
                       f"{', '.join(get_args(Precision))}.")
  for name in ("mu_dtype", "precond_dtype"):
    try:
      jnp.dtype(args[name] or jnp.float32)
    except TypeError:
      raise ValueError(f"{name}={args[name]!r} must be a dtype such as 'bfloat16' "
                       "(jnp.bfloat16), or None.") from None
  ranges = {
      "b1": (lambda v: 0 <= v < 1, "in [0, 1)"),
      "preconditioner_update_probability": (lambda v: 0 <= v <= 1, "in [0, 1] or a schedule"),
      "preconditioner_lr": (lambda v: v > 0, "positive"),
      "preconditioner_init_scale": (lambda v: v > 0, "positive, or None (from the gradients)"),
      "beta_lipschitz": (lambda v: 0 <= v < 1, "in [0, 1)"),
      "damping": (lambda v: v >= 0, "non-negative"),
      "max_update_rms": (lambda v: v > 0, "positive"),
      "update_rms": (lambda v: v > 0, "positive, or None (P's own scale)"),
      "lax_map_batch_size": (lambda v: v >= 1, "at least 1"),
      "block_size": (lambda v: v >= 1, "a positive int or None"),
      "max_size_small_dim": (lambda v: v >= 0, "non-negative"),
      "max_skew_small_dim": (lambda v: v >= 0, "non-negative"),
  }
  for name, (ok, what) in ranges.items():
    if _is_number(args[name]) and not ok(args[name]):
      raise ValueError(f"{name}={args[name]} must be {what}.")


def check_auto_axes(mesh) -> None:
  """ValueError if `mesh` has Explicit axes: the factors' matmuls contract sharded dims,
  which such a mesh makes the caller's to place."""
  if jax.sharding.AxisType.Explicit in getattr(mesh, "axis_types", ()):
    raise ValueError(
        "psgd.kron needs a mesh with Auto axes (the compiler places the preconditioner's "
        f"matmuls); this mesh's axes {mesh.axis_names} have types {mesh.axis_types} "
        "(jax.make_mesh's default is Explicit). Build the mesh with jax.make_mesh(shape, "
        "names, axis_types=(jax.sharding.AxisType.Auto,) * len(names)).")


def _check_auto_axes(tree) -> None:
  """check_auto_axes for the mesh each leaf is sharded over."""
  for leaf in jax.tree.leaves(tree):
    check_auto_axes(getattr(jax.typeof(leaf).sharding, "mesh", None))


def plan_layouts(params, scanned_layers: MaskOrFn = None, *, max_size_triangular: int = 8192,
                 max_skew_triangular: float = 1.0, max_size_small_dim: int = 1024,
                 max_skew_small_dim: float = 4.0, min_ndim_triangular: int = 2,
                 memory_save_mode: Optional[str] = None, block_size: Optional[int] = None,
                 merge_dims: bool = True, param_sharding: MaskOrFn = None):
  """A tree of `Layout`s (one per parameter; None for a zero-size one, which has nothing
  to precondition) for params under these settings."""
  mask = mask_like(scanned_layers, params, "scanned_layers")
  plan = functools.partial(layout_lib.plan_layout, max_size=max_size_triangular,
                           max_skew=max_skew_triangular,
                           max_size_small_dim=max_size_small_dim,
                           max_skew_small_dim=max_skew_small_dim, min_ndim=min_ndim_triangular,
                           memory_save_mode=memory_save_mode, block_size=block_size,
                           merge_dims=merge_dims)
  counts = _shard_counts(param_sharding, params)
  return jax.tree.unflatten(jax.tree.structure(params), [
      None if p.size == 0 else plan(tuple(p.shape), s, shards=c[1:] if s else c)
      for p, s, c in zip(jax.tree.leaves(params), jax.tree.leaves(mask), counts)])


def layout_table(params, precond_dtype=None, **layout_kwargs) -> str:
  """Printable table of every parameter's factors and their bytes (see `plan_layouts`;
  precond_dtype as for `scale_by_kron`, None meaning float32)."""
  layouts = plan_layouts(params, **layout_kwargs)
  paths, leaves = zip(*jax.tree_util.tree_flatten_with_path(layouts, is_leaf=_is_layout)[0])
  return layout_lib.format_table([jax.tree_util.keystr(p) for p in paths], list(leaves),
                                 jnp.dtype(precond_dtype or jnp.float32).itemsize)


@dataclasses.dataclass(frozen=True)
class KronSettings:
  """`scale_by_kron`'s arguments, checked and resolved once."""

  b1: float
  nesterov: bool
  update_probability: ScalarOrSchedule
  layout_options: dict  # plan_layouts' keyword arguments
  scanned_layers: MaskOrFn
  mode: str
  preconditioner_lr: Any
  init_scale: Optional[float]  # None: from the first nonzero gradients
  cache: bool  # keep P's factors in the state
  whiten_grad: bool
  output_scale: float
  beta_lipschitz: Any
  damping: Any
  max_update_rms: Any
  update_rms: Optional[float]  # None: P's own scale, clipped and times output_scale
  mu_dtype: Any  # None: the gradient's
  precond_dtype: Any
  fit_precision: Optional[str]
  apply_precision: Optional[str]
  fit_operand_dtype: Any  # bfloat16 when the fit's matmuls take bfloat16 operands
  apply_operand_dtype: Any
  lax_map: bool
  lax_map_batch_size: int
  seed: int

  def layouts(self, tree):
    return plan_layouts(tree, self.scanned_layers, **self.layout_options)


# ------------------------------------------------------- per-parameter trees


def _is_layout(x) -> bool:
  return isinstance(x, layout_lib.Layout)


def _map_params(fn, layouts, *trees):
  """fn(layout, *per-parameter entries) over the params' structure."""
  return jax.tree.map(fn, layouts, *trees, is_leaf=_is_layout)


def _slots(layouts, per_param) -> tuple:
  """Per-parameter tuples of factors -> one params-shaped tree per factor slot. A
  parameter with fewer factors than there are slots fills the rest with (batch, 1)
  ones, the fixed factor of a size-1 dim, never read (not empty arrays: Orbax cannot
  save those), so every slot keeps the params' structure."""
  num_slots = max((lay.num_factors for lay in jax.tree.leaves(layouts, is_leaf=_is_layout)),
                  default=0)

  def slot(lay, fs, k):
    return fs[k] if k < len(fs) else jnp.ones((lay.batch, 1), fs[0].dtype)

  return tuple(_map_params(functools.partial(slot, k=k), layouts, per_param)
               for k in range(num_slots))


def _per_param(layouts, slots: tuple):
  """Inverse of `_slots`: a tree of per-parameter tuples of factors."""
  return _map_params(lambda lay, *fs: fs[:lay.num_factors], layouts, *slots)


def _compute_dtype(dtype):
  """Arithmetic in float32, or in float64 for float64 gradients."""
  return jnp.promote_types(dtype, jnp.float32)


def _block_seeds(seed: jax.Array, layouts):
  """A seed per block (`fitting.random_bits`), numbered across all params in order, so a
  stacked parameter draws what the same layers given as separate parameters would."""
  leaves, treedef = jax.tree.flatten(layouts, is_leaf=_is_layout)
  starts = itertools.accumulate((lay.batch for lay in leaves), initial=0)

  def numbers(lay, start):  # the batch is ordered (shards, layers, blocks)
    per_layer = jnp.arange(lay.batch).reshape(lay.layers, math.prod(lay.shards), -1)
    return start + per_layer.transpose(1, 0, 2).reshape(-1)

  return treedef.unflatten([fitting.mix(seed, numbers(lay, start))
                            for lay, start in zip(leaves, starts)])


def _map_blocks(s: KronSettings, lay: layout_lib.Layout, fn, *args):
  """fn over one parameter's batch of blocks: vmap, or lax.map for scanned layers."""
  if lay.scanned and s.lax_map:
    return jax.lax.map(lambda xs: fn(*xs), args, batch_size=s.lax_map_batch_size)
  return jax.vmap(fn)(*args)


def _stored(s: KronSettings, factors):
  """Factors in their storage dtype. They keep it between refits, so a step that does
  not refit converts nothing but what it multiplies with."""
  return jax.tree.map(lambda f: f.astype(s.precond_dtype), factors)


def _stored_refitted(s: KronSettings, layouts, factors, seeds):
  """Refitted factors in their storage dtype: rounded to bfloat16 stochastically
  (`fitting.round_stochastically`) from float32 (float64 fits go through float32),
  with each block's own seed, so a stacked parameter rounds as its layers given
  separately would."""
  if s.precond_dtype != jnp.bfloat16:
    return _stored(s, factors)

  def one(lay, fs, seeds):
    return tuple(jax.vmap(fitting.round_stochastically)(f.astype(jnp.float32),
                                                        fitting.mix(seeds, k))
                 if f.dtype.itemsize > 2 else f.astype(s.precond_dtype)
                 for k, f in enumerate(fs))

  return _map_params(one, layouts, factors, seeds)


def _p_factors(s: KronSettings, factors, operand_dtype=None):
  """P's factors of one parameter's batch of blocks."""
  return jax.vmap(lambda *f: fitting.preconditioner_factors(s.mode, f, operand_dtype))(
      *factors)


def _cached(s: KronSettings, layouts, factors):
  """P's factors of every parameter in storage dtype if cached, else empty tuples. Pass
  the stored factors, so that the cache holds P of the Q a restart would read."""
  if not s.cache:
    return _map_params(lambda lay: (), layouts)
  return _stored(s, _map_params(lambda lay, fs: _p_factors(
      s, tuple(f.astype(_compute_dtype(f.dtype)) for f in fs)), layouts, factors))


def _identity_factors(s: KronSettings, lay: layout_lib.Layout):
  """Factors of P = init_scale^2 I (1 when the scale comes from the gradients)."""
  eye = [jnp.broadcast_to(jnp.eye(d) if dense else jnp.ones(d), shape)
         for d, dense, shape in zip(lay.block_shape, lay.dense, lay.factor_shapes())]
  return fitting.scale_factors(s.mode, tuple(eye), jnp.float32(s.init_scale or 1.0))


# ------------------------------------------------------------------ the phases


def _momentum(s: KronSettings, count, mu, grads):
  """(momentum, direction): the EMA of the gradients with factor
  min(count / (count + 1), b1), which ramps up from 0 so that no bias correction is
  needed; and what gets preconditioned: the momentum, or with nesterov the same EMA
  taken once more with the current gradient (Nesterov's look-ahead, as in Muon)."""
  if s.b1 == 0:
    return grads, grads
  beta = jnp.minimum(count / (count + 1.0), s.b1)

  def ema(m, g):
    return beta.astype(g.dtype) * m.astype(g.dtype) + (1 - beta.astype(g.dtype)) * g

  mu = jax.tree.map(ema, mu, grads)
  return mu, jax.tree.map(ema, mu, grads) if s.nesterov else mu


def _fourth_moment_roots(g: jax.Array) -> jax.Array:
  """E[g^4]^(1/4) of each block of a (batch, *block_shape) array, without overflow."""
  axes = tuple(range(1, g.ndim))
  gmax = jnp.max(jnp.abs(g), axis=axes, keepdims=True)
  safe = jnp.where(gmax > 0, gmax, 1.0)
  return gmax.reshape(-1) * jnp.mean((g / safe) ** 4, axis=axes) ** 0.25


def _initial_scale(roots: list[jax.Array], damping) -> tuple[jax.Array, jax.Array]:
  """(found, scale): scale = (max E[g^4] + damping^4)^(-1/8) over all blocks.

  One scale for every parameter, from the largest gradients, as psgd_torch sets it
  (its max is over parameters; here over blocks, so a scanned layer counts as a
  parameter of its own). Computed through normalized
  quantities so tiny or huge gradients neither underflow nor overflow; `found` is
  False while every gradient is exactly zero.
  """
  s = functools.reduce(jnp.maximum, [jnp.max(r) for r in roots], jnp.float32(0))
  m = jnp.maximum(jnp.maximum(s, damping), fitting._TINY)
  scale = m ** -0.5 * ((s / m) ** 4 + (damping / m) ** 4) ** -0.125
  return s > 0, scale


def _unset_scale(s: KronSettings, layouts, grads, initialized):
  """(found, scale): while P's scale is unset, the one the gradients give
  (`_initial_scale`: a pass over all of them); once it is set, (True, 1), so that
  multiplying by it changes nothing. (True, None) when the scale is an argument."""
  if s.init_scale is not None:
    return jnp.array(True), None

  def from_gradients(grads):
    roots = _map_params(lambda lay, g: _fourth_moment_roots(layout_lib.to_blocks(g, lay)),
                        layouts, grads)
    found, scale = _initial_scale(jax.tree.leaves(roots), s.damping)
    return found, scale.astype(jnp.float32)  # the other branch's dtype, under x64 too

  return jax.lax.cond(initialized, lambda _: (jnp.array(True), jnp.float32(1)),
                      from_gradients, grads)


def _rescaled(s: KronSettings, layouts, factors, scale):
  """The factors in compute dtype, times `scale` (see `_unset_scale`)."""
  factors = jax.tree.map(lambda f: f.astype(_compute_dtype(f.dtype)), factors)
  if scale is None:
    return factors
  return _map_params(lambda lay, fs: fitting.scale_factors(s.mode, fs, scale), layouts,
                     factors)


def _noise_eps(s: KronSettings, grad_dtype) -> float:
  """Relative size of the noise the fit adds to each gradient entry: the resolution of
  the gradient's dtype (the reference's rule), or of the fit's bfloat16 operands when
  that is coarser. Finer noise would round away in the matmuls and leave P unbounded
  where gradients vanish."""
  dtypes = [grad_dtype] + ([s.fit_operand_dtype] if s.fit_operand_dtype else [])
  return max(float(jnp.finfo(d).eps) for d in dtypes)


def _scheduled(value: ScalarOrSchedule, count) -> jax.Array:
  return value(count) if callable(value) else value


def _refit_decision(s: KronSettings, count, key) -> jax.Array:
  return jax.random.uniform(key) < _scheduled(s.update_probability, count)


# ---------------------------------------------------------------- grouped fits
# The compiler compiles each call of `fitting.fit` on its own, and the fits are most of
# the update's program, so parameters whose blocks have one shape, or its transpose
# (e.g. a layer's input and output projections), and the same factor kinds are fitted
# as one batch: one fit is compiled per block shape, not one per parameter
# (docs/pod_slices.md, "Where Kron's compile time goes").


class _Member(NamedTuple):
  leaf: int  # the parameter's position among the params' leaves
  transposed: bool  # its blocks enter the group transposed, its two factors swapped


def _fit_groups(layouts: list, targets: list, grad_eps: list,
                lax_map: bool) -> list[list[_Member]]:
  """Parameters (by leaf) whose fits share one batch: blocks of one shape up to a
  transpose, the same factor kinds, and the same dtype, noise level and kind of map
  (`_map_blocks`: lax.map for scanned layers if `lax_map`, else vmap for all). A
  group's orientation is its first member's."""
  groups: dict = {}
  for leaf, (lay, h, eps) in enumerate(zip(layouts, targets, grad_eps)):
    def key(order, lay=lay, h=h, eps=eps):
      pick = lambda xs: tuple(xs[i] for i in order)
      return (pick(lay.block_shape), pick(lay.dense), pick(lay.fitted), h.dtype, eps,
              lay.scanned and lax_map)
    order = tuple(range(lay.num_factors))
    own, flipped = key(order), key(order[::-1])
    if lay.num_factors == 2 and own not in groups and flipped in groups:
      groups[flipped].append(_Member(leaf, True))
    else:
      groups.setdefault(own, []).append(_Member(leaf, False))
  return list(groups.values())


def _fit_grouped(s: KronSettings, grad_eps: list, layouts: list, factors: list,
                 lipschitz: list, targets: list, seeds: list, precond: list, lr):
  """`fitting.fit` of every parameter's blocks (all but `lr`: lists over the params'
  leaves), one batched fit per `_fit_groups` group: (factors, lipschitz) per leaf."""
  blocks = [layout_lib.to_blocks(h, lay) for h, lay in zip(targets, layouts)]
  new_factors, new_lipschitz = [None] * len(layouts), [None] * len(layouts)
  for group in _fit_groups(layouts, blocks, grad_eps, s.lax_map):
    first = layouts[group[0].leaf]
    turn = lambda m, fs: fs[::-1] if m.transposed else fs  # factors in the group's order
    turn_lip = lambda m, lip: lip[:, ::-1] if m.transposed else lip

    def member(m):
      h = blocks[m.leaf]
      compute = tuple(f.astype(_compute_dtype(h.dtype)) for f in factors[m.leaf])
      return (turn(m, compute), turn_lip(m, lipschitz[m.leaf]),
              h.swapaxes(1, 2) if m.transposed else h, seeds[m.leaf],
              turn(m, precond[m.leaf]))

    def fit_block(fs, lip, h, seed, pfs, transposed=False, eps=grad_eps[group[0].leaf]):
      return fitting.fit(s.mode, fs, lip, h, seed, lr=lr,
                         beta=s.beta_lipschitz, damping=s.damping, grad_eps=eps,
                         p_factors=pfs or None, operand_dtype=s.fit_operand_dtype,
                         fitted=first.fitted, transposed=transposed)

    batch = jax.tree.map(lambda *xs: jnp.concatenate(xs) if len(xs) > 1 else xs[0],
                         *map(member, group))
    if any(m.transposed for m in group):
      batch += (jnp.concatenate([jnp.full(blocks[m.leaf].shape[0], m.transposed)
                                 for m in group]),)
    # Without transposed members the flag stays static: the fit's program is as before.
    fitted_fs, fitted_lip = _map_blocks(s, first, fit_block, *batch)
    start = 0
    for m in group:
      stop = start + blocks[m.leaf].shape[0]
      new_factors[m.leaf] = turn(m, tuple(f[start:stop] for f in fitted_fs))
      new_lipschitz[m.leaf] = turn_lip(m, fitted_lip[start:stop])
      start = stop
  return new_factors, new_lipschitz


def batch_mesh_axes(spec: tuple, scanned: bool, shard_local: bool) -> tuple[str, ...]:
  """Mesh axes of the factors' batch axis (ordered (shards, layers, blocks)) for a
  parameter with PartitionSpec `spec` (one entry per dim): those of its sharded dims
  when its blocks are shard-local, then those of its layer axis if scanned."""
  layer_axes = axis_names(spec[0]) if scanned else ()
  shard_axes = tuple(a for e in spec[1 if scanned else 0:] for a in axis_names(e))
  return (shard_axes if shard_local else ()) + layer_axes


def _on_each_device(s: KronSettings, layouts: list, params, fit):
  """`fit(layouts, factors, ...)` (`_fit_grouped`'s arguments after grad_eps) run by each
  device on the blocks of its own shards (`jax.shard_map` over the mesh of
  param_sharding). With shard-local blocks every block lies on one device, so the fits
  move no data; and blocks of parameters cut along different mesh axes (a projection
  and its transpose) batch together on the device that holds them, where concatenating
  the global arrays would move them."""
  shardings = _like_params(s.layout_options["param_sharding"], params, "param_sharding",
                           "one NamedSharding")
  mesh = shardings[0].mesh
  specs, batch_specs, local = [], [], []
  for lay, sharding in zip(layouts, shardings):
    spec = padded_spec(sharding.spec, len(lay.param_shape))
    # Each layer is cut into its shards already (shard_shape); only the layer axis is left.
    local_layers = (lay.layers // math.prod(mesh.shape[a] for a in axis_names(spec[0]))
                    if lay.scanned else 1)
    shape = ((local_layers,) if lay.scanned else ()) + lay.shard_shape
    specs.append(jax.sharding.PartitionSpec(*spec))
    batch_specs.append(jax.sharding.PartitionSpec(
        batch_mesh_axes(spec, lay.scanned, shard_local=True) or None))
    local.append(dataclasses.replace(lay, param_shape=shape, shards=(1,) * len(lay.shards),
                                     layers=local_layers))
  replicated = jax.sharding.PartitionSpec()
  return jax.shard_map(
      functools.partial(fit, local), mesh=mesh,
      in_specs=(batch_specs, batch_specs, specs, batch_specs, batch_specs, replicated),
      out_specs=(batch_specs, batch_specs), check_vma=False)


def _refit(s: KronSettings, layouts, targets, grad_eps, seeds, balance_key, lr, carry):
  """One fitting step (of size `lr`) of every parameter's factors on `targets`, then,
  rarely, a rebalancing of each pair against over/underflow. carry: (factors,
  lipschitz, precond)."""
  factors, lipschitz, precond = carry
  lays, treedef = jax.tree.flatten(layouts, is_leaf=_is_layout)
  leaves = treedef.flatten_up_to
  # Each block's seed gives two: salt 0 for the fit's draws, salt 1 for rounding.
  fit_seeds = jax.tree.map(lambda b: fitting.mix(b, 0), seeds)
  rounding_seeds = jax.tree.map(lambda b: fitting.mix(b, 1), seeds)
  fit = functools.partial(_fit_grouped, s, leaves(grad_eps))
  if s.layout_options["param_sharding"] is not None and lays:
    fit = _on_each_device(s, lays, targets, fit)
  else:
    fit = functools.partial(fit, lays)
  with jax.default_matmul_precision(s.fit_precision):
    new_factors, new_lipschitz = fit(*map(leaves, (factors, lipschitz, targets, fit_seeds,
                                                   precond)), lr)
  new_factors = treedef.unflatten(new_factors)
  new_lipschitz = _map_params(lambda lay, new, old: new.astype(old.dtype), layouts,
                              treedef.unflatten(new_lipschitz), lipschitz)
  rebalance = jax.random.uniform(balance_key) < BALANCE_PROBABILITY
  new_factors = _map_params(lambda lay, f: jax.vmap(fitting.balance, (0, None))(f, rebalance),
                            layouts, new_factors)
  new_factors = _stored_refitted(s, layouts, new_factors, rounding_seeds)
  return new_factors, new_lipschitz, _cached(s, layouts, new_factors)


def _precondition(s: KronSettings, layouts, factors, precond, direction, like):
  """P times the direction, per parameter, in the dtype of `like` (the incoming
  updates): each block scaled to RMS update_rms, or else clipped to RMS max_update_rms
  and times the output scale."""
  def clipped(p_factors, x):
    y = fitting.apply_preconditioner(p_factors, x, s.apply_operand_dtype)
    rms = jnp.sqrt(jnp.mean(y * y))
    if s.update_rms is not None:
      return y * (s.update_rms / jnp.maximum(rms, fitting._TINY))
    return y * (s.max_update_rms / jnp.maximum(rms, s.max_update_rms)) * s.output_scale

  def one(lay, fs, pfs, m, g):
    # With bfloat16 operands the matmuls cast the stored factors themselves.
    operands = ((lambda fs: fs) if s.apply_operand_dtype else
                (lambda fs: tuple(f.astype(m.dtype) for f in fs)))
    p_factors = operands(pfs) if pfs else _p_factors(s, operands(fs), s.apply_operand_dtype)
    y = _map_blocks(s, lay, clipped, p_factors, layout_lib.to_blocks(m, lay))
    return layout_lib.from_blocks(y, lay).astype(g.dtype)

  with jax.default_matmul_precision(s.apply_precision):
    return _map_params(one, layouts, factors, precond, direction, like)


# ---------------------------------------------------------- transformations


def scale_by_kron(
    *,
    b1: float = 0.9,
    nesterov: bool = False,
    preconditioner_update_probability: ScalarOrSchedule = precond_update_prob_schedule(),
    max_size_triangular: int = 8192,
    max_skew_triangular: float = 1.0,
    max_size_small_dim: int = 1024,
    max_skew_small_dim: float = 4.0,
    min_ndim_triangular: int = 2,
    memory_save_mode: layout_lib.MemorySaveMode = None,
    block_size: Optional[int] = None,
    merge_dims: bool = True,
    param_sharding: MaskOrFn = None,
    preconditioner_lr: ScalarOrSchedule = 0.7,
    preconditioner_init_scale: Optional[float] = None,
    preconditioner_mode: fitting.Mode = "Q0.5EQ1.5",
    cache_preconditioner: bool = False,
    whiten_grad: bool = True,
    lr_style: Optional[Literal["adam"]] = "adam",
    beta_lipschitz: float = 0.9,
    damping: float = 1e-9,
    max_update_rms: float = 1.1,
    update_rms: Optional[float] = None,
    mu_dtype: Optional[jax.typing.DTypeLike] = None,
    precond_dtype: Optional[jax.typing.DTypeLike] = None,
    precond_update_precision: Optional[Precision] = "tensorfloat32",
    precond_grads_precision: Optional[Precision] = None,
    scanned_layers: MaskOrFn = None,
    lax_map_scanned_layers: bool = False,
    lax_map_batch_size: int = 8,
    seed: int = 0,
) -> optax.GradientTransformation:
  r"""Scale updates by a Kronecker-factored PSGD preconditioner (Xi-Lin Li's PSGD Kron).

  PSGD fits a preconditioner P to the gradients g so that P g g^T P ~ I, that is
  P ~ E[g g^T]^(-1/2), the whitening preconditioner, by stochastic steps on a matrix
  Lie group (no matrix inverses or eigendecompositions). Each parameter is seen as a
  batch of blocks G (see `plan_layouts`), by default matrices, and P = P0 (x) P1 acts
  on one as P0 G P1; each factor is a dense matrix or a diagonal, by the size rules
  below. With merge_dims=False a tensor of rank 3 or more gets a factor per dim.

  A step, in order: the momentum m (an EMA of the gradients); until it is set, the
  scale of P from the first nonzero gradients; with probability
  `preconditioner_update_probability` (and always on the step that sets the scale),
  one fitting step of every factor on the gradient (or on m, see `whiten_grad`); then
  the output P m (or P times m's look-ahead, see `nesterov`), clipped per block to RMS
  `max_update_rms` and, with `lr_style='adam'`, scaled to Adam's update size (or each
  block scaled to RMS `update_rms`).
  The result is a direction to be scaled by a negative learning rate, as with
  `optax.scale_by_adam`; `kron` adds that and weight decay.

  Args:
    b1: EMA factor of the momentum, which is what gets preconditioned (0: the
      gradient itself). The factor ramps up as min(count / (count + 1), b1), so no
      bias correction is needed.
    nesterov: precondition Nesterov's look-ahead, the momentum's EMA taken once more
      with the current gradient, instead of the momentum (as Muon does).
    preconditioner_update_probability: chance of a refit on each step: a float, or a
      schedule of the step count. Default: every step for 500 steps, then annealed to
      0.03 (`precond_update_prob_schedule`). The draws come from the key in the state,
      so a restored run makes the same decisions.
    max_size_triangular: a block dim larger than this gets a diagonal factor.
    max_skew_triangular: a dim of size d gets a diagonal factor if d^2 exceeds this
      times the block's number of elements (1.0: only the smaller dim of a
      non-square matrix is dense; inf: every dim).
    max_size_small_dim: dims of at most this size are judged by `max_skew_small_dim`
      instead (by default factors of at most 1024 x 1024 floats, 4 MiB in float32).
    max_skew_small_dim: the skew allowed a small dim: 4.0 makes both sides of small
      and mid-sized matrices up to 4:1 dense, which trains them better
      (docs/kron_vs_muon.md), while the wide sides of large layers, whose dense
      factors would outweigh the layer, stay diagonal. 1.0 gives psgd_torch's and
      psgdax's rule.
    min_ndim_triangular: parameters with fewer dims get diagonal factors only.
    memory_save_mode: None (the rules above), 'one_diag' (the larger dim diagonal) or
      'all_diag' (every factor diagonal, Adam-like memory).
    block_size: cut a dim larger than this into equal blocks, each with factors of
      its own (None: never).
    merge_dims: see a tensor of rank 3 or more as its most square matrix, with two
      factors (True, quad-torch's layout), or keep its dims with a factor each
      (False, psgd_torch's layout). Rank 2 and below are the same either way.
    param_sharding: the params' shardings, a tree of `jax.sharding.NamedSharding`
      shaped like them (or a callable of the params returning one), for shard-local
      preconditioning: each parameter is cut into the shards its devices hold, each
      with factors of its own, so every device fits and applies the factors of its own
      shard and the preconditioner moves no gradient or momentum between devices.
      P is then block-diagonal over the shards, with the factor kinds (dense or
      diagonal) the whole parameter would get. Place the state with
      `psgd.state_partition_specs(..., shard_local=True)`. None: whole parameters.
    preconditioner_lr: step size of the factor fit (relative to the Lipschitz bound),
      or a schedule of the number of refits done (`precond_lr_schedule`; under
      `optax.inject_hyperparams` a callable is evaluated at the step count instead,
      unless preconditioner_lr is among its static_args). 0.7
      (quad-torch's default; psgd_torch and psgdax use 0.1) fits P in tens of refits
      instead of hundreds, but follows recent gradients more than a long average (a
      noisier fit of a fixed covariance); it won on the language model of
      docs/kron_vs_muon.md.
    preconditioner_init_scale: P starts as this squared times I; None sets it once
      from the first nonzero gradients, as (max E[g^4] + damping^4)^(-1/4).
    preconditioner_mode: the geometry of the factor fit, by the reference's names:
      'Q0.5EQ1.5' (default; Q kept near symmetric by Procrustes steps), 'EQ' (the
      original triangular Q), 'QEQ', 'QUAD' (a quadratic form), 'PRO4P' and 'QUAD4P'
      (which store P itself). See `psgd.fitting`.
    cache_preconditioner: keep P's factors (Q^T Q) in the state, recomputed only when
      Q changes: faster steps between refits for the memory of a second set of
      factors. A no-op for the modes that store P.
    whiten_grad: fit P on the gradients (True) or on what it preconditions, the
      momentum or its look-ahead (False; then scale the learning rate down by about
      sqrt((1 + b1) / (1 - b1)), or use lr_style).
    lr_style: 'adam' multiplies the output so its RMS matches Adam's, so AdamW's
      learning rate and weight decay carry over (see `adam_style_scale`: a no-op when
      whiten_grad=True); None keeps PSGD's raw output.
    beta_lipschitz: EMA factor of each factor's Lipschitz bound, which sets the fit's
      step (raise it for sparse gradients).
    damping: scale of the noise added to the fitting target; it bounds P above by
      about I / damping and keeps the fit well posed for zero or low-rank gradients.
    max_update_rms: each block of the output is scaled down to at most this RMS.
    update_rms: scale each block of the output to exactly this RMS, as Muon does with
      its orthogonalised matrices (`consistent_rms`), instead of keeping P's own
      scale; then max_update_rms and lr_style do nothing. About 0.2 keeps AdamW's
      learning rate. None: P's scale.
    mu_dtype: storage dtype of the momentum (None: the gradient's).
    precond_dtype: storage dtype of the factors (None: float32). Arithmetic is
      float32 (float64 for float64 gradients) whatever the storage. With bfloat16
      (half the memory) refitted factors are rounded stochastically (unbiased), so
      refits smaller than its resolution still add up.
    precond_update_precision: matmul precision of the fit, as for
      `jax.default_matmul_precision`; 'bfloat16' also casts the operands to bfloat16
      (float32 accumulation) on every backend, as TPUs do by default.
    precond_grads_precision: the same for forming and applying P.
      bfloat16 factors and operands are faster and smaller, but a P fitted to
      rank-deficient gradients is so ill-conditioned that their rounding can swamp
      the update (docs/psgd_library.md), so by default the factors are float32 and
      no operand is cast (the backend's precision applies where None).
    scanned_layers: a tree of bools shaped like the params (or a callable of the
      params returning one) marking params whose leading axis stacks layers: each
      layer then gets factors and random draws of its own.
    lax_map_scanned_layers: map the scanned layers with `jax.lax.map` (less memory)
      instead of `jax.vmap`.
    lax_map_batch_size: layers per `jax.lax.map` batch.
    seed: seed of the PRNG key kept in the state.

  Returns:
    An `optax.GradientTransformation` whose state is a `KronState`. Its per-parameter
    fields are trees with the params' structure whose leaves are arrays, so it works
    under `optax.masked`, `optax.MultiSteps`, `optax.apply_if_finite` and
    `nnx.Optimizer`; `psgd.state_partition_specs` gives its shardings.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, psgd
    >>> params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}
    >>> tx = optax.chain(psgd.scale_by_kron(), optax.scale_by_learning_rate(1e-3))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(params, state, params)
    >>> jax.tree.map(jnp.shape, updates)
    {'b': (3,), 'w': (4, 3)}
    >>> [f["w"].shape for f in state[0].factors]  # (4, 3): dense(4) (x) dense(3)
    [(1, 4, 4), (1, 3, 3)]

  References:
    Li, `Preconditioned Stochastic Gradient Descent
    <https://arxiv.org/abs/1512.04202>`_, 2015.

    Li, `Preconditioner on Matrix Lie Group for SGD
    <https://arxiv.org/abs/1809.10232>`_, 2018.

    Li, `Stochastic Hessian Fittings with Lie Groups
    <https://arxiv.org/abs/2402.11858>`_, 2024.

    Li, `psgd_torch <https://github.com/lixilinx/psgd_torch>`_, the reference
    implementation (its Kron class and preconditioner fitting rules).
  """
  _check_args(locals())
  # 'bfloat16' is what TPUs do at default precision; XLA on CPU and GPU would multiply
  # float32 operands in float32 (or TF32) regardless, so the operands are cast here.
  fit_operand_dtype, apply_operand_dtype = (
      jnp.bfloat16 if precision == "bfloat16" else None
      for precision in (precond_update_precision, precond_grads_precision))
  s = KronSettings(
      b1=b1, nesterov=nesterov, update_probability=preconditioner_update_probability,
      layout_options=dict(max_size_triangular=max_size_triangular,
                          max_skew_triangular=max_skew_triangular,
                          max_size_small_dim=max_size_small_dim,
                          max_skew_small_dim=max_skew_small_dim,
                          min_ndim_triangular=min_ndim_triangular,
                          memory_save_mode=memory_save_mode, block_size=block_size,
                          merge_dims=merge_dims, param_sharding=param_sharding),
      scanned_layers=scanned_layers, mode=preconditioner_mode,
      preconditioner_lr=preconditioner_lr, init_scale=preconditioner_init_scale,
      cache=cache_preconditioner and preconditioner_mode not in fitting.STORES_P,
      whiten_grad=whiten_grad,
      output_scale=adam_style_scale(b1, whiten_grad) if lr_style == "adam" else 1.0,
      beta_lipschitz=beta_lipschitz, damping=damping, max_update_rms=max_update_rms,
      update_rms=update_rms,
      mu_dtype=mu_dtype, precond_dtype=jnp.dtype(precond_dtype or jnp.float32),
      fit_precision=precond_update_precision, apply_precision=precond_grads_precision,
      fit_operand_dtype=fit_operand_dtype, apply_operand_dtype=apply_operand_dtype,
      lax_map=lax_map_scanned_layers, lax_map_batch_size=lax_map_batch_size, seed=seed)

  def init_fn(params):
    _check_floating(params)
    params = _without_empty(params)
    layouts = s.layouts(params)
    factors = _map_params(functools.partial(_identity_factors, s), layouts)
    return KronState(
        count=jnp.zeros([], jnp.int32),
        key=jax.random.PRNGKey(s.seed),
        mu=None if s.b1 == 0 else jax.tree.map(
            lambda p: jnp.zeros(p.shape, s.mu_dtype or p.dtype), params),
        factors=_slots(layouts, _stored(s, factors)),
        precond=(_slots(layouts, _cached(s, layouts, _stored(s, factors))) if s.cache
                 else None),
        lipschitz=_map_params(lambda lay, p: jnp.zeros(
            (lay.batch, lay.num_factors), _compute_dtype(p.dtype)), layouts, params),
        initialized=jnp.array(s.init_scale is not None),
        num_updates=jnp.zeros([], jnp.int32),
    )

  def update_fn(all_updates, state, params=None):
    del params  # the layouts follow the updates' shapes
    _check_auto_axes(all_updates)
    updates = _without_empty(all_updates)
    layouts = s.layouts(updates)
    grads = jax.tree.map(lambda g: g.astype(_compute_dtype(g.dtype)), updates)
    key, k_decide, k_balance, k_fit = jax.random.split(state.key, 4)
    mu, direction = _momentum(s, state.count, state.mu, grads)
    factors = _per_param(layouts, state.factors)
    precond = (_per_param(layouts, state.precond) if s.cache else
               _map_params(lambda lay: (), layouts))
    chosen = _refit_decision(s, state.count, k_decide)
    found, scale = _unset_scale(s, layouts, grads, state.initialized)
    initialized = state.initialized | found
    # The step whose gradients set P's scale always refits, so that the scale goes into
    # the factors in the one branch that changes them.
    refit_now = initialized & (chosen | ~state.initialized)
    fit = functools.partial(
        _refit, s, layouts, grads if s.whiten_grad else direction,
        jax.tree.map(lambda g: _noise_eps(s, g.dtype), updates),
        _block_seeds(fitting.seed_of(k_fit), layouts), k_balance,
        _scheduled(s.preconditioner_lr, state.num_updates))

    def refit(carry):
      factors, lipschitz, precond = carry
      if s.cache:  # P = Q^T Q: scaling Q by c scales P by c^2
        precond = _rescaled(s, layouts, precond, None if scale is None else scale**2)
      return fit((_rescaled(s, layouts, factors, scale), lipschitz, precond))

    # One conditional for everything that changes the factors: each conditional they
    # pass through unchanged costs a copy of them, and each branch that changes them
    # costs compile time.
    factors, lipschitz, precond = jax.lax.cond(
        refit_now, refit, lambda carry: carry, (factors, state.lipschitz, precond))
    new_updates = _precondition(s, layouts, factors, precond, direction, updates)
    new_updates = jax.tree.map(lambda u, new: u if u.size == 0 else new, all_updates,
                               new_updates)
    return new_updates, KronState(
        count=optax.safe_int32_increment(state.count),
        key=key,
        mu=None if s.b1 == 0 else jax.tree.map(lambda m, old: m.astype(old.dtype), mu,
                                               state.mu),
        factors=_slots(layouts, factors),
        precond=_slots(layouts, precond) if s.cache else None,
        lipschitz=lipschitz,
        initialized=initialized,
        num_updates=state.num_updates + refit_now.astype(jnp.int32),
    )

  # Jitted, so that a step called outside jit (as a first try often is) compiles once
  # rather than running op by op and retracing its conditional on every call; inside a
  # caller's jit this is inlined.
  return optax.GradientTransformation(init_fn, jax.jit(update_fn))


def _masked_weight_decay(weight_decay: float, mask: MaskOrFn) -> optax.GradientTransformation:
  """optax.add_decayed_weights whose init checks the mask against params first, and
  which passes the updates through when weight_decay is 0 (with the same state, so a
  saved state resumes with weight decay switched on or off)."""
  inner = optax.add_decayed_weights(weight_decay, mask)
  off = isinstance(weight_decay, (int, float)) and weight_decay == 0

  def init_fn(params):
    if mask is not None:
      mask_like(mask, params, "weight_decay_mask")
    return inner.init(params)

  def update_fn(updates, state, params=None):
    return (updates, state) if off else inner.update(updates, state, params)

  return optax.GradientTransformation(init_fn, update_fn)


def kron(
    learning_rate: ScalarOrSchedule = 3e-4,
    *,
    b1: float = 0.9,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    weight_decay_mask: MaskOrFn = None,
    preconditioner_update_probability: ScalarOrSchedule = precond_update_prob_schedule(),
    max_size_triangular: int = 8192,
    max_skew_triangular: float = 1.0,
    max_size_small_dim: int = 1024,
    max_skew_small_dim: float = 4.0,
    min_ndim_triangular: int = 2,
    memory_save_mode: layout_lib.MemorySaveMode = None,
    block_size: Optional[int] = None,
    merge_dims: bool = True,
    param_sharding: MaskOrFn = None,
    preconditioner_lr: ScalarOrSchedule = 0.7,
    preconditioner_init_scale: Optional[float] = None,
    preconditioner_mode: fitting.Mode = "Q0.5EQ1.5",
    cache_preconditioner: bool = False,
    whiten_grad: bool = True,
    lr_style: Optional[Literal["adam"]] = "adam",
    beta_lipschitz: float = 0.9,
    damping: float = 1e-9,
    max_update_rms: float = 1.1,
    update_rms: Optional[float] = None,
    mu_dtype: Optional[jax.typing.DTypeLike] = None,
    precond_dtype: Optional[jax.typing.DTypeLike] = None,
    precond_update_precision: Optional[Precision] = "tensorfloat32",
    precond_grads_precision: Optional[Precision] = None,
    scanned_layers: MaskOrFn = None,
    lax_map_scanned_layers: bool = False,
    lax_map_batch_size: int = 8,
    seed: int = 0,
) -> optax.GradientTransformation:
  """PSGD Kron: the Kronecker-factored PSGD preconditioner, weight decay, learning rate.

  `scale_by_kron`, then decoupled weight decay (`optax.add_decayed_weights`, added
  only when weight_decay is not 0), then `optax.scale_by_learning_rate`. With the
  default lr_style='adam', AdamW's learning rate and weight decay are good starting
  values.

  Args:
    learning_rate: a float or a schedule of the step count.
    b1: EMA factor of the momentum (see `scale_by_kron`).
    nesterov: see `scale_by_kron`.
    weight_decay: decoupled weight decay, applied after the preconditioner, so it is
      not preconditioned (as in AdamW).
    weight_decay_mask: a tree of bools shaped like the params (or a callable of the
      params returning one): True where weight decay applies. None: everywhere.
    preconditioner_update_probability: see `scale_by_kron`.
    max_size_triangular: see `scale_by_kron`.
    max_skew_triangular: see `scale_by_kron`.
    max_size_small_dim: see `scale_by_kron`.
    max_skew_small_dim: see `scale_by_kron`.
    min_ndim_triangular: see `scale_by_kron`.
    memory_save_mode: see `scale_by_kron`.
    block_size: see `scale_by_kron`.
    merge_dims: see `scale_by_kron`.
    param_sharding: see `scale_by_kron`.
    preconditioner_lr: see `scale_by_kron`.
    preconditioner_init_scale: see `scale_by_kron`.
    preconditioner_mode: see `scale_by_kron`.
    cache_preconditioner: see `scale_by_kron`.
    whiten_grad: see `scale_by_kron`.
    lr_style: see `scale_by_kron`.
    beta_lipschitz: see `scale_by_kron`.
    damping: see `scale_by_kron`.
    max_update_rms: see `scale_by_kron`.
    update_rms: see `scale_by_kron`.
    mu_dtype: see `scale_by_kron`.
    precond_dtype: see `scale_by_kron`.
    precond_update_precision: see `scale_by_kron`.
    precond_grads_precision: see `scale_by_kron`.
    scanned_layers: see `scale_by_kron`.
    lax_map_scanned_layers: see `scale_by_kron`.
    lax_map_batch_size: see `scale_by_kron`.
    seed: see `scale_by_kron`.

  Every argument is spelled out (none hidden in **kwargs) so that
  `optax.inject_hyperparams(psgd.kron, static_args=psgd.STATIC_ARGS)` can inject or
  schedule the ones in `psgd.HYPERPARAMS`.

  Returns:
    An `optax.GradientTransformation`: an `optax.chain` whose first state is a
    `KronState`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, psgd
    >>> def loss(params):
    ...   return sum(jnp.sum((x - 1.0) ** 2) for x in jax.tree.leaves(params))
    >>> params = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}
    >>> tx = psgd.kron(learning_rate=0.1)
    >>> @jax.jit
    ... def step(params, state):
    ...   updates, state = tx.update(jax.grad(loss)(params), state, params)
    ...   return optax.apply_updates(params, updates), state
    >>> state = tx.init(params)
    >>> for _ in range(100):
    ...   params, state = step(params, state)
    >>> bool(loss(params) < 0.01 * 15.0)  # from 15 at zero
    True

  References:
    Li, `Preconditioned Stochastic Gradient Descent
    <https://arxiv.org/abs/1512.04202>`_, 2015.

    Li, `Preconditioner on Matrix Lie Group for SGD
    <https://arxiv.org/abs/1809.10232>`_, 2018.

    Li, `Stochastic Hessian Fittings with Lie Groups
    <https://arxiv.org/abs/2402.11858>`_, 2024.

    Li, `psgd_torch <https://github.com/lixilinx/psgd_torch>`_, the reference
    implementation.
  """
  arguments = dict(locals())  # first: only the arguments are bound yet
  arrays = [name for name in STATIC_ARGS if isinstance(arguments[name], jax.Array)]
  if arrays:  # optax.inject_hyperparams without static_args turns every number to one
    raise TypeError(
        f"psgd.kron got {', '.join(arrays)} as arrays, but they shape its state and code: "
        "pass Python values. Under optax.inject_hyperparams pass "
        "static_args=psgd.STATIC_ARGS, so that only psgd.HYPERPARAMS are injected.")
  # Only plain numbers are checked: under optax.inject_hyperparams they are arrays.
  if isinstance(learning_rate, (int, float)) and learning_rate < 0:
    raise ValueError(f"learning_rate={learning_rate} must be non-negative.")
  if isinstance(weight_decay, (int, float)) and weight_decay < 0:
    raise ValueError(f"weight_decay={weight_decay} must be non-negative.")
  parts = [scale_by_kron(
      b1=b1, nesterov=nesterov,
      preconditioner_update_probability=preconditioner_update_probability,
      max_size_triangular=max_size_triangular, max_skew_triangular=max_skew_triangular,
      max_size_small_dim=max_size_small_dim, max_skew_small_dim=max_skew_small_dim,
      min_ndim_triangular=min_ndim_triangular, memory_save_mode=memory_save_mode,
      block_size=block_size, merge_dims=merge_dims, param_sharding=param_sharding,
      preconditioner_lr=preconditioner_lr,
      preconditioner_init_scale=preconditioner_init_scale,
      preconditioner_mode=preconditioner_mode,
      cache_preconditioner=cache_preconditioner, whiten_grad=whiten_grad, lr_style=lr_style,
      beta_lipschitz=beta_lipschitz, damping=damping, max_update_rms=max_update_rms,
      update_rms=update_rms,
      mu_dtype=mu_dtype, precond_dtype=precond_dtype,
      precond_update_precision=precond_update_precision,
      precond_grads_precision=precond_grads_precision, scanned_layers=scanned_layers,
      lax_map_scanned_layers=lax_map_scanned_layers, lax_map_batch_size=lax_map_batch_size,
      seed=seed)]
  parts.append(_masked_weight_decay(weight_decay, weight_decay_mask))
  parts.append(optax.scale_by_learning_rate(learning_rate))
  return optax.chain(*parts)


# The arguments of `kron` that may be arrays: optax.inject_hyperparams can inject or
# schedule them. Every other argument shapes the state or the traced computation
# (Python control flow, shapes, dtypes, masks that are callables), so it must be static.
HYPERPARAMS = ("learning_rate", "weight_decay", "preconditioner_update_probability",
               "preconditioner_lr", "beta_lipschitz", "damping", "max_update_rms")
STATIC_ARGS = tuple(name for name in inspect.signature(kron).parameters
                    if name not in HYPERPARAMS)
