"""psgd.kron under optax and NNX wrappers, as a user of optax would combine them.

Each check jits a step, runs it a few times feeding the state back, and asserts one
trace (a state whose structure changes after the first update retraces), finite
updates that move the params, and a state structure equal to the one `init` returned.

x64 is a global switch, so the float64 variant reruns this file in a subprocess with
PSGD_TEST_X64=1, where the params are float64.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

import psgd

X64 = os.environ.get("PSGD_TEST_X64") == "1"
if X64:
  jax.config.update("jax_enable_x64", True)
FLOAT = jnp.float64 if X64 else jnp.float32


def kron(**kwargs):
  return psgd.kron(1e-2, preconditioner_update_probability=1.0, **kwargs)


def matrices_only(params):
  """Mask: True for params with 2 or more dims (works on nnx.Param-wrapped leaves)."""
  return jax.tree.map(lambda p: p.ndim >= 2 and jnp.issubdtype(p.dtype, jnp.floating),
                      params)


# name -> (transformation, whether its update takes the loss as `value`)
WRAPPERS = {
    "kron": lambda: (kron(), False),
    "chain": lambda: (optax.chain(optax.clip_by_global_norm(1.0), kron()), False),
    "multi_steps": lambda: (optax.MultiSteps(kron(), every_k_schedule=2), False),
    "apply_if_finite": lambda: (optax.apply_if_finite(kron(), max_consecutive_errors=3),
                                False),
    "inject_hyperparams": lambda: (optax.inject_hyperparams(
        psgd.kron, static_args=psgd.STATIC_ARGS)(
            learning_rate=1e-2, preconditioner_update_probability=1.0), False),
    "masked": lambda: (optax.masked(kron(), matrices_only), False),
    "reduce_on_plateau": lambda: (optax.chain(kron(), optax.contrib.reduce_on_plateau()),
                                  True),
}


# ------------------------------------------------------------- plain pytrees


def plain_params(dtype):
  """Params with the awkward parts of real pytrees: a None leaf, an empty subtree, a
  zero-size array, a nested list (and an int leaf where a mask leaves it out)."""
  return {"w": jnp.linspace(-1.0, 1.0, 12, dtype=dtype).reshape(4, 3),
          "nested": [jnp.ones((3,), dtype)], "none": None, "empty": {},
          "no_rows": jnp.ones((0, 3), dtype)}


# bfloat16 state dtypes matter most where a wrapper compares or swaps whole states
# (apply_if_finite's cond) or casts hyperparameters to the params' dtype (inject); the
# other wrappers' bfloat16 runs are marked slow.
BF16_FAST = ("kron", "apply_if_finite", "inject_hyperparams")
PLAIN_CASES = [pytest.param(name, FLOAT, id=f"{name}-{jnp.dtype(FLOAT).name}")
               for name in WRAPPERS]
if not X64:
  PLAIN_CASES += [pytest.param(name, jnp.bfloat16, id=f"{name}-bfloat16",
                               marks=() if name in BF16_FAST else pytest.mark.slow)
                  for name in WRAPPERS]


def grads_of(params):
  return jax.tree.map(lambda x: jnp.sin(3 * x) + 0.5, params)


def check_one_trace(tx, params, needs_value, steps=3):
  """Jit one update, run it `steps` times; one trace, finite updates, stable state."""
  traces = []

  @jax.jit
  def step(params, state):
    traces.append(None)  # runs only while tracing
    extra = {"value": jnp.sum(params["w"] ** 2)} if needs_value else {}
    updates, state = tx.update(grads_of(params), state, params, **extra)
    return optax.apply_updates(params, updates), updates, state

  start = params
  state = tx.init(params)
  init_structure = jax.tree.structure(state)
  for _ in range(steps):
    params, updates, state = step(params, state)
    for u in jax.tree.leaves(updates):
      assert bool(jnp.all(jnp.isfinite(u.astype(jnp.float32))))
  assert len(traces) == 1
  assert jax.tree.structure(state) == init_structure
  assert not bool(jnp.all(params["w"] == start["w"]))
  return params


@pytest.mark.parametrize("name, dtype", PLAIN_CASES)
def test_wrapper_on_plain_pytree(name, dtype):
  tx, needs_value = WRAPPERS[name]()
  params = plain_params(dtype)
  if name == "masked":
    params["count"] = jnp.arange(3)  # an int leaf the mask leaves out
  trained = check_one_trace(tx, params, needs_value)
  for before, after in zip(jax.tree.leaves(params), jax.tree.leaves(trained)):
    assert after.dtype == before.dtype


def test_zero_size_leaves_get_empty_updates_and_change_nothing_else():
  """optax.adamw takes them; so does Kron, which has nothing in them to fit."""
  params = {"w": plain_params(FLOAT)["w"], "v": jnp.ones((3,), FLOAT)}
  with_empty = {**params, "e": jnp.ones((0, 3), FLOAT), "z": jnp.ones((0,), FLOAT)}
  runs = []
  for tree in (params, with_empty):
    tx = kron()
    state = tx.init(tree)
    for _ in range(3):
      updates, state = tx.update(grads_of(tree), state, tree)
    runs.append(updates)
  assert runs[1]["e"].shape == (0, 3) and runs[1]["z"].shape == (0,)
  for name in params:
    assert bool(jnp.all(runs[0][name] == runs[1][name]))
  # The layout table leaves them out, and the state's specs have the state's structure.
  assert "['e']" not in psgd.layout_table(with_empty) and "['w']" in psgd.layout_table(params)
  mesh = jax.make_mesh((1,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
  specs = psgd.state_partition_specs(state, with_empty, jax.tree.map(
      lambda _: jax.sharding.PartitionSpec(), with_empty), mesh)
  is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
  assert jax.tree.structure(specs, is_leaf=is_spec) == jax.tree.structure(state)


def test_an_update_called_outside_jit_compiles_once(caplog):
  """A first script often calls tx.update as the README's snippet does, unjitted: the
  second call compiles nothing (op by op, it recompiled its refit conditional on every
  call)."""
  params = plain_params(FLOAT)
  tx = kron()
  updates, state = tx.update(grads_of(params), tx.init(params), params)
  with jax.log_compiles(True), caplog.at_level("WARNING"):
    updates, state = tx.update(grads_of(params), state, params)
    jax.block_until_ready(updates)
  assert not [r for r in caplog.records if "Compiling" in r.getMessage()]


def test_unmasked_int_leaf_is_refused_with_its_path():
  with pytest.raises(ValueError, match=r"\['count'\].*optax.masked"):
    kron().init({"w": jnp.ones((2, 2)), "count": jnp.arange(3)})


# ----------------------------------------------------------------- nnx.Optimizer


class Tiny(nnx.Module):

  def __init__(self, dtype, rngs):
    self.linear = nnx.Linear(4, 3, param_dtype=dtype, rngs=rngs)
    self.norm = nnx.LayerNorm(3, param_dtype=dtype, rngs=rngs)
    self.steps = nnx.Variable(jnp.zeros((), jnp.int32))  # not a Param: not optimized

  def __call__(self, x):
    return self.norm(self.linear(x))


@pytest.mark.parametrize("name", WRAPPERS)
def test_wrapper_in_nnx_optimizer(name, dtype=FLOAT):
  tx, needs_value = WRAPPERS[name]()
  model = Tiny(dtype, nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  x = jnp.linspace(-1.0, 1.0, 8, dtype=dtype).reshape(2, 4)
  traces = []

  @nnx.jit
  def step(model, optimizer, x):
    traces.append(None)  # runs only while tracing
    target = jnp.linspace(-1.0, 1.0, 3, dtype=dtype)  # a real gradient for the kernel
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - target) ** 2))(model)
    return optimizer.update(model, grads, **({"value": loss} if needs_value else {}))

  kernel = model.linear.kernel[...]
  init_structure = jax.tree.structure(nnx.as_pure(optimizer.opt_state))
  for _ in range(3):
    updates = step(model, optimizer, x)
    for u in jax.tree.leaves(updates):
      assert bool(jnp.all(jnp.isfinite(u.astype(jnp.float32))))
  assert len(traces) == 1
  assert jax.tree.structure(nnx.as_pure(optimizer.opt_state)) == init_structure
  assert not bool(jnp.all(model.linear.kernel[...] == kernel))


def test_bfloat16_params_in_nnx_optimizer():
  test_wrapper_in_nnx_optimizer("kron", dtype=jnp.bfloat16)


# ------------------------------------------------------------------- float64


@pytest.mark.slow
@pytest.mark.skipif(X64, reason="this is the float64 run")
def test_float64_in_a_subprocess():
  env = dict(os.environ, PSGD_TEST_X64="1")
  result = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__],
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
      env=env, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
