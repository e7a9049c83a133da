"""psgd's public face: docstring examples, the static/injectable argument split."""

import doctest
import importlib
import importlib.metadata
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import psgd

MODULES = ("psgd", "psgd.kron", "psgd.fitting", "psgd.layout", "psgd.schedules",
           "psgd.sharding")


def test_docstring_examples_run():
  attempted = 0
  for name in MODULES:
    result = doctest.testmod(importlib.import_module(name),
                             optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, name
    attempted += result.attempted
  assert attempted >= 10  # the examples of kron and scale_by_kron ran


def test_static_args_are_every_argument_but_the_hyperparams():
  # Pinned: a new argument of kron must be classified here on purpose.
  assert psgd.STATIC_ARGS == (
      "b1", "nesterov", "weight_decay_mask", "max_size_triangular", "max_skew_triangular",
      "max_size_small_dim", "max_skew_small_dim", "min_ndim_triangular", "memory_save_mode",
      "block_size", "merge_dims", "param_sharding", "preconditioner_init_scale",
      "preconditioner_mode", "cache_preconditioner", "whiten_grad", "lr_style", "update_rms",
      "mu_dtype",
      "precond_dtype", "precond_update_precision", "precond_grads_precision",
      "scanned_layers", "lax_map_scanned_layers", "lax_map_batch_size", "seed")
  kron_args = set(inspect.signature(psgd.kron).parameters)
  assert kron_args == set(psgd.STATIC_ARGS) | set(psgd.HYPERPARAMS)
  # kron spells out every argument of scale_by_kron, so inject_hyperparams sees them.
  scale_args = set(inspect.signature(psgd.scale_by_kron).parameters)
  assert kron_args == scale_args | {"learning_rate", "weight_decay", "weight_decay_mask"}
  # Options are keyword-only: a positional slip cannot set the wrong one.
  for fn in (psgd.kron, psgd.scale_by_kron):
    kinds = [p.kind for name, p in inspect.signature(fn).parameters.items()
             if name != "learning_rate"]
    assert set(kinds) == {inspect.Parameter.KEYWORD_ONLY}


def test_every_hyperparam_can_be_injected_and_changed_without_retracing():
  values = dict(learning_rate=0.1, weight_decay=1e-3, preconditioner_update_probability=1.0,
                preconditioner_lr=0.1, beta_lipschitz=0.9, damping=1e-8, max_update_rms=1.0)
  assert set(values) == set(psgd.HYPERPARAMS)
  # A callable weight-decay mask would be taken for a schedule were it not static.
  tx = optax.inject_hyperparams(psgd.kron, static_args=psgd.STATIC_ARGS)(
      weight_decay_mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p), **values)
  params = {"w": jnp.ones((3, 2)), "b": jnp.ones(2)}
  traces = []

  @jax.jit
  def step(state):
    traces.append(None)  # runs only while tracing
    return tx.update(jax.tree.map(jnp.cos, params), state, params)

  state = tx.init(params)
  assert set(state.hyperparams) == set(psgd.HYPERPARAMS)
  first, state = step(state)
  state.hyperparams["max_update_rms"] = jnp.asarray(1e-3, jnp.float32)
  second, _ = step(state)
  assert len(traces) == 1
  rms = lambda u: float(jnp.sqrt(jnp.mean(u["w"] ** 2)))
  assert rms(second) < 0.01 * rms(first)  # the injected clip took effect


@pytest.mark.parametrize("fn", [psgd.kron, psgd.scale_by_kron])
def test_docstrings_document_every_argument(fn):
  doc = inspect.getdoc(fn)
  for section in ("Args:", "Returns:", "Examples:", "References:"):
    assert section in doc
  for name in inspect.signature(fn).parameters:
    assert f"\n  {name}: " in doc, name


def test_version_is_the_distributions():
  # pyproject reads the version from psgd.__version__: one source for both.
  assert psgd.__version__ == importlib.metadata.version("psgd-train")


def test_a_refit_schedule_passes_through_inject_hyperparams_when_static():
  # inject_hyperparams calls a schedule with the step count; made static, the schedule
  # reaches kron, which reads it at the number of refits done, as documented. Steps 0,
  # 1, 2 with refits at steps 0 and 2: the second refit steps 0.25 (refit 1), where the
  # step count would give 0.125 (step 2).
  params = {"w": jnp.ones((3, 2))}
  grads = {"w": jnp.arange(6.0).reshape(3, 2) + 1}
  schedule = lambda n: 0.5 ** (n + 1.0)
  common = dict(preconditioner_init_scale=1.0,
                preconditioner_update_probability=lambda count: jnp.where(count == 1, 0., 1.))

  def factors_after(tx):
    state = tx.init(params)
    for _ in range(3):
      _, state = jax.jit(tx.update)(grads, state, params)
    is_kron = lambda x: isinstance(x, psgd.KronState)
    kron_state, = [x for x in jax.tree.leaves(state, is_leaf=is_kron) if is_kron(x)]
    assert int(kron_state.num_updates) == 2
    return np.asarray(kron_state.factors[0]["w"])

  inject = lambda static: optax.inject_hyperparams(psgd.kron, static_args=static)(
      0.1, preconditioner_lr=schedule, **common)
  plain = factors_after(psgd.kron(0.1, preconditioner_lr=schedule, **common))
  np.testing.assert_allclose(
      factors_after(inject(psgd.STATIC_ARGS + ("preconditioner_lr",))), plain, rtol=1e-6)
  assert not np.allclose(factors_after(inject(psgd.STATIC_ARGS)), plain, rtol=1e-3)


def test_inject_hyperparams_without_static_args_says_how_to_call_it():
  params = {"w": jnp.zeros((4, 3))}
  with pytest.raises(TypeError, match=r"static_args=psgd\.STATIC_ARGS"):
    optax.inject_hyperparams(psgd.kron)(learning_rate=0.1).init(params)


def test_weight_decay_off_keeps_the_state_structure_and_needs_no_params():
  """A state saved with weight decay on restores into one with it off, and back."""
  params = {"w": jnp.ones((4, 3)), "b": jnp.ones(3)}
  on, off = psgd.kron(0.1, weight_decay=0.1), psgd.kron(0.1, weight_decay=0.0)
  assert (jax.tree.structure(on.init(params)) == jax.tree.structure(off.init(params)))
  grads = jax.tree.map(jnp.ones_like, params)
  decayed, _ = on.update(grads, on.init(params), params)
  plain, _ = off.update(grads, off.init(params))  # no params: nothing to decay
  assert not np.allclose(decayed["w"], plain["w"])



@pytest.mark.parametrize("as_callable", [False, True])
def test_weight_decay_applies_where_the_mask_says_and_only_there(as_callable):
  """Zero gradients leave only the decay: -lr * wd * param where the mask is True."""
  params = {"w": jnp.full((3, 2), 2.0), "b": jnp.full(2, 3.0)}
  mask = {"w": True, "b": False}
  tx = psgd.kron(0.1, weight_decay=0.5, weight_decay_mask=(lambda p: mask) if as_callable
                 else mask)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  np.testing.assert_allclose(updates["w"], -0.1 * 0.5 * params["w"], rtol=1e-6)
  np.testing.assert_array_equal(updates["b"], jnp.zeros(2))


def test_whitening_the_momentum_scales_the_update_and_fits_other_factors():
  """whiten_grad=False: P m gets sqrt((1 - b1) / (1 + b1)) (P = I here, the first step's
  momentum is the gradient); and P is fitted on the momentum, not the gradient."""
  params = {"w": jnp.zeros((4, 3))}
  grads = {"w": 0.1 * jnp.arange(12.0).reshape(4, 3) / 12}
  fixed = dict(preconditioner_update_probability=0.0, preconditioner_init_scale=1.0)
  on_grads = psgd.scale_by_kron(**fixed)
  on_momentum = psgd.scale_by_kron(whiten_grad=False, **fixed)
  a, _ = on_grads.update(grads, on_grads.init(params))
  b, _ = on_momentum.update(grads, on_momentum.init(params))
  np.testing.assert_allclose(a["w"], grads["w"], rtol=1e-6)
  np.testing.assert_allclose(b["w"], (0.1 / 1.9) ** 0.5 * grads["w"], rtol=1e-6)

  key_grads = lambda k: {"w": jax.random.normal(k, (4, 3))}
  states = []
  for whiten_grad in (True, False):
    tx = psgd.scale_by_kron(whiten_grad=whiten_grad, preconditioner_update_probability=1.0)
    state = tx.init(params)
    for key in jax.random.split(jax.random.key(0), 3):
      _, state = tx.update(key_grads(key), state)
    states.append(state.factors)
  assert not np.allclose(states[0][1]["w"], states[1][1]["w"])
