"""PSGD state placed over a mesh of 8 fake CPU devices."""

import functools
import importlib
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import psgd


def test_state_specs_spread_factors_and_jit_matches_one_device():
  assert jax.device_count() == 8, "conftest sets 8 fake CPU devices"
  mesh = jax.make_mesh((4, 2), ("fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  keys = jax.random.split(jax.random.key(0), 3)
  make_params = lambda: {
      "embed": jax.random.normal(keys[0], (64, 32)),
      "layers": jax.random.normal(keys[1], (4, 32, 48)),
      "norm": jnp.ones((32,)),
  }
  params = make_params()
  param_specs = {"embed": P("fsdp", "tensor"), "layers": P("fsdp", None, "tensor"),
                 "norm": P()}
  scanned = {"embed": False, "layers": True, "norm": False}
  tx = psgd.kron(1e-2, scanned_layers=scanned, preconditioner_update_probability=1.0)
  specs = psgd.state_partition_specs(jax.eval_shape(tx.init, params), params, param_specs,
                                     mesh, scanned_layers=scanned)
  kron_specs = specs[0]
  assert kron_specs.mu == param_specs
  # embed (64, 32): diag(64) x dense(32); dense factor spread over both axes (32 % 8 == 0).
  assert kron_specs.factors[1]["embed"] == P(None, ("fsdp", "tensor"), None)
  # layers: batch axis is the layer axis -> 'fsdp'; factors spread over what is left.
  assert kron_specs.factors[0]["layers"] == P("fsdp", "tensor", None)
  assert kron_specs.lipschitz["layers"] == P("fsdp", None)
  assert kron_specs.count == P()
  cached = psgd.kron(1e-2, scanned_layers=scanned, cache_preconditioner=True)
  cached_specs = psgd.state_partition_specs(jax.eval_shape(cached.init, params), params,
                                            param_specs, mesh, scanned_layers=scanned)[0]
  assert cached_specs.precond == cached_specs.factors == kron_specs.factors
  # The layer axis comes from the mask, not from shapes: unmarked, the batch axis of the
  # same factors is not placed, although its size equals the param's first dim.
  unmarked = psgd.state_partition_specs(jax.eval_shape(tx.init, params), params,
                                        param_specs, mesh)[0]
  assert unmarked.factors[0]["layers"] == P(None, ("fsdp", "tensor"), None)

  to_sharding = lambda tree: jax.tree.map(lambda s: NamedSharding(mesh, s), tree,
                                          is_leaf=lambda x: isinstance(x, P))
  param_shardings, state_shardings = to_sharding(param_specs), to_sharding(specs)
  grads_fn = lambda p: jax.tree.map(lambda x: jnp.tanh(x) + 0.1 * x**2, p)

  def train(p, steps, in_shardings=None, out_shardings=None):
    init = jax.jit(tx.init, out_shardings=out_shardings and out_shardings[1])
    step = jax.jit(lambda p, s: (lambda u, s: (optax.apply_updates(p, u), s))(
        *tx.update(grads_fn(p), s, p)), in_shardings=in_shardings,
                   out_shardings=out_shardings, donate_argnums=(0, 1))
    s = init(p)
    for _ in range(steps):
      p, s = step(p, s)
    return p, s

  sharded_params = jax.device_put(make_params(), param_shardings)
  shardings = (param_shardings, state_shardings)
  p_sharded, s_sharded = train(sharded_params, 5, shardings, shardings)
  p_single, _ = train(make_params(), 5)

  dense = s_sharded[0].factors[0]["layers"]
  assert dense.sharding.spec == P("fsdp", "tensor", None)
  shard_shape = dense.addressable_shards[0].data.shape
  assert math.prod(shard_shape) * 8 == math.prod(dense.shape)  # no device holds all
  for a, b in zip(jax.tree.leaves(p_sharded), jax.tree.leaves(p_single)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


def test_state_specs_under_masked_and_multisteps():
  """optax.masked leaves some params without state (and specs); MultiSteps keeps a
  gradient per param, placed like it; both specs trees fit their states."""
  mesh = jax.make_mesh((4, 2), ("f", "t"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  params = {"w": jnp.ones((8, 6)), "b": jnp.ones(8)}
  param_specs = {"w": P("f", "t"), "b": P("f")}
  for tx in (optax.masked(psgd.kron(1e-3), {"w": True, "b": False}),
             optax.MultiSteps(psgd.kron(1e-3), 2)):
    state = jax.eval_shape(tx.init, params)
    specs = psgd.state_partition_specs(state, params, param_specs, mesh)
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                             is_leaf=lambda x: isinstance(x, P))
    placed = jax.jit(tx.init, out_shardings=shardings)(params)  # the specs fit the state
    assert jax.tree.structure(placed) == jax.tree.structure(state)
  assert specs.acc_grads == param_specs
  assert specs.inner_opt_state[0].mu == param_specs


def test_state_leaves_at_a_params_path_but_of_another_shape_are_replicated():
  """Adafactor's factored moments sit at the params' paths with other shapes: they are
  not placed like the param (whose spec would not even fit their rank)."""
  mesh = jax.make_mesh((4, 2), ("f", "t"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  params = {"w": jnp.ones((256, 128))}
  param_specs = {"w": P("f", "t")}
  tx = optax.adafactor(1e-3, min_dim_size_to_factor=32)
  state = jax.eval_shape(tx.init, params)
  specs = psgd.state_partition_specs(state, params, param_specs, mesh)
  factored = specs[0]
  assert factored.v_row["w"] == P() and factored.v_col["w"] == P()
  assert state[0].v_row["w"].shape == (128,)  # the case this is about
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                           is_leaf=lambda x: isinstance(x, P))
  jax.jit(tx.init, out_shardings=shardings)(params)


def test_per_dim_factors_shard_and_match_one_device():
  # merge_dims=False: an attention-like (layers, embed, heads, head_dim) param has three
  # factors per layer, a matrix two; the matrix's third slot holds a (batch, 1) placeholder.
  mesh = jax.make_mesh((4, 2), ("fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  keys = jax.random.split(jax.random.key(1), 2)
  make_params = lambda: {"wq": jax.random.normal(keys[0], (2, 32, 4, 8)),
                         "embed": jax.random.normal(keys[1], (64, 32))}
  param_specs = {"wq": P(None, "fsdp", "tensor", None), "embed": P("fsdp", "tensor")}
  tx = psgd.kron(1e-2, merge_dims=False, scanned_layers={"wq": True, "embed": False},
                 preconditioner_update_probability=1.0)
  state = jax.eval_shape(tx.init, make_params())
  assert [f["wq"].shape for f in state[0].factors] == [(2, 32, 32), (2, 4, 4), (2, 8, 8)]
  assert state[0].factors[2]["embed"].shape == (1, 1)
  specs = psgd.state_partition_specs(state, make_params(), param_specs, mesh,
                                     scanned_layers={"wq": True, "embed": False})
  assert specs[0].factors[2]["embed"] == P(None, None)
  assert specs[0].factors[0]["wq"] == P(None, ("fsdp", "tensor"), None)

  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), (param_specs, specs),
                           is_leaf=lambda x: isinstance(x, P))
  grads_fn = lambda p: jax.tree.map(lambda x: jnp.tanh(x) + 0.1 * x**2, p)

  def train(p, jit_kwargs):
    step = jax.jit(lambda p, s: (lambda u, s: (optax.apply_updates(p, u), s))(
        *tx.update(grads_fn(p), s, p)), **jit_kwargs)
    s = jax.jit(tx.init, **({"out_shardings": shardings[1]} if jit_kwargs else {}))(p)
    for _ in range(5):
      p, s = step(p, s)
    return p

  sharded = train(jax.device_put(make_params(), shardings[0]),
                  dict(in_shardings=shardings, out_shardings=shardings))
  single = train(make_params(), {})
  for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(single)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


def _collective_shapes(hlo_text: str) -> list[tuple[str, str]]:
  """(kind, result shape) of every collective op in compiled HLO text."""
  kinds = "all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute"
  return re.findall(rf"=\s*(.+?)\s+({kinds})(?:-start)?\(", hlo_text)


def test_shard_local_blocks_move_no_arrays_and_match_one_device(monkeypatch):
  # A transformer-like tree on a 4 x 2 mesh. With shard-local blocks each device fits and
  # applies the factors of its own shards: the compiled step's only collectives are
  # scalar reductions (the initial scale's max), where whole-matrix factors gather
  # and reduce gradient- and factor-sized arrays.
  mesh = jax.make_mesh((4, 2), ("fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  shapes = {"embed": (64, 32), "mlp": (3, 32, 48), "wq": (3, 32, 4, 8),
            "wo": (3, 4, 8, 32), "norm": (3, 32)}
  specs = {"embed": P("tensor", "fsdp"), "mlp": P(None, "fsdp", "tensor"),
           "wq": P(None, "fsdp", "tensor", None), "wo": P(None, "tensor", None, "fsdp"),
           "norm": P()}
  scanned = {"embed": False, "mlp": True, "wq": True, "wo": True, "norm": True}
  named = lambda tree: jax.tree.map(lambda s: NamedSharding(mesh, s), tree,
                                    is_leaf=lambda x: isinstance(x, P))
  param_shardings = named(specs)
  keys = dict(zip(shapes, jax.random.split(jax.random.key(2), len(shapes))))
  make_params = lambda: {k: jax.random.normal(keys[k], s) for k, s in shapes.items()}
  grads_fn = lambda p: jax.tree.map(lambda x: jnp.tanh(x) + 0.1 * x**2, p)

  def compiled_step(shard_local):
    tx = psgd.kron(1e-2, scanned_layers=scanned, preconditioner_update_probability=1.0,
                   param_sharding=param_shardings if shard_local else None)
    abstract = jax.eval_shape(tx.init, make_params())
    state_shardings = named(psgd.state_partition_specs(
        abstract, make_params(), specs, mesh, scanned, shard_local=shard_local))
    shardings = (param_shardings, state_shardings)
    step = jax.jit(lambda p, s: (lambda u, s: (optax.apply_updates(p, u), s))(
        *tx.update(grads_fn(p), s, p)), in_shardings=shardings, out_shardings=shardings)
    return tx, state_shardings, step

  tx, state_shardings, step = compiled_step(shard_local=True)
  mlp_factor = state_shardings[0].factors[0]["mlp"]
  assert mlp_factor.spec == P(("fsdp", "tensor"), None, None)  # (shards, layers) batch
  hlo = step.lower(jax.device_put(make_params(), param_shardings),
                   jax.jit(tx.init, out_shardings=state_shardings)(make_params())
                   ).compile().as_text()
  local = _collective_shapes(hlo)
  scalars = re.compile(r"\(?f32\[\](, f32\[\])*\)?")
  assert local and all(scalars.fullmatch(shape) for shape, _ in local), local
  whole_tx, _, whole_step = compiled_step(shard_local=False)
  whole = _collective_shapes(whole_step.lower(
      make_params(), jax.eval_shape(whole_tx.init, make_params())).compile().as_text())
  assert any(kind == "all-gather" and "32,32" in shape for shape, kind in whole)

  # Sharded = one device with the same blocks: the fits run per device
  # (`kron._on_each_device`, a shard_map); without it the same blocks are fitted as
  # global arrays, unplaced, on one device.
  def train(p, s, step_fn):
    for _ in range(5):
      p, s = step_fn(p, s)
    return p

  sharded = train(jax.device_put(make_params(), param_shardings),
                  jax.jit(tx.init, out_shardings=state_shardings)(make_params()), step)
  kron_module = importlib.import_module("psgd.kron")
  monkeypatch.setattr(kron_module, "_on_each_device",
                      lambda s, layouts, params, fit: functools.partial(fit, layouts))
  single_step = jax.jit(lambda p, s: (lambda u, s: (optax.apply_updates(p, u), s))(
      *tx.update(grads_fn(p), s, p)))
  single = train(make_params(), tx.init(make_params()), single_step)
  for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(single)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


def test_a_mesh_with_explicit_axes_is_refused_naming_the_fix():
  mesh = jax.make_mesh((4,), ("fsdp",), axis_types=(jax.sharding.AxisType.Explicit,))
  w = jax.device_put(jnp.ones((64, 32)), NamedSharding(mesh, P("fsdp", None)))
  tx = psgd.kron(1e-3)
  state = tx.init({"w": w})
  fix = r"axis_types=\(jax\.sharding\.AxisType\.Auto,\)"
  with pytest.raises(ValueError, match=fix):
    jax.jit(tx.update)({"w": w}, state, {"w": w})
  with pytest.raises(ValueError, match=fix):  # as early as the state's shardings
    psgd.state_partition_specs(state, {"w": w}, {"w": P("fsdp", None)}, mesh)


def test_specs_asked_for_shard_local_blocks_the_state_lacks_are_refused_naming_the_fix():
  mesh = jax.make_mesh((4, 2), ("f", "t"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  params = {"w": jnp.ones((8, 6))}
  state = jax.eval_shape(psgd.kron(1e-3).init, params)  # whole-matrix factors: 1 block
  with pytest.raises(ValueError, match=r"\['w'\].*1 blocks.*shard_local=True exactly when"):
    psgd.state_partition_specs(state, params, {"w": P("f", "t")}, mesh, shard_local=True)
