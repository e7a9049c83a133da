"""Step-by-step agreement with a float64 transcription of Xi-Lin Li's psgd_torch.

The transcription below is written from the reference's `update_precond_kron_whiten_*`
rules, its Procrustes steps and its layout (one factor per dim of the squeezed tensor).
Both sides see the same numbers: the noise each refit adds is recorded on our side and
replayed in the transcription, and the spectral norms that the reference estimates with
random vectors are exact on both sides. With damping 0 the noise is float64 eps times
the gradient, so for every mode but EQ it hardly matters; EQ's probe is the noise itself.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import psgd
from psgd import fitting

LR, BETA, REFITS = 0.1, 0.9, 10
EPS = np.finfo(np.float64).eps
TINY = np.finfo(np.float32).smallest_normal  # what both add to a norm before dividing


# ------------------------------------------------------------ the transcription


def along(f: np.ndarray, x: np.ndarray, axis: int) -> np.ndarray:
  """Contract f's second index with x's dim `axis` (the reference's einsum pieces)."""
  f = np.diag(f) if f.ndim == 1 else f
  return np.moveaxis(np.tensordot(f, x, (1, axis)), 0, axis)


def gram(x: np.ndarray, axis: int, dense: bool) -> np.ndarray:
  others = tuple(i for i in range(x.ndim) if i != axis)
  g = np.tensordot(x, x, (others, others))
  return g if dense else np.diag(g)


def procrustes2(q, max_step=1 / 8):
  r = q.T - q
  r = r / (np.linalg.norm(r, 2) + TINY)
  rq, rrq = r @ q, r @ r @ q
  tr_rq, tr_rrq = np.trace(rq), np.trace(rrq)
  a = min(-tr_rq / tr_rrq, max_step) if tr_rrq < 0 else max_step
  return q + a * (rq + 0.5 * a * rrq)


def procrustes3(q, max_step=1 / 3):
  r = q.T - q
  r = r / (np.linalg.norm(r, 2) + TINY)
  rq = r @ q
  rrq = r @ rq
  rrrq = r @ rrq
  tr1, tr2, tr3 = np.trace(rq), np.trace(rrq), np.trace(rrrq)
  if tr1 > 0 and tr3 < 0:
    a = min((-tr2 - np.sqrt(tr2 * tr2 - 1.5 * tr1 * tr3)) / (0.75 * tr3), max_step)
    q = q + a * (rq + 0.5 * a * (rrq + 0.25 * a * rrrq))
  return q


def reference_fit(mode: str, grads: np.ndarray, noises: np.ndarray,
                  dense: tuple[bool, ...]) -> np.ndarray:
  """P (as a dense matrix) after one refit per gradient from P = I, damping 0."""
  shape = grads.shape[1:]
  qs = [np.eye(d) if dn else np.ones(d) for d, dn in zip(shape, dense)]
  lipschitz = np.zeros(len(shape))
  stores_p = mode in ("PRO4P", "QUAD4P")
  for g, v in zip(grads, noises):
    damped = g + EPS * np.abs(g) * v
    if mode == "EQ":
      a, b = damped, v
      for k, q in enumerate(qs):
        a = along(q, a, k)
        b = along(np.linalg.inv(q).T if q.ndim == 2 else 1 / q, b, k)
    else:
      pg = damped
      for k, q in enumerate(qs):
        pg = along(q if stores_p else (q.T @ q if q.ndim == 2 else q * q), pg, k)
    for k, q in enumerate(qs):
      dn = q.ndim == 2
      if mode == "EQ":
        t1, t2 = gram(a, k, dn), gram(b, k, dn)
        ell = np.linalg.norm(t1 + t2, 2) if dn else np.max(t1 + t2)
        lipschitz[k] = max(BETA * lipschitz[k] + (1 - BETA) * ell, ell)
        step = LR / lipschitz[k]
        qs[k] = q - step * np.triu(t1 - t2) @ q if dn else q - step * (t1 - t2) * q
        continue
      t1, t2 = gram(pg, k, dn), pg.size / shape[k]
      ell = (np.linalg.norm(t1, 2) if dn else np.max(t1)) + t2
      lipschitz[k] = max(BETA * lipschitz[k] + (1 - BETA) * ell, ell)
      step = LR / lipschitz[k]
      if not dn:
        gain = {"QUAD": (1 - step / 2 * (t1 - t2)) ** 2,
                "QUAD4P": (1 - step * (t1 - t2)) ** 2}.get(mode, 1 - step * (t1 - t2))
        qs[k] = q * gain
      elif mode == "Q0.5EQ1.5":
        qs[k] = procrustes2(q - step * (t1 @ q - t2 * q))
      elif mode == "QEQ":
        qs[k] = q - step * (q @ t1 - q * t2)
      elif mode in ("QUAD", "QUAD4P"):
        half = step / 2 if mode == "QUAD" else step
        p = q - half * (t1 @ q - t2 * q)
        p = p - half * (p @ t1 - p * t2)
        qs[k] = (p + p.T) / 2
      else:  # PRO4P
        q = q - step * (t1 @ q - t2 * q)
        for _ in range(10):
          q = procrustes3(q)
          if np.max(np.abs(q.T - q)) < 0.001 * np.max(np.abs(q)):
            break
        qs[k] = q
  p = np.ones((1, 1))
  for q in qs:
    q = np.diag(q) if q.ndim == 1 else q
    p = np.kron(p, q if stores_p else q.T @ q)
  return p


# ------------------------------------------------------------------ ours, recorded


def our_fit(mode: str, grads: np.ndarray, monkeypatch, **layout) -> tuple[np.ndarray, list]:
  """P after one refit per gradient, and the noise each refit drew (block-shaped)."""
  noises = []
  damped = fitting._damped

  def recording(h, noise, damping, grad_eps):
    jax.debug.callback(lambda n: noises.append(np.asarray(n)), noise)
    return damped(h, noise, damping, grad_eps)

  exact_norm = lambda a, seed, **kwargs: jnp.linalg.norm(a, 2)
  monkeypatch.setattr(fitting, "_damped", recording)
  monkeypatch.setattr(fitting, "norm_lower_bound_spd", exact_norm)
  monkeypatch.setattr(fitting, "norm_lower_bound_skew", exact_norm)
  with jax.enable_x64(True):
    tx = psgd.scale_by_kron(b1=0.0, preconditioner_update_probability=1.0,
                            preconditioner_init_scale=1.0, damping=0.0,
                            preconditioner_lr=LR, beta_lipschitz=BETA,
                            preconditioner_mode=mode, precond_dtype=jnp.float64,
                            precond_update_precision="highest", **layout)
    update = jax.jit(tx.update)
    state = tx.init(jnp.zeros(grads.shape[1:], jnp.float64))
    for g in grads:
      state = update(jnp.asarray(g), state)[1]
      jax.effects_barrier()
    assert int(state.num_updates) == len(grads)
    factors = fitting.preconditioner_factors(mode, tuple(f[0] for f in state.factors))
    p = np.ones((1, 1))
    for f in factors:
      f = np.asarray(f, np.float64)
      p = np.kron(p, np.diag(f) if f.ndim == 1 else f)
  return p, noises


# (shape, our layout options, the reference's factor kinds for the squeezed shape);
# max_skew_small_dim=1 is the reference's size rule (a skew of 1 for every dim).
CASES = {
    "vector": ((7,), {}, (False,)),
    "dense_x_dense": ((5, 3), dict(max_skew_triangular=float("inf")), (True, True)),
    "diag_x_dense": ((8, 3), dict(max_skew_small_dim=1.0), (False, True)),
    "rank3_dense": ((3, 4, 5), dict(merge_dims=False, max_skew_triangular=float("inf")),
                    (True, True, True)),
    "rank3_mixed": ((2, 3, 8), dict(merge_dims=False, max_skew_small_dim=1.0),
                    (True, True, False)),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("mode", psgd.MODES)
def test_preconditioner_matches_the_reference_step_by_step(mode, case, monkeypatch):
  shape, layout, dense = CASES[case]
  rng = np.random.default_rng(0)
  scales = np.linspace(0.1, 3.0, np.prod(shape)).reshape(shape)
  grads = rng.normal(size=(REFITS, *shape)) * scales
  ours, noises = our_fit(mode, grads, monkeypatch, **layout)
  assert len(noises) == REFITS
  noises = np.stack([n.reshape(shape) for n in noises])
  reference = reference_fit(mode, grads, noises, dense)
  np.testing.assert_allclose(ours, reference, rtol=1e-10, atol=1e-10 * np.abs(reference).max())
  # The fit moved P well away from I: the comparison has teeth.
  assert np.abs(reference - np.eye(len(reference))).max() > 0.1


def test_damping_noise_is_iid_standard_normal_as_the_references(monkeypatch):
  # psgd_torch draws the damping noise with randn_like: i.i.d. standard normal entries,
  # so a matrix gradient's noise has full rank (rank-one noise, u v^T, would not).
  grads = np.random.default_rng(1).normal(size=(REFITS, 32, 24))
  _, noises = our_fit("Q0.5EQ1.5", grads, monkeypatch, max_skew_triangular=float("inf"))
  noises = np.stack([n.reshape(32, 24) for n in noises])
  assert all(np.linalg.matrix_rank(n) == 24 for n in noises)
  assert abs(noises.mean()) < 5 / np.sqrt(noises.size)
  assert abs(noises.var() - 1) < 5 * np.sqrt(2 / noises.size)
  assert abs(np.corrcoef(noises[0].ravel(), noises[1].ravel())[0, 1]) < 5 / np.sqrt(768)
