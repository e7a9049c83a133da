"""Fitting the Kronecker factors of one matrix's whitening preconditioner.

PSGD (Xi-Lin Li, arXiv:1512.04202, 1809.10232, 2402.11858) fits P = Q^T Q so that
P h h^T P ~ I for gradients h, i.e. P ~ E[h h^T]^(-1/2), by stochastic steps on a Lie
group. For an (r, c) matrix with P = P0 (x) P1 the preconditioned gradient is
P0 h P1, and factor k is moved by the gap between two terms:
  term1_k: the Gram matrix of P h along dim k (what P currently gives),
  term2_k: numel / size_k times the identity (what a whitened gradient gives).
The step is lr / L_k, with L_k an EMA-max of a bound on the local Lipschitz constant;
the spectral norms in that bound come from a cheap randomized subspace iteration.

Modes (geometry of the update; the names are the reference's):
  Q0.5EQ1.5  dQ = Q^0.5 E Q^1.5: dQ = -E Q, then one online Procrustes step rotates Q
             back towards symmetric positive definite (default).
  QEQ        dQ = Q E Q.                      QUAD  a quadratic form; Q stays SPD.
  EQ         dQ = E Q on upper-triangular Q (the original PSGD, triangular solves).
  PRO4P      store P itself: dP = -E P then a Procrustes step (online Newton-Schulz).
  QUAD4P     store P itself with the QUAD quadratic form.
Everything here works on one matrix; `kron.py` maps it over layers and parameters.
"""

from typing import Callable, Literal, get_args

import jax
import jax.numpy as jnp

Factors = tuple[jax.Array, jax.Array]  # each (d, d) dense or (d,) diagonal

Mode = Literal["Q0.5EQ1.5", "EQ", "QEQ", "QUAD", "PRO4P", "QUAD4P"]
MODES: tuple[str, ...] = get_args(Mode)
STORES_P = frozenset({"PRO4P", "QUAD4P"})
_TINY = jnp.finfo(jnp.float32).smallest_normal


# ----------------------------------------------------------------- linear algebra


def _matmul(a: jax.Array, b: jax.Array, operand_dtype=None) -> jax.Array:
  """a @ b; with operand_dtype, on operands cast to it, accumulated in float32."""
  if operand_dtype is None:
    return a @ b
  return jnp.matmul(a.astype(operand_dtype), b.astype(operand_dtype),
                    preferred_element_type=jnp.float32)


def _left(f: jax.Array, x: jax.Array, operand_dtype=None) -> jax.Array:
  """f @ x, with a diagonal f stored as a vector."""
  return f[:, None] * x if f.ndim == 1 else _matmul(f, x, operand_dtype)


def _right(x: jax.Array, f: jax.Array, operand_dtype=None) -> jax.Array:
  """x @ f, with a diagonal f stored as a vector."""
  return x * f[None, :] if f.ndim == 1 else _matmul(x, f, operand_dtype)


def _gram(x: jax.Array, dim: int, dense: bool, operand_dtype=None) -> jax.Array:
  """x contracted with itself over every dim but `dim` (its diagonal if not dense)."""
  if not dense:
    return jnp.sum(x * x, axis=1 - dim)
  return _matmul(x, x.T, operand_dtype) if dim == 0 else _matmul(x.T, x, operand_dtype)


def _subspace_norm_bound(a: jax.Array, key: jax.Array, scale: jax.Array,
                         num_vectors: int, half_iters: int) -> jax.Array:
  """max ||v a|| over a few unit rows v after subspace iteration: a lower bound of ||a||_2.

  The random start vectors are tilted towards the largest row of `a`, which keeps the
  estimate good for large matrices of very low rank.
  """
  a = a / scale
  pivot = a[jnp.argmax(jnp.sum(a * a, axis=1))]
  v = jax.random.normal(key, (num_vectors, a.shape[0]), a.dtype)
  v = pivot + jnp.sign(v @ pivot)[:, None] * v
  for _ in range(half_iters):
    v = v @ a
    v = v / (jnp.linalg.norm(v, axis=1, keepdims=True) + _TINY)
    v = v @ a
  return scale * jnp.max(jnp.linalg.norm(v, axis=1))


def norm_lower_bound_spd(a: jax.Array, key: jax.Array, num_vectors: int = 32,
                         half_iters: int = 2) -> jax.Array:
  """Cheap lower bound of the spectral norm of a symmetric positive semidefinite `a`."""
  return _subspace_norm_bound(a, key, jnp.max(jnp.diagonal(a)) + _TINY, num_vectors,
                              half_iters)


def norm_lower_bound_skew(a: jax.Array, key: jax.Array, num_vectors: int = 32,
                          half_iters: int = 2) -> jax.Array:
  """Cheap lower bound of the spectral norm of a skew-symmetric `a`."""
  return _subspace_norm_bound(a, key, jnp.max(jnp.abs(a)) + _TINY, num_vectors, half_iters)


def procrustes_step(q: jax.Array, key: jax.Array, max_step: float = 0.125,
                    operand_dtype=None) -> jax.Array:
  """One online step of min_U ||U q - I|| over rotations U = exp(a R), R = q^T - q.

  exp(aR) is expanded to second order (error ~ ||aR||^4 / 4, tiny for a||R|| <= 1/8);
  a line search on the second-order model keeps the step from overshooting.
  """
  r = q.T - q
  r = r / (norm_lower_bound_skew(r, key) + _TINY)
  rq = _matmul(r, q, operand_dtype)
  rrq = _matmul(r, rq, operand_dtype)
  tr_rq, tr_rrq = jnp.trace(rq), jnp.trace(rrq)
  a = jnp.where(tr_rrq < 0, jnp.minimum(-tr_rq / jnp.minimum(tr_rrq, -_TINY), max_step),
                max_step)
  return q + a * (rq + 0.5 * a * rrq)


# ------------------------------------------------------------------ preconditioner


def preconditioner_factors(mode: str, factors: Factors, operand_dtype=None) -> Factors:
  """The factors of P: stored as is in the *4P modes, Q^T Q otherwise."""
  if mode in STORES_P:
    return factors
  return tuple(f * f if f.ndim == 1 else _matmul(f.T, f, operand_dtype) for f in factors)


def apply_preconditioner(p_factors: Factors, x: jax.Array, operand_dtype=None) -> jax.Array:
  """P x for P = P0 (x) P1 with symmetric factors: P0 @ x @ P1.

  With operand_dtype (e.g. bfloat16) the matmuls take operands of that dtype and
  accumulate in float32, what TPUs do at default precision, on every backend.
  """
  return _right(_left(p_factors[0], x, operand_dtype), p_factors[1], operand_dtype)


def scale_factors(mode: str, factors: Factors, scale: jax.Array) -> Factors:
  """Factors whose P is `scale`^2 times that of `factors` (scale > 0)."""
  per_factor = scale if mode in STORES_P else jnp.sqrt(scale)
  return tuple(f * per_factor.astype(f.dtype) for f in factors)


def balance(factors: Factors) -> Factors:
  """Equalize the factors' max-abs (same product), against over/underflow."""
  norms = [jnp.max(jnp.abs(f)) for f in factors]
  gmean = jnp.sqrt(norms[0] * norms[1])
  return tuple(f * (gmean / (n + _TINY)) for f, n in zip(factors, norms))


def _rank_one_noise(key: jax.Array, shape: tuple[int, int], dtype) -> jax.Array:
  """u v^T with u, v standard normal.

  Its second moments along each dim equal those of i.i.d. normal noise (E[N N^T] =
  cols * I), which is all the fitting terms see, for rows + cols random numbers
  instead of rows * cols.
  """
  ku, kv = jax.random.split(key)
  return (jax.random.normal(ku, (shape[0], 1), dtype) *
          jax.random.normal(kv, (1, shape[1]), dtype))


def _lipschitz(ell: jax.Array, old: jax.Array, beta: float) -> jax.Array:
  return jnp.maximum(beta * old + (1 - beta) * ell, ell)


# ---------------------------------------------------------- per-mode factor rules
# Each rule moves one factor given term1, term2 (a scalar times I), the step lr / L,
# a key and the matmul operand dtype; `dense` factors are matrices, the others vectors.


def _rule_q0p5eq1p5(f, t1, t2, step, key, dt):
  if f.ndim == 1:
    return f * (1 - step * (t1 - t2))
  return procrustes_step(f - step * (_matmul(t1, f, dt) - t2 * f), key, operand_dtype=dt)


def _rule_qeq(f, t1, t2, step, key, dt):
  del key
  if f.ndim == 1:
    return f * (1 - step * (t1 - t2))
  return f - step * (_matmul(f, t1, dt) - t2 * f)


def _quadratic(f, t1, t2, half_step, dt):
  if f.ndim == 1:
    return f * (1 - half_step * (t1 - t2)) ** 2
  p = f - half_step * (_matmul(t1, f, dt) - t2 * f)
  p = p - half_step * (_matmul(p, t1, dt) - t2 * p)
  return (p + p.T) / 2


def _rule_quad(f, t1, t2, step, key, dt):
  del key
  return _quadratic(f, t1, t2, step / 2, dt)


def _rule_quad4p(f, t1, t2, step, key, dt):
  del key
  return _quadratic(f, t1, t2, step, dt)


def _rule_pro4p(f, t1, t2, step, key, dt):
  if f.ndim == 1:
    return f * (1 - step * (t1 - t2)) ** 2
  return procrustes_step(f - 2 * step * (_matmul(t1, f, dt) - t2 * f), key,
                         operand_dtype=dt)


_RULES: dict[str, Callable] = {
    "Q0.5EQ1.5": _rule_q0p5eq1p5,
    "QEQ": _rule_qeq,
    "QUAD": _rule_quad,
    "QUAD4P": _rule_quad4p,
    "PRO4P": _rule_pro4p,
}


def fit(mode: str, factors: Factors, lipschitz: jax.Array, h: jax.Array, key: jax.Array, *,
        lr: float, beta: float, damping: float, grad_eps: float,
        p_factors: Factors | None = None, operand_dtype=None,
        fitted: tuple[bool, bool] = (True, True)) -> tuple[Factors, jax.Array]:
  """One fitting step of the factors (and their Lipschitz memory, shape (2,)) on h.

  Factor k moves only if fitted[k] (`Layout.fitted`: a size-1 dim's factor stays).

  h (the gradient or momentum, float32) is damped with noise of size
  damping + grad_eps * |h|, which bounds P above by about I / damping and keeps the
  fit well posed when h is zero or low rank. `p_factors`, if given, are the factors'
  `preconditioner_factors` (cached by the caller), saving their recomputation. With
  `operand_dtype` (e.g. bfloat16) the matmuls take operands of that dtype (float32
  accumulation); the spectral-norm bounds and EQ's triangular solves stay float32.
  """
  if mode == "EQ":
    return _fit_eq(factors, lipschitz, h, key, lr=lr, beta=beta, damping=damping,
                   grad_eps=grad_eps, operand_dtype=operand_dtype, fitted=fitted)
  k_noise, k_norm, k_rule = jax.random.split(key, 3)
  h = h + (damping + grad_eps * jnp.abs(h)) * _rank_one_noise(k_noise, h.shape, h.dtype)
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
    bound = norm_lower_bound_spd(t1, jax.random.fold_in(k_norm, k)) if dense else jnp.max(t1)
    lip = _lipschitz(bound + t2, lipschitz[k], beta)
    new_factors.append(_RULES[mode](f, t1, t2, lr / lip, jax.random.fold_in(k_rule, k),
                                    operand_dtype))
    new_lipschitz.append(lip)
  return tuple(new_factors), jnp.stack(new_lipschitz)


def _fit_eq(factors, lipschitz, h, key, *, lr, beta, damping, grad_eps, operand_dtype,
            fitted):
  """dQ = E Q with triangular Q: fits Q h h^T Q^T against Q^-T v v^T Q^-1 for probe v."""
  k_probe, k_norm = jax.random.split(key)
  v = jax.random.normal(k_probe, h.shape, h.dtype)
  h = h + (damping + grad_eps * jnp.abs(h)) * v
  q0, q1 = factors
  a = _right(_left(q0, h, operand_dtype), q1.T if q1.ndim == 2 else q1,
             operand_dtype)  # Q0 h Q1^T
  b = (v / q0[:, None] if q0.ndim == 1 else
       jax.scipy.linalg.solve_triangular(q0, v, trans=1, lower=False))  # Q0^-T v
  b = (b / q1[None, :] if q1.ndim == 1 else
       jax.scipy.linalg.solve_triangular(q1, b.T, trans=1, lower=False).T)  # ... Q1^-1
  new_factors, new_lipschitz = [], []
  for k, f in enumerate(factors):
    if not fitted[k]:
      new_factors.append(f)
      new_lipschitz.append(lipschitz[k])
      continue
    dense = f.ndim == 2
    t1, t2 = _gram(a, k, dense, operand_dtype), _gram(b, k, dense, operand_dtype)
    bound = (norm_lower_bound_spd(t1 + t2, jax.random.fold_in(k_norm, k)) if dense else
             jnp.max(t1 + t2))
    lip = _lipschitz(bound, lipschitz[k], beta)
    step = lr / lip
    new_factors.append(f - step * (t1 - t2) * f if not dense else
                       f - step * _matmul(jnp.triu(t1 - t2), f, operand_dtype))
    new_lipschitz.append(lip)
  return tuple(new_factors), jnp.stack(new_lipschitz)
