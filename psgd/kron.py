"""PSGD Kron as optax transformations: `scale_by_kron` and `kron`.

A step: momentum (EMA of gradients), with some probability a refit of each
parameter's Kronecker factors on the gradient (or momentum), then the momentum is
preconditioned, clipped per matrix and, with lr_style='adam', scaled to Adam's update
size. See `fitting.py` for the math and `layout.py` for how parameters become matrices.
"""

import functools
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from psgd import fitting
from psgd import layout as layout_lib
from psgd.schedules import precond_update_prob_schedule

ScalarOrSchedule = Union[float, Callable[[jax.Array], jax.Array]]
MaskOrFn = Optional[Union[Any, Callable[[Any], Any]]]

BALANCE_PROBABILITY = 0.01


def adam_style_scale(b1: float, whiten_grad: bool) -> float:
  """Factor giving the update Adam's RMS, so AdamW's learning rate carries over.

  With P fitted to gradients, P g has unit RMS, so P applied to the momentum has the
  RMS of Adam's m / sqrt(v): about sqrt((1 - b1) / (1 + b1)) for noisy gradients, 1 for
  consistent ones. It needs no factor. With P fitted to the momentum itself, P m has
  unit RMS, so it is scaled by sqrt((1 - b1) / (1 + b1)), the reference's advice for
  whitening momentum.
  """
  return 1.0 if whiten_grad else ((1 - b1) / (1 + b1)) ** 0.5


class KronState(NamedTuple):
  """State of `scale_by_kron`. Per-parameter fields mirror the params tree."""

  count: jax.Array  # int32 steps taken
  key: jax.Array  # uint32[2] PRNG key: update decisions, noise, norm estimates
  mu: Any  # momentum, or None when b1 == 0
  factors: Any  # per param: (factor0, factor1), each (batch, d, d) or (batch, d)
  precond: Any  # per param: P's factors, shaped like `factors` (cache_preconditioner), or None
  lipschitz: Any  # per param: (batch, 2) float32 Lipschitz memory of the factors
  initialized: jax.Array  # bool: the preconditioner scale is set
  num_updates: jax.Array  # int32 preconditioner refits so far


def _pairs(factor_tree) -> list[tuple[jax.Array, jax.Array]]:
  """Per parameter (factor0, factor1), from a tree of factor pairs.

  Read by leaves in order, not by container type, so a state that went through
  nnx.Optimizer (tuples turned into States) reads the same.
  """
  leaves = jax.tree.leaves(factor_tree)
  return list(zip(leaves[::2], leaves[1::2]))


def _f32(factors):
  return tuple(f.astype(jnp.float32) for f in factors)


def _check_mask(mask, params, name: str):
  """Resolve a bool-pytree-or-callable mask and check it matches params."""
  if mask is None:
    return jax.tree.map(lambda _: False, params)
  if callable(mask):
    mask = mask(params)
  if jax.tree.structure(mask) != jax.tree.structure(params):
    raise ValueError(f"{name} does not match the params tree: give one bool per parameter "
                     f"(params: {jax.tree.structure(params)}, {name}: "
                     f"{jax.tree.structure(mask)}), or a callable of params returning that.")
  return mask


# Arguments that shape the state or the computation: Python values, never traced.
# Pass them as `static_args` to optax.inject_hyperparams; the rest may be injected.
STATIC_ARGS = ("b1", "max_size_triangular", "max_skew_triangular", "min_ndim_triangular",
               "memory_save_mode", "block_size", "preconditioner_mode", "whiten_grad",
               "lr_style", "mu_dtype", "precond_dtype", "precond_update_precision",
               "precond_grads_precision", "scanned_layers", "lax_map_scanned_layers",
               "lax_map_batch_size", "seed", "preconditioner_init_scale",
               "cache_preconditioner")


def _is_number(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_args(args: dict):
  """ValueError naming the first bad argument (numbers only: injected ones are arrays)."""
  mode = args["preconditioner_mode"]
  if mode not in fitting.MODES:
    raise ValueError(f"preconditioner_mode={mode!r} is unknown; choose one of "
                     f"{', '.join(fitting.MODES)}.")
  if not args["whiten_grad"] and args["b1"] == 0:
    raise ValueError("whiten_grad=False whitens the momentum, which needs b1 > 0; set b1 "
                     "(e.g. 0.9) or whiten_grad=True.")
  if args["memory_save_mode"] not in layout_lib.MEMORY_SAVE_MODES:
    raise ValueError(f"memory_save_mode={args['memory_save_mode']!r} must be one of "
                     f"{layout_lib.MEMORY_SAVE_MODES}.")
  if args["lr_style"] not in (None, "adam"):
    raise ValueError(f"lr_style={args['lr_style']!r} must be 'adam' or None.")
  ranges = {
      "b1": (lambda v: 0 <= v < 1, "in [0, 1)"),
      "preconditioner_update_probability": (lambda v: 0 <= v <= 1, "in [0, 1] or a schedule"),
      "preconditioner_lr": (lambda v: v > 0, "positive"),
      "preconditioner_init_scale": (lambda v: v > 0, "positive, or None (from the gradients)"),
      "beta_lipschitz": (lambda v: 0 <= v < 1, "in [0, 1)"),
      "damping": (lambda v: v >= 0, "non-negative"),
      "max_update_rms": (lambda v: v > 0, "positive"),
      "lax_map_batch_size": (lambda v: v >= 1, "at least 1"),
      "block_size": (lambda v: v >= 1, "a positive int or None"),
  }
  for name, (ok, what) in ranges.items():
    if _is_number(args[name]) and not ok(args[name]):
      raise ValueError(f"{name}={args[name]} must be {what}.")


def plan_layouts(params, scanned_layers: MaskOrFn = None, *, max_size_triangular: int = 8192,
                 max_skew_triangular: float = 1.0, min_ndim_triangular: int = 2,
                 memory_save_mode: Optional[str] = None, block_size: Optional[int] = None):
  """A tree of `Layout`s (one per parameter) for params under these settings."""
  mask = _check_mask(scanned_layers, params, "scanned_layers")
  plan = functools.partial(layout_lib.plan_layout, max_size=max_size_triangular,
                           max_skew=max_skew_triangular, min_ndim=min_ndim_triangular,
                           memory_save_mode=memory_save_mode, block_size=block_size)
  return jax.tree.map(lambda p, s: plan(tuple(p.shape), bool(s)), params, mask)


def layout_table(params, precond_dtype=jnp.float32, **layout_kwargs) -> str:
  """Printable table of every parameter's factors and their bytes (see `plan_layouts`)."""
  layouts = plan_layouts(params, **layout_kwargs)
  paths, leaves = zip(*jax.tree_util.tree_flatten_with_path(
      layouts, is_leaf=lambda x: isinstance(x, layout_lib.Layout))[0])
  return layout_lib.format_table([jax.tree_util.keystr(p) for p in paths], list(leaves),
                                 jnp.dtype(precond_dtype).itemsize)


def _init_scale(matrices: list[jax.Array], damping: float) -> tuple[jax.Array, jax.Array]:
  """(found, scale): scale = (max E[g^4] + damping^4)^(-1/8) over all matrices.

  The reference's rule, per matrix (so a scanned layer counts as a parameter of its
  own), computed through normalized quantities so tiny or huge gradients neither
  underflow nor overflow; `found` is False while every gradient is exactly zero.
  """
  def fourth_moment_root(g):  # (batch, rows, cols) -> (batch,)
    gmax = jnp.max(jnp.abs(g), axis=(1, 2), keepdims=True)
    safe = jnp.where(gmax > 0, gmax, 1.0)
    return gmax[:, 0, 0] * jnp.mean((g / safe) ** 4, axis=(1, 2)) ** 0.25

  s = jnp.max(jnp.concatenate([fourth_moment_root(g) for g in matrices]))
  m = jnp.maximum(jnp.maximum(s, damping), fitting._TINY)
  scale = m ** -0.5 * ((s / m) ** 4 + (damping / m) ** 4) ** -0.125
  return s > 0, scale


def scale_by_kron(
    b1: float = 0.9,
    preconditioner_update_probability: ScalarOrSchedule = precond_update_prob_schedule(),
    max_size_triangular: int = 8192,
    max_skew_triangular: float = 1.0,
    min_ndim_triangular: int = 2,
    memory_save_mode: Optional[str] = None,
    block_size: Optional[int] = None,
    preconditioner_lr: float = 0.1,
    preconditioner_init_scale: Optional[float] = None,
    preconditioner_mode: str = "Q0.5EQ1.5",
    cache_preconditioner: bool = False,
    whiten_grad: bool = True,
    lr_style: Optional[str] = "adam",
    beta_lipschitz: float = 0.9,
    damping: float = 1e-9,
    max_update_rms: float = 1.1,
    mu_dtype=None,
    precond_dtype=None,
    precond_update_precision: Optional[str] = "tensorfloat32",
    precond_grads_precision: Optional[str] = None,
    scanned_layers: MaskOrFn = None,
    lax_map_scanned_layers: bool = False,
    lax_map_batch_size: int = 8,
    seed: int = 0,
) -> optax.GradientTransformation:
  """PSGD with Kronecker-factored whitening preconditioners (Xi-Lin Li).

  Args:
    b1: momentum; the preconditioned direction is the momentum (0: the gradient).
    preconditioner_update_probability: chance of refitting the factors on a step, a
      float or a schedule of the step count (default: every step for 500 steps, then
      annealed to 0.03). Decisions come from the key in the state, so a restored run
      makes the same ones.
    max_size_triangular, max_skew_triangular, min_ndim_triangular: a matrix dim gets a
      diagonal factor if it is above max_size, if size^2 > max_skew * numel, or if the
      parameter has fewer than min_ndim dims; otherwise a dense one.
    memory_save_mode: None, 'one_diag' (the larger dim diagonal) or 'all_diag'.
    block_size: cut a matrix dim larger than this into equal blocks with factors of
      their own (None: never).
    preconditioner_lr: step size of the factor fit.
    preconditioner_init_scale: P starts as scale^2 * I; None sets it from the first
      nonzero gradients.
    preconditioner_mode: 'Q0.5EQ1.5' (default), 'EQ', 'QEQ', 'QUAD', 'PRO4P', 'QUAD4P'.
    cache_preconditioner: keep P = Q^T Q in the state, recomputed only when Q changes,
      instead of forming it every step: faster steps between refits, at the memory of a
      second set of factors. A no-op for the modes that store P itself ('*4P').
    whiten_grad: fit P on gradients (True) or on the momentum (False; then reduce the
      learning rate by about sqrt((1 + b1) / (1 - b1))).
    lr_style: 'adam' gives the update Adam's RMS so AdamW learning rates and weight
      decay carry over (see `adam_style_scale`); None keeps PSGD's raw update.
    beta_lipschitz: EMA factor of the Lipschitz memory (raise it for sparse gradients).
    damping: noise level added before fitting; bounds P by about I / damping.
    max_update_rms: per-matrix clip of the preconditioned update's RMS.
    mu_dtype, precond_dtype: storage dtypes of momentum (default: the gradient's) and
      factors (default float32). Arithmetic is float32, but see the precisions.
    precond_update_precision, precond_grads_precision: matmul precision for fitting
      and for applying (and forming) the preconditioner. 'bfloat16' casts those
      matmuls' operands to bfloat16, accumulating in float32, on every backend, as TPUs
      do at default precision: about 2x faster on CPUs with AMX (and GPUs), for a
      rounding far below gradient noise (the fit's accuracy is tested with it).
    scanned_layers: bool pytree (or callable of params) marking params whose leading
      axis stacks layers; each layer gets its own factors and random keys.
    lax_map_scanned_layers, lax_map_batch_size: map scanned layers with lax.map in
      batches (less memory) instead of vmap.
    seed: seed of the PRNG key kept in the state.
  """
  _check_args(locals())
  mode = preconditioner_mode
  cache = cache_preconditioner and mode not in fitting.STORES_P
  precond_dtype = jnp.dtype(precond_dtype or jnp.float32)
  layout_kwargs = dict(max_size_triangular=max_size_triangular,
                       max_skew_triangular=max_skew_triangular,
                       min_ndim_triangular=min_ndim_triangular,
                       memory_save_mode=memory_save_mode, block_size=block_size)
  # 'bfloat16' is what TPUs do at default precision; XLA on CPU and GPU would multiply
  # float32 operands in float32 (or TF32) regardless, so the operands are cast here.
  fit_dtype, apply_dtype = (jnp.bfloat16 if precision == "bfloat16" else None
                            for precision in (precond_update_precision,
                                              precond_grads_precision))
  fit = functools.partial(fitting.fit, mode, lr=preconditioner_lr, beta=beta_lipschitz,
                          damping=damping, operand_dtype=fit_dtype)
  output_scale = adam_style_scale(b1, whiten_grad) if lr_style == "adam" else 1.0

  def layouts_of(tree):
    return jax.tree.leaves(plan_layouts(tree, scanned_layers, **layout_kwargs),
                           is_leaf=lambda x: isinstance(x, layout_lib.Layout))

  def p_factors_of(fs, operand_dtype=None):
    """P's factors of one parameter's batch of matrices."""
    return jax.vmap(lambda *f: fitting.preconditioner_factors(mode, f, operand_dtype))(*fs)

  def stored(factors):
    """Factors in their storage dtype. They keep it between refits, so a step that
    does not refit converts nothing but what it multiplies with."""
    return tuple(f.astype(precond_dtype) for f in factors)

  def derive(factor_list):
    """P's factors of each parameter (float32 in, stored out) if cached, else None."""
    return [stored(p_factors_of(fs)) for fs in factor_list] if cache else None

  def map_matrices(lay, fn, *args):
    """fn over the batch of matrices of one param: vmap, or lax.map for scanned."""
    if lay.scanned and lax_map_scanned_layers:
      return jax.lax.map(lambda xs: fn(*xs), args, batch_size=lax_map_batch_size)
    return jax.vmap(fn)(*args)

  def init_fn(params):
    leaves, treedef = jax.tree.flatten(params)
    layouts = layouts_of(params)
    init_scale = jnp.float32(preconditioner_init_scale or 1.0)

    def identity_factors(lay):
      eye = [jnp.broadcast_to(jnp.eye(d) if dense else jnp.ones(d), shape)
             for d, dense, shape in zip(lay.block_shape, lay.dense, lay.factor_shapes())]
      return fitting.scale_factors(mode, tuple(eye), init_scale)

    mu = None
    if b1 > 0:
      mu = treedef.unflatten([jnp.zeros_like(p, dtype=mu_dtype or p.dtype) for p in leaves])
    factors = [identity_factors(lay) for lay in layouts]
    precond = derive(factors)
    return KronState(
        count=jnp.zeros([], jnp.int32),
        key=jax.random.PRNGKey(seed),
        mu=mu,
        factors=treedef.unflatten([stored(fs) for fs in factors]),
        precond=None if precond is None else treedef.unflatten(precond),
        lipschitz=treedef.unflatten([jnp.zeros((lay.batch, 2), jnp.float32)
                                     for lay in layouts]),
        initialized=jnp.array(preconditioner_init_scale is not None),
        num_updates=jnp.zeros([], jnp.int32),
    )

  def update_fn(updates, state, params=None):
    leaves, treedef = jax.tree.flatten(updates)
    layouts = layouts_of(updates if params is None else params)
    grads = [g.astype(jnp.float32) for g in leaves]
    factors = [stored(fs) for fs in _pairs(state.factors)]
    precond = [stored(fs) for fs in _pairs(state.precond)] if cache else None
    lipschitz = jax.tree.leaves(state.lipschitz)
    old_mu = jax.tree.leaves(state.mu)
    key, k_decide, k_balance, k_fit = jax.random.split(state.key, 4)

    # Momentum, with an EMA factor that ramps up from 0 (no bias correction needed).
    if b1 > 0:
      beta = jnp.minimum(state.count / (state.count + 1.0), b1)
      mu = [beta * m.astype(jnp.float32) + (1 - beta) * g
            for m, g in zip(old_mu, grads)]
    else:
      mu = grads

    # Scale of P from the first nonzero gradients.
    if preconditioner_init_scale is None:
      def set_scale(carry):  # a pass over all gradients: only until the scale is set
        found, scale = _init_scale(
            [layout_lib.to_matrices(g, lay) for g, lay in zip(grads, layouts)], damping)
        scaled = [fitting.scale_factors(mode, _f32(fs), scale) for fs in carry[0]]
        scaled = jax.tree.map(lambda a, b: jnp.where(found, a, b.astype(a.dtype)), scaled,
                              carry[0])
        return ([stored(fs) for fs in scaled], derive(scaled)), found
      (factors, precond), initialized = jax.lax.cond(
          state.initialized, lambda carry: (carry, jnp.array(True)), set_scale,
          (factors, precond))
    else:
      initialized = state.initialized

    # Refit the factors with some probability (never before the scale is set).
    prob = (preconditioner_update_probability(state.count)
            if callable(preconditioner_update_probability)
            else preconditioner_update_probability)
    do_update = (jax.random.uniform(k_decide) < prob) & initialized
    targets = grads if whiten_grad else mu
    offsets = [0]
    for lay in layouts[:-1]:
      offsets.append(offsets[-1] + lay.batch)

    def refit(carry):
      factors, lipschitz, precond = carry
      do_balance = jax.random.uniform(k_balance) < BALANCE_PROBABILITY
      new_factors, new_lipschitz = [], []
      with jax.default_matmul_precision(precond_update_precision):
        for i, (lay, fs, lip, h, g) in enumerate(zip(layouts, factors, lipschitz, targets,
                                                     leaves)):
          keys = jax.vmap(jax.random.fold_in, (None, 0))(
              k_fit, offsets[i] + jnp.arange(lay.batch))
          fit_one = lambda fs, lip, h, key, pfs: fit(
              fs, lip, h, key, grad_eps=float(jnp.finfo(g.dtype).eps), p_factors=pfs)
          fs, lip = map_matrices(lay, fit_one, _f32(fs), lip, layout_lib.to_matrices(h, lay),
                                 keys, None if precond is None else _f32(precond[i]))
          new_factors.append(fs)
          new_lipschitz.append(lip)
      new_factors = jax.lax.cond(
          do_balance, lambda fl: [jax.vmap(fitting.balance)(fs) for fs in fl],
          lambda fl: fl, new_factors)
      return [stored(fs) for fs in new_factors], new_lipschitz, derive(new_factors)

    factors, lipschitz, precond = jax.lax.cond(do_update, refit, lambda c: c,
                                               (factors, lipschitz, precond))

    # Precondition, clip per matrix, scale.
    def precondition_one(p_factors, x):
      y = fitting.apply_preconditioner(p_factors, x, apply_dtype)
      rms = jnp.sqrt(jnp.mean(y * y))
      return y * (max_update_rms / jnp.maximum(rms, max_update_rms))

    operands = (lambda fs: fs) if apply_dtype else _f32  # _matmul casts for apply_dtype
    out = []
    with jax.default_matmul_precision(precond_grads_precision):
      for i, (lay, fs, m, g) in enumerate(zip(layouts, factors, mu, leaves)):
        p_factors = (operands(precond[i]) if cache else
                     p_factors_of(operands(fs), apply_dtype))
        y = map_matrices(lay, precondition_one, p_factors, layout_lib.to_matrices(m, lay))
        out.append((layout_lib.from_matrices(y, lay) * output_scale).astype(g.dtype))

    new_state = KronState(
        count=optax.safe_int32_increment(state.count),
        key=key,
        mu=None if b1 == 0 else treedef.unflatten(
            [m.astype(old.dtype) for m, old in zip(mu, old_mu)]),
        factors=treedef.unflatten(factors),
        precond=None if precond is None else treedef.unflatten(precond),
        lipschitz=treedef.unflatten(lipschitz),
        initialized=initialized,
        num_updates=state.num_updates + do_update.astype(jnp.int32),
    )
    return treedef.unflatten(out), new_state

  return optax.GradientTransformation(init_fn, update_fn)


def _masked_weight_decay(weight_decay: float, mask: MaskOrFn) -> optax.GradientTransformation:
  """optax.add_decayed_weights whose init checks the mask against params first."""
  inner = optax.add_decayed_weights(weight_decay, mask)

  def init_fn(params):
    if mask is not None:
      _check_mask(mask, params, "weight_decay_mask")
    return inner.init(params)

  return optax.GradientTransformation(init_fn, inner.update)


def kron(
    learning_rate: ScalarOrSchedule = 3e-4,
    b1: float = 0.9,
    weight_decay: float = 0.0,
    weight_decay_mask: MaskOrFn = None,
    preconditioner_update_probability: ScalarOrSchedule = precond_update_prob_schedule(),
    max_size_triangular: int = 8192,
    max_skew_triangular: float = 1.0,
    min_ndim_triangular: int = 2,
    memory_save_mode: Optional[str] = None,
    block_size: Optional[int] = None,
    preconditioner_lr: float = 0.1,
    preconditioner_init_scale: Optional[float] = None,
    preconditioner_mode: str = "Q0.5EQ1.5",
    cache_preconditioner: bool = False,
    whiten_grad: bool = True,
    lr_style: Optional[str] = "adam",
    beta_lipschitz: float = 0.9,
    damping: float = 1e-9,
    max_update_rms: float = 1.1,
    mu_dtype=None,
    precond_dtype=None,
    precond_update_precision: Optional[str] = "tensorfloat32",
    precond_grads_precision: Optional[str] = None,
    scanned_layers: MaskOrFn = None,
    lax_map_scanned_layers: bool = False,
    lax_map_batch_size: int = 8,
    seed: int = 0,
) -> optax.GradientTransformation:
  """PSGD Kron with decoupled weight decay and a learning rate (float or schedule).

  The other arguments are `scale_by_kron`'s (spelled out so that
  `optax.inject_hyperparams(kron)` sees them). With the default lr_style='adam',
  AdamW's learning rate and weight decay are good starting values.
  """
  # Only plain numbers are checked: under optax.inject_hyperparams they are arrays.
  if isinstance(learning_rate, (int, float)) and learning_rate < 0:
    raise ValueError(f"learning_rate={learning_rate} must be non-negative.")
  if isinstance(weight_decay, (int, float)) and weight_decay < 0:
    raise ValueError(f"weight_decay={weight_decay} must be non-negative.")
  parts = [scale_by_kron(
      b1=b1, preconditioner_update_probability=preconditioner_update_probability,
      max_size_triangular=max_size_triangular, max_skew_triangular=max_skew_triangular,
      min_ndim_triangular=min_ndim_triangular, memory_save_mode=memory_save_mode,
      block_size=block_size, preconditioner_lr=preconditioner_lr,
      preconditioner_init_scale=preconditioner_init_scale,
      preconditioner_mode=preconditioner_mode,
      cache_preconditioner=cache_preconditioner, whiten_grad=whiten_grad, lr_style=lr_style,
      beta_lipschitz=beta_lipschitz, damping=damping, max_update_rms=max_update_rms,
      mu_dtype=mu_dtype, precond_dtype=precond_dtype,
      precond_update_precision=precond_update_precision,
      precond_grads_precision=precond_grads_precision, scanned_layers=scanned_layers,
      lax_map_scanned_layers=lax_map_scanned_layers, lax_map_batch_size=lax_map_batch_size,
      seed=seed)]
  if not isinstance(weight_decay, (int, float)) or weight_decay > 0:
    parts.append(_masked_weight_decay(weight_decay, weight_decay_mask))
  parts.append(optax.scale_by_learning_rate(learning_rate))
  return optax.chain(*parts)
