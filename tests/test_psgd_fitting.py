"""The preconditioner math: fits, invariants and numerics against float64 references."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import psgd
from psgd import fitting


def random_spd(seed: int, n: int, cond: float) -> np.ndarray:
  q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(n, n)))
  return (q * np.logspace(0, -np.log10(cond), n)) @ q.T


def matrix_power(c: np.ndarray, power: float) -> np.ndarray:
  w, v = np.linalg.eigh(c)
  return (v * w**power) @ v.T


def as_matrix(f: jax.Array) -> np.ndarray:
  f = np.asarray(f, np.float64)
  return np.diag(f) if f.ndim == 1 else f


def fit_on_gaussian_gradients(mode: str, cov_rows: np.ndarray, cov_cols: np.ndarray,
                              steps: int, preconditioner_lr: float = 0.05,
                              grad_dtype=jnp.float32, **kwargs):
  """Run scale_by_kron on gradients G = A^1/2 Z B^1/2, so Cov(vec G) = A (x) B."""
  m, n = len(cov_rows), len(cov_cols)
  tx = psgd.scale_by_kron(b1=0.0, preconditioner_update_probability=1.0,
                          preconditioner_mode=mode, preconditioner_lr=preconditioner_lr,
                          **kwargs)
  left = jnp.asarray(matrix_power(cov_rows, 0.5), jnp.float32)
  right = jnp.asarray(matrix_power(cov_cols, 0.5), jnp.float32)

  def body(state, key):
    grad = left @ jax.random.normal(key, (m, n), jnp.float32) @ right
    _, state = tx.update(grad.astype(grad_dtype), state)
    return state, None

  run = jax.jit(lambda s: jax.lax.scan(body, s, jax.random.split(jax.random.key(0), steps))[0])
  return run(tx.init(jnp.zeros((m, n), grad_dtype)))


@pytest.mark.parametrize("mode", psgd.MODES)
@pytest.mark.parametrize("dense, precision", [(True, "tensorfloat32"), (True, "bfloat16"),
                                              (False, "tensorfloat32")],
                         ids=["dense", "dense_bf16_matmuls", "diag"])
def test_whitening_fit_recovers_inverse_sqrt_covariance(mode, dense, precision):
  # P = P0 (x) P1 should approach C^(-1/2) = A^(-1/2) (x) B^(-1/2): within 15%
  # (relative Frobenius error); the floor is the noise of a stochastic fit at lr 0.05.
  # bfloat16 matmul operands (float32 accumulation) must not raise that floor.
  if dense:
    cov_rows, cov_cols = random_spd(0, 6, 10.0), random_spd(1, 5, 10.0)
    settings = dict(max_skew_triangular=float("inf"))
  else:
    cov_rows, cov_cols = np.diag(np.logspace(0, -1, 6)), np.diag(np.logspace(0, -1, 5))
    settings = dict(memory_save_mode="all_diag")
  state = fit_on_gaussian_gradients(mode, cov_rows, cov_cols, steps=3000,
                                    precond_update_precision=precision, **settings)
  factors = tuple(f[0] for f in state.factors)
  assert [f.ndim == 2 for f in factors] == [dense, dense]
  p0, p1 = (as_matrix(f) for f in fitting.preconditioner_factors(mode, factors))
  target = np.kron(matrix_power(cov_rows, -0.5), matrix_power(cov_cols, -0.5))
  error = np.linalg.norm(np.kron(p0, p1) - target) / np.linalg.norm(target)
  assert error < 0.15, f"{mode}: relative error {error:.3f}"


def whitening_error(mode, state, cov_rows, cov_cols) -> float:
  """Relative Frobenius distance of the fitted P from C^(-1/2) = A^(-1/2) (x) B^(-1/2)."""
  p0, p1 = (as_matrix(f) for f in fitting.preconditioner_factors(
      mode, tuple(f[0] for f in state.factors)))
  target = np.kron(matrix_power(cov_rows, -0.5), matrix_power(cov_cols, -0.5))
  return np.linalg.norm(np.kron(p0, p1) - target) / np.linalg.norm(target)


def test_default_preconditioner_lr_fits_faster_at_a_higher_noise_floor():
  # The default step (0.7) against the reference's (0.1), from the same start and the
  # same gradients (covariance scaled 100x away from the initial guess): far closer
  # after 10 and 30 refits; with more refits the larger steps leave P noisier, but
  # still within a bounded distance of the target.
  cov_rows, cov_cols = random_spd(0, 8, 100.0) * 1e-2, random_spd(1, 6, 100.0)
  default = inspect.signature(psgd.scale_by_kron).parameters["preconditioner_lr"].default
  error = {(lr, steps): whitening_error("Q0.5EQ1.5", fit_on_gaussian_gradients(
      "Q0.5EQ1.5", cov_rows, cov_cols, steps, preconditioner_lr=lr,
      max_skew_triangular=float("inf")), cov_rows, cov_cols)
      for lr in (default, 0.1) for steps in (10, 30, 1000)}
  assert default == 0.7
  for steps in (10, 30):
    assert error[(default, steps)] < 0.75 * error[(0.1, steps)], error
  assert error[(0.1, 1000)] < 0.2 and error[(default, 1000)] < 0.7, error


def test_annealed_preconditioner_lr_fits_fast_early_and_precisely_late():
  # psgd.precond_lr_schedule (0.7 -> 0.1) against the constant steps at its two ends, on
  # the problem above: closer than either after 30 refits (0.7's speed), and after 1000
  # as close as 0.1 gets (0.7 stays at its higher noise floor).
  cov_rows, cov_cols = random_spd(0, 8, 100.0) * 1e-2, random_spd(1, 6, 100.0)
  lrs = {"annealed": psgd.precond_lr_schedule(0.7, 0.1, decay_refits=50), "0.7": 0.7,
         "0.1": 0.1}
  error = {(name, steps): whitening_error("Q0.5EQ1.5", fit_on_gaussian_gradients(
      "Q0.5EQ1.5", cov_rows, cov_cols, steps, preconditioner_lr=lr,
      max_skew_triangular=float("inf")), cov_rows, cov_cols)
      for name, lr in lrs.items() for steps in (30, 1000)}
  assert error[("annealed", 30)] < 0.9 * min(error[("0.7", 30)], error[("0.1", 30)]), error
  assert error[("annealed", 1000)] < 1.2 * error[("0.1", 1000)], error
  assert error[("annealed", 1000)] < 0.5 * error[("0.7", 1000)], error


def test_precond_lr_schedule_goes_from_start_to_end():
  schedule = psgd.precond_lr_schedule(0.7, 0.1, decay_refits=50)
  values = np.asarray([schedule(n) for n in (0, 50, 100, 1000)])
  np.testing.assert_allclose(values, [0.7, 0.1 + 0.6 / np.e, 0.1 + 0.6 / np.e**2, 0.1],
                             rtol=1e-6)
  with pytest.raises(ValueError, match="decay_refits=0"):
    psgd.precond_lr_schedule(decay_refits=0)


@pytest.mark.parametrize("mode", ["EQ", "Q0.5EQ1.5", "QEQ", "QUAD"])
def test_modes_keep_their_group(mode):
  # EQ keeps Q upper triangular exactly; Q0.5EQ1.5 and QUAD keep Q symmetric positive
  # definite. QEQ moves Q as Q (I - aE), in the general linear group (as in the
  # reference): Q is not symmetric, but stays in the component with det > 0.
  state = fit_on_gaussian_gradients(mode, random_spd(2, 8, 100.0), random_spd(3, 7, 100.0),
                                    steps=600, max_skew_triangular=float("inf"))
  for q in (np.asarray(f[0], np.float64) for f in state.factors):
    if mode == "EQ":
      assert np.all(np.tril(q, -1) == 0)
      assert np.all(np.diag(q) > 0)
    elif mode == "QEQ":
      sign, _ = np.linalg.slogdet(q)
      assert sign > 0
      assert np.linalg.cond(q) < 1e4
    else:
      asym = np.linalg.norm(q - q.T) / np.linalg.norm(q)
      assert asym < 1e-3, f"{mode}: asymmetry {asym:.2e}"
      assert np.linalg.eigvalsh((q + q.T) / 2).min() > 0


def test_norm_lower_bound_spd_is_a_tight_lower_bound():
  for seed in range(5):
    a = random_spd(seed, 64, 1e3) * 10.0**seed
    exact = np.linalg.norm(a, 2)
    bound = float(fitting.norm_lower_bound_spd(jnp.asarray(a, jnp.float32), jnp.uint32(seed)))
    assert 0.9 * exact <= bound <= exact * (1 + 1e-5)
  # Large, with one direction above many: random starts hold little of it, and two
  # subspace iterations leave the bound near 0.6 of the norm; starts tilted towards the
  # largest row, as the reference's, get it to about 0.8.
  spike = jnp.diag(jnp.ones(2048).at[7].set(3.0))
  bound = float(fitting.norm_lower_bound_spd(spike, jnp.uint32(0)))
  assert 0.75 * 3.0 <= bound <= 3.0 * (1 + 1e-5)


def test_norm_lower_bound_skew_is_a_lower_bound_and_zero_safe():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(32, 32))
  a = x - x.T
  exact = np.linalg.norm(a, 2)
  bound = float(fitting.norm_lower_bound_skew(jnp.asarray(a, jnp.float32), jnp.uint32(0)))
  assert 0.5 * exact <= bound <= exact * (1 + 1e-5)
  zero = fitting.norm_lower_bound_skew(jnp.zeros((4, 4)), jnp.uint32(0))
  assert float(zero) == 0.0


def test_procrustes_steps_rotate_towards_spd_and_keep_singular_values():
  rng = np.random.default_rng(1)
  spd = random_spd(4, 10, 10.0)
  rotation = np.linalg.qr(np.eye(10) + 0.3 * rng.normal(size=(10, 10)))[0]
  if np.linalg.det(rotation) < 0:  # Procrustes rotations cannot undo a reflection
    rotation[:, 0] *= -1
  q = jnp.asarray(rotation @ spd, jnp.float32)
  start = np.linalg.norm(np.asarray(q) - np.asarray(q).T)
  for i in range(60):
    q = fitting.procrustes_step(q, jnp.uint32(i))
  q = np.asarray(q, np.float64)
  assert np.linalg.norm(q - q.T) < 1e-3 * start
  np.testing.assert_allclose(np.linalg.svd(q, compute_uv=False),
                             np.linalg.svd(spd, compute_uv=False), rtol=1e-3)
  np.testing.assert_allclose(q, spd, atol=1e-3)


def test_per_dim_factors_fit_a_three_factor_kronecker_covariance():
  # A (4, 6, 8) gradient whose covariance is A (x) B (x) C. With a factor per dim
  # (merge_dims=False, psgd_torch's layout) every factor is dense and P fits C^(-1/2) to
  # the noise floor of lr 0.1; merged into a (24, 8) matrix, both factors are dense by
  # default (24 is a small dim, skewed 3:1) and fit A (x) B as one; under a skew of 1
  # (max_skew_small_dim=1, psgd_torch's and psgdax's rule) the 24 side is diagonal (24^2 > 192
  # elements) and P cannot represent the target.
  covs = [random_spd(seed, d, 10.0) for seed, d in zip((3, 4, 5), (4, 6, 8))]
  roots = [jnp.asarray(matrix_power(c, 0.5), jnp.float32) for c in covs]
  target = np.kron(np.kron(*[matrix_power(c, -0.5) for c in covs[:2]]),
                   matrix_power(covs[2], -0.5))

  def gradient(key):
    g = jax.random.normal(key, (4, 6, 8))
    for axis, root in enumerate(roots):
      g = fitting.along(root, g, axis)
    return g

  def error(merge_dims, **layout):
    tx = psgd.scale_by_kron(b1=0.0, preconditioner_update_probability=1.0,
                            preconditioner_lr=0.1, merge_dims=merge_dims, **layout)
    body = lambda state, key: (tx.update(gradient(key), state)[1], None)
    keys = jax.random.split(jax.random.key(1), 1000)
    state = jax.jit(lambda s: jax.lax.scan(body, s, keys)[0])(tx.init(jnp.zeros((4, 6, 8))))
    p = np.ones((1, 1))
    for f in fitting.preconditioner_factors("Q0.5EQ1.5", tuple(f[0] for f in state.factors)):
      p = np.kron(p, as_matrix(f))
    return np.linalg.norm(p - target) / np.linalg.norm(target)

  per_dim, merged, skewed = error(False), error(True), error(True, max_skew_small_dim=1.0)
  print(f"relative error of P: per dim {per_dim:.3f}, merged {merged:.3f}, merged with "
        f"the skew rule alone {skewed:.3f}")
  assert per_dim < 0.12
  assert merged < 0.2
  assert skewed > 0.3


def test_hashed_normal_draws_are_standard_normal_and_independent_across_seeds():
  # The fit's draws are hashes of a seed and the index (no jax.random call): their
  # moments are those of N(0, 1), and draws of neighbouring seeds, of mixed seeds and
  # of neighbouring indices are uncorrelated.
  n = 200_000
  x = np.asarray(fitting.random_normal(jnp.uint32(7), (n,)), np.float64)
  assert abs(x.mean()) < 5 / np.sqrt(n)
  assert abs(x.var() - 1) < 5 * np.sqrt(2 / n)
  assert abs(np.mean(x**4) - 3) < 5 * np.sqrt(96 / n)
  assert abs(np.mean(x[1:] * x[:-1])) < 5 / np.sqrt(n)
  assert np.abs(x).max() < 6.5  # the 24-bit uniforms stop short of +-1
  seeds = [jnp.uint32(8), fitting.mix(jnp.uint32(7), 0), fitting.mix(jnp.uint32(7), 1)]
  for seed in seeds:
    y = np.asarray(fitting.random_normal(seed, (n,)), np.float64)
    assert abs(np.corrcoef(x, y)[0, 1]) < 5 / np.sqrt(n)
    # Not the same values in another order (which one hash round would give): two
    # independent sets of 2^24-level draws share about n^2 / 2^24 values.
    assert len(np.intersect1d(x, y)) < 2 * n * n / 2**24


@pytest.mark.parametrize("mode", fitting.MODES)
def test_fitting_a_transposed_matrix_is_the_matrix_fit_transposed(mode):
  # What lets kron batch a layer's (r, c) projection with its (c, r) transpose: with
  # transposed=True the fit of h^T with the factors swapped draws what the fit of h
  # draws, so it gives the same factors, swapped (to float32 rounding). The damping
  # is large so that the noise matters.
  rng = np.random.default_rng(0)
  h = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
  factors = (jnp.eye(6) + 0.1 * jnp.asarray(rng.normal(size=(6, 6)), jnp.float32),
             jnp.linspace(0.5, 1.5, 4))
  if mode == "EQ":
    factors = (jnp.triu(factors[0]), factors[1])
  lip = jnp.array([0.3, 0.7])
  kw = dict(lr=0.5, beta=0.9, damping=0.3, grad_eps=0.0)
  seed = jnp.uint32(5)
  (q0, q1), l = fitting.fit(mode, factors, lip, h, seed, **kw)
  (t1, t0), tl = fitting.fit(mode, factors[::-1], lip[::-1], h.T, seed, transposed=True, **kw)
  # Traced per block, as kron passes it under vmap.
  traced = jax.jit(lambda t: fitting.fit(mode, factors[::-1], lip[::-1], h.T, seed,
                                         transposed=t, **kw))(jnp.array(True))
  for ours in ((t0, t1, tl[::-1]), (traced[0][1], traced[0][0], traced[1][::-1])):
    for a, b in zip(ours, (q0, q1, l)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  untransposed, _ = fitting.fit(mode, factors[::-1], lip[::-1], h.T, seed, **kw)
  assert np.abs(untransposed[1] - q0).max() > 1e-3  # the draws do matter here


def test_random_signs_are_balanced_and_unrelated_across_seeds():
  # The norm bounds' start vectors: +-1 only, half each, independent across seeds.
  n = 100_000
  x = np.asarray(fitting.random_signs(jnp.uint32(3), (n,)))
  y = np.asarray(fitting.random_signs(fitting.mix(jnp.uint32(3), 1), (n,)))
  assert set(np.unique(x)) == {-1.0, 1.0}
  assert abs(x.mean()) < 5 / np.sqrt(n) and abs(np.mean(x * y)) < 5 / np.sqrt(n)


def _unhash32(x: int) -> int:
  """Inverse of fitting._hash32 (each of its steps is a bijection of uint32)."""
  m = 2**32
  x ^= x >> 16
  x = x * pow(0xC2B2AE35, -1, m) % m
  x ^= (x >> 13) ^ (x >> 26)
  x = x * pow(0x85EBCA6B, -1, m) % m
  return x ^ (x >> 16)


def test_random_bits_of_seeds_whose_hashes_differ_in_low_bits_are_unrelated():
  # Seeds built so that their hashes differ in the lowest bit only: with one round of
  # hashing (index ^ hash(seed)) their draws would be one permutation of each other.
  first = 12345
  hashed = int(fitting._hash32(jnp.uint32(first)))
  second = _unhash32(hashed ^ 1)
  assert int(fitting._hash32(jnp.uint32(second))) == hashed ^ 1
  n = 4096
  a, b = (np.asarray(fitting.random_bits(jnp.uint32(s), (n,))) for s in (first, second))
  assert len(np.intersect1d(a, b)) < 10  # of 2^32 values, n^2 / 2^32 ~ 0 in common


def test_stochastic_rounding_is_unbiased_and_lands_on_a_neighbour():
  # 1 + 2^-10 lies between the bfloat16 neighbours 1 and 1 + 2^-7, an eighth of the way
  # up: rounded many times it lands on one of them, on average at the value itself.
  # Values bfloat16 holds exactly (including 0, negatives and inf) stay as they are.
  x = jnp.full((40000,), 1 + 2.0**-10, jnp.float32)
  y = np.asarray(fitting.round_stochastically(x, jnp.uint32(0)), np.float64)
  assert set(np.unique(y)) == {1.0, 1 + 2.0**-7}
  assert abs(y.mean() - (1 + 2.0**-10)) < 5 * 2.0**-7 * np.sqrt(7 / 64 / x.size)
  assert abs(-np.asarray(fitting.round_stochastically(-x, jnp.uint32(1)),
                         np.float64).mean() - y.mean()) < 5e-4
  exact = jnp.asarray([0.0, -3.5, 1 + 2.0**-7, 2.0**-100, jnp.inf], jnp.float32)
  np.testing.assert_array_equal(
      np.asarray(fitting.round_stochastically(exact, jnp.uint32(2)), np.float32),
      np.asarray(exact))


def test_bf16_factors_keep_fitting_when_each_refit_moves_less_than_their_resolution():
  # At preconditioner_lr=0.01 each refit changes a factor by less than half of
  # bfloat16's resolution. Rounded to nearest, bf16 factors would never move from
  # their start (relative error 0.17 after 1000 refits here, vs 0.06 in float32);
  # rounded stochastically they follow the float32 fit.
  cov_rows, cov_cols = np.diag(np.logspace(0, -0.3, 6)), np.diag(np.logspace(0, -0.3, 5))
  error = {dtype: whitening_error("Q0.5EQ1.5", fit_on_gaussian_gradients(
      "Q0.5EQ1.5", cov_rows, cov_cols, 1000, preconditioner_lr=0.01,
      memory_save_mode="all_diag", preconditioner_init_scale=1.0, precond_dtype=dtype),
      cov_rows, cov_cols) for dtype in (jnp.float32, jnp.bfloat16)}
  start = whitening_error("Q0.5EQ1.5", fit_on_gaussian_gradients(
      "Q0.5EQ1.5", cov_rows, cov_cols, 0, preconditioner_init_scale=1.0), cov_rows, cov_cols)
  assert start > 0.3, start
  assert error[jnp.bfloat16] < 1.5 * error[jnp.float32] + 0.01, error
  with jax.enable_x64(True):  # float64 gradients fit in float64, stored the same way
    fitted = fit_on_gaussian_gradients(
        "Q0.5EQ1.5", cov_rows, cov_cols, 1000, preconditioner_lr=0.01,
        memory_save_mode="all_diag", preconditioner_init_scale=1.0,
        precond_dtype=jnp.bfloat16, grad_dtype=jnp.float64)
    assert fitted.factors[0].dtype == jnp.bfloat16
    error64 = whitening_error("Q0.5EQ1.5", fitted, cov_rows, cov_cols)
  assert error64 < 1.5 * error[jnp.float32] + 0.01, (error64, error)


@pytest.mark.parametrize("mode", psgd.MODES)
def test_initial_scale_is_the_largest_fourth_moment_root_over_all_parameters(mode):
  """P starts as (max E[g^4] + damping^4)^(-1/4) I, one scale for every parameter, from
  the first gradients (a sparse one, whose fourth-moment root is not its RMS); a tiny
  preconditioner_lr keeps the first refit from moving it."""
  params = {"w": jnp.zeros((6, 4)), "b": jnp.zeros(5)}
  grads = {"w": jnp.zeros((6, 4)).at[2, 1].set(2.0), "b": jnp.full(5, 0.1)}
  damping = 0.05
  tx = psgd.scale_by_kron(preconditioner_mode=mode, preconditioner_lr=1e-9, damping=damping)
  _, state = tx.update(grads, tx.init(params))
  largest = float(jnp.mean(grads["w"] ** 4))  # E[g^4] of "w": above "b"'s 1e-4
  expected = (largest + damping**4) ** -0.25
  for name, size in (("w", 24), ("b", 5)):
    p = np.ones((1, 1))
    for f in fitting.preconditioner_factors(mode, tuple(f[name][0] for f in state.factors)):
      p = np.kron(p, as_matrix(f))
    np.testing.assert_allclose(p, expected * np.eye(size), rtol=1e-5, atol=1e-6)
