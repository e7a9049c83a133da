"""Step-by-step agreement with a float64 transcription of Xi-Lin Li's psgd_torch.

The transcription below is written from the reference's update rules for diagonal
factors (its `update_precond_kron_whiten_*` functions) and its layout, where a vector
has a single diagonal factor. With damping 0 the only noise left is float64 eps times
the gradient, so both sides see the same numbers up to rounding.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import psgd

LR, BETA, REFITS = 0.1, 0.9, 10


def reference_vector_fit(mode: str, grads: np.ndarray) -> np.ndarray:
  """P of a vector after one refit per gradient, P starting at I (init scale 1)."""
  q = np.ones(grads.shape[1])  # Q's diagonal, or P's own in the '4P' modes
  lipschitz = 0.0
  for g in grads:
    pg = (q if mode == "QUAD4P" else q * q) * g
    term1, term2 = pg * pg, 1.0  # term2: numel / size of the factor's dim
    ell = np.max(term1) + term2
    lipschitz = max(BETA * lipschitz + (1 - BETA) * ell, ell)
    if mode in ("Q0.5EQ1.5", "QEQ"):
      q = q * (1 - LR / lipschitz * (term1 - term2))
    elif mode == "QUAD":
      q = q * (1 - LR / 2 / lipschitz * (term1 - term2)) ** 2
    else:  # QUAD4P
      q = q * (1 - LR / lipschitz * (term1 - term2)) ** 2
  return q if mode == "QUAD4P" else q * q


@pytest.mark.parametrize("mode", ["Q0.5EQ1.5", "QEQ", "QUAD", "QUAD4P"])
def test_vector_preconditioner_matches_the_reference(mode):
  grads = np.random.default_rng(0).normal(size=(REFITS, 7)) * np.linspace(0.1, 3.0, 7)
  with jax.enable_x64(True):
    tx = psgd.scale_by_kron(b1=0.0, preconditioner_update_probability=1.0,
                            preconditioner_init_scale=1.0, damping=0.0,
                            preconditioner_lr=LR, beta_lipschitz=BETA,
                            preconditioner_mode=mode, precond_dtype=jnp.float64)

    def body(state, g):
      return tx.update(g, state)[1], None

    state = jax.jit(lambda s, gs: jax.lax.scan(body, s, gs)[0])(
        tx.init(jnp.zeros(7, jnp.float64)), jnp.asarray(grads))
    p0, p1 = psgd.fitting.preconditioner_factors(mode, tuple(f[0] for f in state.factors))
    ours = np.asarray(p0 * p1, np.float64)  # (1,) x (7,): the 1x1 factor stays fixed
  reference = reference_vector_fit(mode, grads)
  assert int(state.num_updates) == REFITS
  np.testing.assert_allclose(ours, reference, rtol=1e-10)
  assert np.max(np.abs(reference - 1)) > 0.1  # the fit moved P: the check has teeth
