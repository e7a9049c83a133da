"""psgd.kron under optax and NNX wrappers, as a user of optax would combine them.

Each check jits a step, runs it a few times feeding the state back, and asserts one
trace (a state whose structure changes after the first update retraces), finite
updates, and a state structure equal to the one `init` returned.

x64 is a global switch, so the float64 variant reruns this file in a subprocess with
PSGD_TEST_X64=1, where the params are float64.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

import psgd

X64 = os.environ.get("PSGD_TEST_X64") == "1"
if X64:
  jax.config.update("jax_enable_x64", True)
FLOAT = jnp.float64 if X64 else jnp.float32


def small_params(dtype=FLOAT):
  return {"w": jnp.linspace(-1.0, 1.0, 12, dtype=dtype).reshape(4, 3),
          "b": jnp.ones((3,), dtype)}


def grads_of(params):
  return jax.tree.map(lambda x: jnp.sin(3 * x) + 0.5, params)


def check_one_trace(tx, params, steps=3):
  """Jit one update, run it `steps` times; one trace, finite updates, stable state."""
  traces = []

  @jax.jit
  def step(params, state):
    traces.append(None)  # runs only while tracing
    updates, state = tx.update(grads_of(params), state, params)
    return jax.tree.map(lambda p, u: p + u, params, updates), updates, state

  state = tx.init(params)
  init_structure = jax.tree.structure(state)
  for _ in range(steps):
    params, updates, state = step(params, state)
    for u in jax.tree.leaves(updates):
      assert bool(jnp.all(jnp.isfinite(u)))
  assert len(traces) == 1
  assert jax.tree.structure(state) == init_structure
  return params, state


def test_plain_pytree_one_trace_finite():
  params, _ = check_one_trace(psgd.kron(1e-2, preconditioner_update_probability=1.0),
                              small_params())
  assert all(p.dtype == FLOAT for p in jax.tree.leaves(params))


def test_float64_in_a_subprocess():
  if X64:  # already the float64 run
    return
  env = dict(os.environ, PSGD_TEST_X64="1")
  result = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__],
      env=env, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
  np.testing.assert_(" passed" in result.stdout, result.stdout[-2000:])
