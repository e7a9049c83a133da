"""Fitting the Kronecker factors of one tensor's whitening preconditioner.

PSGD (Xi-Lin Li, arXiv:1512.04202, 1809.10232, 2402.11858) fits P = Q^T Q so that
P h h^T P ~ I for gradients h, i.e. P ~ E[h h^T]^(-1/2), by stochastic steps on a Lie
group. For a tensor h with P = P0 (x) P1 (x) ... (one factor per dim; an (r, c)
matrix's P h is P0 h P1) factor k is moved by the gap between two terms:
  term1_k: the Gram matrix of P h along dim k (what P currently gives),
  term2_k: numel / size_k times the identity (what a whitened gradient gives).
The step is lr / L_k, with L_k an EMA-max of a bound on the local Lipschitz constant;
the spectral norms in that bound come from a cheap randomized subspace iteration.

Modes (geometry of the update; the names and rules are the reference's, psgd_torch):
  Q0.5EQ1.5  dQ = Q^0.5 E Q^1.5: dQ = -E Q, then one online Procrustes step rotates Q
             back towards symmetric positive definite (default).
  QEQ        dQ = Q E Q.                      QUAD  a quadratic form; Q stays SPD.
  EQ         dQ = E Q on upper-triangular Q (the original PSGD, triangular solves).
  PRO4P      store P itself: dP = -E P, then third-order Procrustes steps until P is
             symmetric again (online Newton-Schulz).
  QUAD4P     store P itself with the QUAD quadratic form.
Everything here works on one tensor; `kron.py` maps it over layers, blocks and params.
"""

import functools
import math
from typing import Callable, Literal, get_args

import jax
import jax.numpy as jnp

Factors = tuple[jax.Array, ...]  # one per dim: (d, d) dense or (d,) diagonal

Mode = Literal["Q0.5EQ1.5", "EQ", "QEQ", "QUAD", "PRO4P", "QUAD4P"]
MODES: tuple[str, ...] = get_args(Mode)
STORES_P = frozenset({"PRO4P", "QUAD4P"})
_TINY = jnp.finfo(jnp.float32).smallest_normal


# -------------------------------------------------------------------- random draws
# The fit's random numbers (damping noise, probes, the start vectors of the norm bounds,
# the dither of stochastic rounding) are hashes of a uint32 seed and each element's
# index, not draws of jax.random: the compiler expands every call of its default PRNG
# (threefry) into many rounds of integer ops, a large share of the refit's program and
# of its compile time (docs/pod_slices.md). A hash is a few ops.


def _hash32(x: jax.Array) -> jax.Array:
  """An avalanche mix of uint32s (the finalizer of Appleby's MurmurHash3): each output
  bit depends on every input bit."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * jnp.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def seed_of(key: jax.Array) -> jax.Array:
  """A uint32 seed from all the bits of a jax.random key (typed or raw, any PRNG)."""
  words = jax.random.key_data(key).reshape(-1)
  seed = jnp.uint32(0x9E3779B9)
  for i in range(words.shape[0]):
    seed = _hash32(seed ^ words[i])
  return seed


def mix(seed, salt) -> jax.Array:
  """A seed for the draw named `salt` (an int or uint32 array, broadcast against
  `seed`): distinct salts give unrelated seeds."""
  salt = jnp.asarray(salt).astype(jnp.uint32)
  return _hash32(jnp.asarray(seed, jnp.uint32) + salt * jnp.uint32(0x9E3779B9))


def random_bits(seed: jax.Array, shape: tuple[int, ...],
                transposed: jax.Array | bool = False) -> jax.Array:
  """uint32 array of `shape`: each element its index hashed twice, with the hashed seed
  mixed in before each round. One round would not do: two seeds whose hashes differ
  only in low bits would draw the same numbers in another order. Where `transposed`
  (a bool, traced or not; 2-D shapes), the transpose of the draws for shape[::-1]."""
  seed = _hash32(jnp.asarray(seed, jnp.uint32))
  index = jnp.arange(math.prod(shape), dtype=jnp.uint32).reshape(shape)
  if transposed is not False:
    flipped = jnp.arange(math.prod(shape), dtype=jnp.uint32).reshape(shape[::-1]).T
    index = jnp.where(transposed, flipped, index)
  return _hash32(_hash32(index ^ seed) ^ _hash32(seed + jnp.uint32(0x9E3779B9)))


def random_normal(seed: jax.Array, shape: tuple[int, ...], dtype=jnp.float32,
                  transposed: jax.Array | bool = False) -> jax.Array:
  """Standard normal draws: the top 24 bits of `random_bits` as an odd multiple of
  2^-24 in (-1, 1), exact in float32, through sqrt(2) erfinv (what jax.random.normal
  does to its uniform draws)."""
  odd = (random_bits(seed, shape, transposed) >> 8).astype(jnp.int32) * 2 + (1 - 2**24)
  uniform = odd.astype(jnp.float32) * 2.0**-24
  return (math.sqrt(2.0) * jax.lax.erf_inv(uniform)).astype(dtype)


def random_signs(seed: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
  """+-1 with equal probability (the top bit of `random_bits`): random directions at a
  fraction of the cost of normal draws, where only the direction matters."""
  top = (random_bits(seed, shape) >> 31).astype(jnp.int32)
  return (2 * top - 1).astype(dtype)


def round_stochastically(x: jax.Array, seed: jax.Array) -> jax.Array:
  """float32 -> bfloat16, rounding away from zero with probability equal to the part
  cut off, so the rounding is unbiased: a refit's change below bfloat16's resolution
  still moves a stored factor on average, where round-to-nearest would drop it every
  time (Gupta et al., `Deep Learning with Limited Numerical Precision
  <https://arxiv.org/abs/1502.02551>`_, 2015). The dither is `random_bits` of `seed`
  (a fresh seed for every rounding)."""
  dither = random_bits(seed, x.shape) >> 16
  bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  kept = (bits + dither) & jnp.uint32(0xFFFF0000)
  return jax.lax.bitcast_convert_type(kept, jnp.float32).astype(jnp.bfloat16)


# ----------------------------------------------------------------- linear algebra


def _matmul(a: jax.Array, b: jax.Array, operand_dtype=None) -> jax.Array:
  """a @ b; with operand_dtype, on operands cast to it, accumulated in float32."""
  if operand_dtype is None:
    return a @ b
  return jnp.matmul(a.astype(operand_dtype), b.astype(operand_dtype),
                    preferred_element_type=jnp.float32)


def _contract(a: jax.Array, b: jax.Array, axes, operand_dtype=None) -> jax.Array:
  """jnp.tensordot, with operand_dtype as in `_matmul`."""
  if operand_dtype is None:
    return jnp.tensordot(a, b, axes)
  return jnp.tensordot(a.astype(operand_dtype), b.astype(operand_dtype), axes,
                       preferred_element_type=jnp.float32)


def along(f: jax.Array, x: jax.Array, axis: int, operand_dtype=None) -> jax.Array:
  """x with the factor f applied along `axis` (f @ x for a matrix's rows, x @ f^T for
  its columns); a diagonal f is stored as a vector."""
  if f.ndim == 1:
    return x * f.reshape((-1,) + (1,) * (x.ndim - 1 - axis))
  if axis == 0:
    return _contract(f, x, (1, 0), operand_dtype)
  return jnp.moveaxis(_contract(x, f, (axis, 1), operand_dtype), -1, axis)


def _solve_along(q: jax.Array, x: jax.Array, axis: int) -> jax.Array:
  """x with Q^-T applied along `axis`, for an upper-triangular (or diagonal) Q."""
  if q.ndim == 1:
    return x / q.reshape((-1,) + (1,) * (x.ndim - 1 - axis))
  y = jnp.moveaxis(x, axis, 0)
  solved = jax.scipy.linalg.solve_triangular(q, y.reshape(y.shape[0], -1), trans=1,
                                             lower=False)
  return jnp.moveaxis(solved.reshape(y.shape), 0, axis)


def _gram(x: jax.Array, axis: int, dense: bool, operand_dtype=None) -> jax.Array:
  """x contracted with itself over every dim but `axis` (its diagonal if not dense)."""
  others = tuple(i for i in range(x.ndim) if i != axis)
  if not dense:
    return jnp.sum(x * x, axis=others)
  return _contract(x, x, (others, others), operand_dtype)


def _subspace_norm_bound(a: jax.Array, seed: jax.Array, scale: jax.Array,
                         num_vectors: int, half_iters: int) -> jax.Array:
  """max ||v a|| over a few unit rows v after subspace iteration: a lower bound of ||a||_2.

  The random start vectors are tilted towards the largest row of `a`, which keeps the
  estimate good for large matrices of very low rank. They are random signs, where the
  reference draws normal ones: any random start that is not orthogonal to the top
  eigenvector serves (Halko, Martinsson and Tropp, `Finding structure with randomness
  <https://arxiv.org/abs/0909.4061>`_, 2011, on random test matrices), and signs
  compile to a few ops where a normal draw needs an inverse error function.
  """
  a = a / scale
  pivot = a[jnp.argmax(jnp.sum(a * a, axis=1))]
  v = random_signs(seed, (num_vectors, a.shape[0]), a.dtype)
  v = pivot + jnp.sign(v @ pivot)[:, None] * v
  for _ in range(half_iters):
    v = v @ a
    v = v / (jnp.linalg.norm(v, axis=1, keepdims=True) + _TINY)
    v = v @ a
  return scale * jnp.max(jnp.linalg.norm(v, axis=1))


def norm_lower_bound_spd(a: jax.Array, seed: jax.Array, num_vectors: int = 32,
                         half_iters: int = 2) -> jax.Array:
  """Cheap lower bound of the spectral norm of a symmetric positive semidefinite `a`
  (`seed`: a uint32 for the random start vectors, as for all draws here)."""
  return _subspace_norm_bound(a, seed, jnp.max(jnp.diagonal(a)) + _TINY, num_vectors,
                              half_iters)


def norm_lower_bound_skew(a: jax.Array, seed: jax.Array, num_vectors: int = 32,
                          half_iters: int = 2) -> jax.Array:
  """Cheap lower bound of the spectral norm of a skew-symmetric `a`."""
  return _subspace_norm_bound(a, seed, jnp.max(jnp.abs(a)) + _TINY, num_vectors, half_iters)


def procrustes_step(q: jax.Array, seed: jax.Array, max_step: float = 0.125,
                    operand_dtype=None) -> jax.Array:
  """One online step of min_U ||U q - I|| over rotations U = exp(a R), R = q^T - q.

  exp(aR) is expanded to second order (error ~ ||aR||^4 / 4, tiny for a||R|| <= 1/8);
  a line search on the second-order model keeps the step from overshooting.
  """
  r = q.T - q
  r = r / (norm_lower_bound_skew(r, seed) + _TINY)
  rq = _matmul(r, q, operand_dtype)
  rrq = _matmul(r, rq, operand_dtype)
  tr_rq, tr_rrq = jnp.trace(rq), jnp.trace(rrq)
  a = jnp.where(tr_rrq < 0, jnp.minimum(-tr_rq / jnp.minimum(tr_rrq, -_TINY), max_step),
                max_step)
  return q + a * (rq + 0.5 * a * rrq)


def procrustes_step3(q: jax.Array, seed: jax.Array, max_step: float = 1 / 3,
                     operand_dtype=None) -> jax.Array:
  """`procrustes_step` with U ~ I + aR + (aR)^2 / 2 + (aR)^3 / 8 (error ~ ||aR||^6 / 64).

  a is the larger root of the model's derivative, tr(RQ) + a tr(R^2 Q) + 3/8 a^2
  tr(R^3 Q) = 0, capped at max_step; no step when q is symmetric to rounding (then
  tr(RQ) > 0 > tr(R^3 Q) fails). psgd_torch's `procrustes_step3`.
  """
  r = q.T - q
  r = r / (norm_lower_bound_skew(r, seed) + _TINY)
  rq = _matmul(r, q, operand_dtype)
  rrq = _matmul(r, rq, operand_dtype)
  rrrq = _matmul(r, rrq, operand_dtype)
  tr1, tr2, tr3 = jnp.trace(rq), jnp.trace(rrq), jnp.trace(rrrq)
  moves = (tr1 > 0) & (tr3 < 0)
  root = (-tr2 - jnp.sqrt(jnp.maximum(tr2 * tr2 - 1.5 * tr1 * tr3, 0.0))) / (
      0.75 * jnp.where(moves, tr3, -1.0))
  a = jnp.where(moves, jnp.minimum(root, max_step), 0.0)
  return q + a * (rq + 0.5 * a * (rrq + 0.25 * a * rrrq))


def _symmetrize(q: jax.Array, seed: jax.Array, operand_dtype=None,
                max_steps: int = 10) -> jax.Array:
  """`procrustes_step3` until q is symmetric to 1e-3 of its largest entry (at least one
  step, at most max_steps), as psgd_torch's PRO4P does after each fitting step."""
  def near_symmetric(q):
    return jnp.max(jnp.abs(q.T - q)) < 1e-3 * jnp.max(jnp.abs(q))

  def body(carry):
    i, q = carry
    return i + 1, procrustes_step3(q, mix(seed, i), operand_dtype=operand_dtype)

  first = body((0, q))
  return jax.lax.while_loop(lambda c: (c[0] < max_steps) & ~near_symmetric(c[1]), body,
                            first)[1]


# ------------------------------------------------------------------ preconditioner


def preconditioner_factors(mode: str, factors: Factors, operand_dtype=None) -> Factors:
  """The factors of P: stored as is in the *4P modes, Q^T Q otherwise."""
  if mode in STORES_P:
    return factors
  return tuple(f * f if f.ndim == 1 else _matmul(f.T, f, operand_dtype) for f in factors)


def apply_preconditioner(p_factors: Factors, x: jax.Array, operand_dtype=None) -> jax.Array:
  """P x for P = P0 (x) P1 (x) ... with symmetric factors: P_k applied along dim k.

  With operand_dtype (e.g. bfloat16) the matmuls take operands of that dtype and
  accumulate in float32, what TPUs do at default precision, on every backend.
  """
  for axis, f in enumerate(p_factors):
    x = along(f, x, axis, operand_dtype)
  return x


def scale_factors(mode: str, factors: Factors, scale: jax.Array) -> Factors:
  """Factors whose P is `scale`^2 times that of `factors` (scale > 0)."""
  per_factor = scale ** ((2.0 if mode in STORES_P else 1.0) / len(factors))
  return tuple(f * per_factor.astype(f.dtype) for f in factors)


def balance(factors: Factors, when: jax.Array | bool = True) -> Factors:
  """Equalize the factors' max-abs (same product), against over/underflow; the factors
  unchanged where `when` is False (a multiply by one, cheaper than a conditional, which
  would copy them)."""
  norms = jnp.stack([jnp.max(jnp.abs(f)) for f in factors])
  gmean = jnp.exp(jnp.mean(jnp.log(norms + _TINY)))
  return tuple(f * jnp.where(when, gmean / (n + _TINY), 1).astype(f.dtype)
               for f, n in zip(factors, norms))


def _lipschitz(ell: jax.Array, old: jax.Array, beta: float) -> jax.Array:
  return jnp.maximum(beta * old + (1 - beta) * ell, ell)


# ---------------------------------------------------------- per-mode factor rules
# Each rule moves one factor given term1, term2 (a scalar times I), the step lr / L,
# a seed and the matmul operand dtype; dense factors are matrices, the others vectors.
# They are psgd_torch's `update_precond_kron_whiten_*` rules.


def _rule_q0p5eq1p5(f, t1, t2, step, seed, dt):
  if f.ndim == 1:
    return f * (1 - step * (t1 - t2))
  return procrustes_step(f - step * (_matmul(t1, f, dt) - t2 * f), seed, operand_dtype=dt)


def _rule_qeq(f, t1, t2, step, seed, dt):
  del seed
  if f.ndim == 1:
    return f * (1 - step * (t1 - t2))
  return f - step * (_matmul(f, t1, dt) - t2 * f)


def _quadratic(f, t1, t2, half_step, dt):
  if f.ndim == 1:
    return f * (1 - half_step * (t1 - t2)) ** 2
  p = f - half_step * (_matmul(t1, f, dt) - t2 * f)
  p = p - half_step * (_matmul(p, t1, dt) - t2 * p)
  return (p + p.T) / 2


def _rule_quad(f, t1, t2, step, seed, dt):
  del seed
  return _quadratic(f, t1, t2, step / 2, dt)


def _rule_quad4p(f, t1, t2, step, seed, dt):
  del seed
  return _quadratic(f, t1, t2, step, dt)


def _rule_pro4p(f, t1, t2, step, seed, dt):
  if f.ndim == 1:
    return f * (1 - step * (t1 - t2))
  return _symmetrize(f - step * (_matmul(t1, f, dt) - t2 * f), seed, dt)


_RULES: dict[str, Callable] = {
    "Q0.5EQ1.5": _rule_q0p5eq1p5,
    "QEQ": _rule_qeq,
    "QUAD": _rule_quad,
    "QUAD4P": _rule_quad4p,
    "PRO4P": _rule_pro4p,
}


def _damped(h: jax.Array, noise: jax.Array, damping: float, grad_eps: float) -> jax.Array:
  """h plus noise (i.i.d. standard normal, as the reference) of size
  damping + grad_eps * |h|: it bounds P above by about I / damping and keeps the fit
  well posed when h is zero or low rank."""
  return h + (damping + grad_eps * jnp.abs(h)) * noise


def fit(mode: str, factors: Factors, lipschitz: jax.Array, h: jax.Array, seed: jax.Array, *,
        lr: float, beta: float, damping: float, grad_eps: float,
        p_factors: Factors | None = None, operand_dtype=None,
        fitted: tuple[bool, ...] | None = None,
        transposed: jax.Array | bool = False) -> tuple[Factors, jax.Array]:
  """One fitting step of a tensor's factors (one per dim) and their Lipschitz memory
  (shape (num_factors,)) on h, the gradient or momentum (float32 or float64), with the
  random draws made from `seed` (a uint32; see `random_bits`). Where `transposed` (a
  bool, traced or not), h is the transpose of a matrix and the factors are its two in
  reverse order: the draws are then that matrix's, so the fit is its fit, transposed.

  Factor k moves only if fitted[k] (`Layout.fitted`: a size-1 dim's factor stays).
  `p_factors`, if given, are the factors' `preconditioner_factors` (cached by the
  caller), saving their recomputation. With `operand_dtype` (e.g. bfloat16) the matmuls
  take operands of that dtype (float32 accumulation); the spectral-norm bounds and
  EQ's triangular solves stay float32.
  """
  fitted = fitted or (True,) * len(factors)
  if mode == "EQ":
    return _fit_eq(factors, lipschitz, h, seed, lr=lr, beta=beta, damping=damping,
                   grad_eps=grad_eps, operand_dtype=operand_dtype, fitted=fitted,
                   transposed=transposed)
  noise_seed, norm_seed, rule_seed = (mix(seed, i) for i in range(3))
  own = functools.partial(_own_index, len(factors), transposed)
  h = _damped(h, random_normal(noise_seed, h.shape, h.dtype, transposed), damping, grad_eps)
  if p_factors is None:
    p_factors = preconditioner_factors(mode, factors, operand_dtype)
  pg = apply_preconditioner(p_factors, h, operand_dtype)
  new_factors, new_lipschitz = [], []
  for k, f in enumerate(factors):
    if not fitted[k]:
      new_factors.append(f)
      new_lipschitz.append(lipschitz[k])
      continue
    dense = f.ndim == 2
    t1 = _gram(pg, k, dense, operand_dtype)
    t2 = pg.size / pg.shape[k]
    bound = norm_lower_bound_spd(t1, mix(norm_seed, own(k))) if dense else jnp.max(t1)
    lip = _lipschitz(bound + t2, lipschitz[k], beta)
    new_factors.append(_RULES[mode](f, t1, t2, lr / lip, mix(rule_seed, own(k)),
                                    operand_dtype))
    new_lipschitz.append(lip)
  return tuple(new_factors), jnp.stack(new_lipschitz)


def _own_index(num_factors: int, transposed, k: int):
  """Factor k's index in the tensor the draws belong to (see `fit`'s `transposed`)."""
  return k if transposed is False else jnp.where(transposed, num_factors - 1 - k, k)


def _fit_eq(factors, lipschitz, h, seed, *, lr, beta, damping, grad_eps, operand_dtype,
            fitted, transposed):
  """dQ = E Q with triangular Q: fits Q h h^T Q^T against Q^-T v v^T Q^-1 for probe v."""
  probe_seed, norm_seed = mix(seed, 0), mix(seed, 1)
  own = functools.partial(_own_index, len(factors), transposed)
  # The probe: i.i.d., as the reference.
  v = random_normal(probe_seed, h.shape, h.dtype, transposed)
  a, b = _damped(h, v, damping, grad_eps), v
  for axis, q in enumerate(factors):
    a = along(q, a, axis, operand_dtype)  # Q h
    b = _solve_along(q, b, axis)  # Q^-T v
  new_factors, new_lipschitz = [], []
  for k, f in enumerate(factors):
    if not fitted[k]:
      new_factors.append(f)
      new_lipschitz.append(lipschitz[k])
      continue
    dense = f.ndim == 2
    t1, t2 = _gram(a, k, dense, operand_dtype), _gram(b, k, dense, operand_dtype)
    bound = (norm_lower_bound_spd(t1 + t2, mix(norm_seed, own(k))) if dense else
             jnp.max(t1 + t2))
    lip = _lipschitz(bound, lipschitz[k], beta)
    step = lr / lip
    new_factors.append(f - step * (t1 - t2) * f if not dense else
                       f - step * _matmul(jnp.triu(t1 - t2), f, operand_dtype))
    new_lipschitz.append(lip)
  return tuple(new_factors), jnp.stack(new_lipschitz)
