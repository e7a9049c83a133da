"""The models package: the transformer's math, its parameter metadata, sharding, config."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs import common
import models
import psgd
from models import layers, transformer

LAYERS, VOCAB, D, HEADS, KV_HEADS, MLP, SEQ = 3, 64, 32, 4, 2, 64, 16
RULES = common.MESH_RULES  # ('data', 'fsdp', 'tensor') mesh


def tiny_config(**overrides):
  config = common.base_config().model
  config.update(dict(vocab_size=VOCAB, d_model=D, num_layers=LAYERS, num_heads=HEADS,
                     num_kv_heads=KV_HEADS, mlp_dim=MLP, max_seq_len=SEQ,
                     tie_embeddings=False))
  config.update(overrides)
  return config


def build(**overrides):
  return models.build(tiny_config(**overrides), nnx.Rngs(0))


def params_of(model):
  return nnx.state(model, nnx.Param)


def loss_fn(graphdef, tokens):
  def loss(params):
    return models.cross_entropy(nnx.merge(graphdef, params)(tokens)[:, :-1], tokens[:, 1:])

  return loss


def to_loop_layout(stacked_state, loop_state):
  """loop_state with values from stacked_state: blocks/layers/i/... = blocks/layers/...[i]."""
  stacked = {path: var[...] for path, var in nnx.to_flat_state(stacked_state)}

  def pick(path, var):
    keys = tuple(entry.key for entry in path)
    if keys[:2] == ("blocks", "layers"):
      return var.replace(stacked[keys[:2] + keys[3:]][keys[2]])
    return var.replace(stacked[keys])

  return jax.tree_util.tree_map_with_path(pick, loop_state,
                                          is_leaf=lambda x: isinstance(x, nnx.Variable))


@pytest.fixture(scope="module")
def tokens():
  return jax.random.randint(jax.random.key(1), (4, SEQ), 0, VOCAB, jnp.int32)


@pytest.fixture(scope="module")
def scanned():
  return build()


@pytest.fixture(scope="module")
def scanned_logits(scanned, tokens):
  graphdef, params = nnx.split(scanned, nnx.Param)
  return jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))(params, tokens)


# --------------------------------------------------------------------------- forward


def test_split_merge_round_trip_and_float32_logits(scanned, scanned_logits, tokens):
  graphdef, params = nnx.split(scanned, nnx.Param)
  assert scanned_logits.shape == (4, SEQ, VOCAB) and scanned_logits.dtype == jnp.float32
  np.testing.assert_array_equal(nnx.merge(graphdef, params)(tokens), scanned(tokens))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))

  bf16 = build(dtype="bfloat16")  # same seed: same float32 parameters
  bf16_logits = bf16(tokens)
  assert bf16_logits.dtype == jnp.float32
  np.testing.assert_allclose(bf16_logits, scanned_logits, atol=0.15)
  assert not np.allclose(bf16_logits, scanned_logits, atol=1e-5)  # it did compute in bf16


def test_scanned_and_unscanned_agree_on_logits_and_grads(scanned, scanned_logits, tokens):
  loop = build(scan_layers=False, remat="save_dots")
  loop_graphdef, loop_params = nnx.split(loop, nnx.Param)
  loop_params = to_loop_layout(params_of(scanned), loop_params)
  np.testing.assert_allclose(nnx.merge(loop_graphdef, loop_params)(tokens), scanned_logits,
                             rtol=1e-5, atol=1e-5)

  graphdef, params = nnx.split(scanned, nnx.Param)
  grads = jax.jit(jax.grad(loss_fn(graphdef, tokens)))(params)
  loop_grads = jax.jit(jax.grad(loss_fn(loop_graphdef, tokens)))(loop_params)
  for expected, actual in zip(jax.tree.leaves(to_loop_layout(grads, loop_params)),
                              jax.tree.leaves(loop_grads)):
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-6)


def test_unrolled_layers_compute_the_scanned_logits_with_no_loop(scanned, scanned_logits,
                                                                 tokens):
  def compiled_forward(model):
    graphdef = nnx.split(model, nnx.Param)[0]
    forward = jax.jit(lambda params: nnx.merge(graphdef, params)(tokens))
    return forward.lower(params_of(scanned)).compile()  # the same stacked parameters

  unrolled = compiled_forward(build(unroll_layers=True))
  np.testing.assert_allclose(unrolled(params_of(scanned)), scanned_logits, rtol=1e-5,
                             atol=1e-5)
  assert "while" not in unrolled.as_text()
  assert "while" in compiled_forward(scanned).as_text()


def remat_policies(model, tokens):
  """The policy of every jax.checkpoint region in the model's forward pass."""
  graphdef, params = nnx.split(model, nnx.Param)
  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if {"policy", "prevent_cse"} <= eqn.params.keys():
        found.append(eqn.params["policy"])
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jax.make_jaxpr(lambda p: nnx.merge(graphdef, p)(tokens))(params).jaxpr)
  return found


@pytest.mark.parametrize("scan", [True, False])
def test_remat_policy_wraps_each_block_call(scan, tokens):
  assert remat_policies(build(scan_layers=scan, remat="none"), tokens) == []
  calls = 1 if scan else LAYERS
  assert remat_policies(build(scan_layers=scan, remat="full"), tokens) == [None] * calls
  dots = jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  assert remat_policies(build(scan_layers=scan, remat="save_dots"), tokens) == [dots] * calls


def test_changing_a_token_never_changes_earlier_logits(scanned, scanned_logits, tokens):
  t = 6
  changed = tokens.at[:, t].set((tokens[:, t] + 1) % VOCAB)
  logits = scanned(changed)
  np.testing.assert_allclose(logits[:, :t], scanned_logits[:, :t], rtol=0, atol=1e-6)
  assert np.all(np.abs(logits[:, t] - scanned_logits[:, t]).max(axis=-1) > 1e-4)


def test_rotary_scores_depend_only_on_relative_position():
  q, k = jax.random.normal(jax.random.key(3), (2, 1, 1, 1, 8))
  def score(m, n):  # query at position m, key at position n
    rot_q = layers.apply_rotary(jnp.tile(q, (1, m + 1, 1, 1)), 100.0)[0, m, 0]
    rot_k = layers.apply_rotary(jnp.tile(k, (1, n + 1, 1, 1)), 100.0)[0, n, 0]
    return jnp.dot(rot_q, rot_k)

  np.testing.assert_allclose(score(5, 3), score(2, 0), rtol=1e-5)
  assert not np.isclose(score(5, 3), score(5, 0), rtol=1e-3)


def test_grouped_query_attention_matches_a_reference():
  with nnx.use_eager_sharding(False):  # no mesh here
    attn = layers.CausalSelfAttention(D, HEADS, KV_HEADS, rope_theta=1e4,
                                      dtype=jnp.float32, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(4), (2, SEQ, D))
  rope = lambda y: layers.apply_rotary(y, 1e4)
  q = rope(jnp.einsum("btd,dnh->btnh", x, attn.wq[...]))
  # Query head n reads kv head n // (HEADS // KV_HEADS).
  k, v = (jnp.repeat(jnp.einsum("btd,dnh->btnh", x, w[...]), HEADS // KV_HEADS, axis=2)
          for w in (attn.wk, attn.wv))
  k = rope(k)
  scores = jnp.einsum("bqnh,bknh->bnqk", q, k) / np.sqrt(D // HEADS)
  scores = jnp.where(jnp.tril(jnp.ones((SEQ, SEQ), bool)), scores, -jnp.inf)
  y = jnp.einsum("bnqk,bknh->bqnh", jax.nn.softmax(scores, axis=-1), v)
  expected = jnp.einsum("btnh,nhd->btd", y, attn.wo[...])
  np.testing.assert_allclose(attn(x), expected, rtol=1e-5, atol=1e-5)


def test_cross_entropy_is_the_masked_mean_of_minus_log_softmax():
  logits = jax.random.normal(jax.random.key(2), (2, 3, 5)) * 3
  targets = jnp.array([[0, 4, 2], [1, 1, 3]])
  mask = jnp.array([[1, 0, 1], [1, 1, 0]])
  nll = -np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)), targets[..., None],
                            -1)[..., 0]
  np.testing.assert_allclose(models.cross_entropy(logits, targets), nll.mean(), rtol=1e-6)
  np.testing.assert_allclose(models.cross_entropy(logits, targets, mask),
                             (nll * mask).sum() / 4, rtol=1e-6)
  assert models.cross_entropy(logits.astype(jnp.bfloat16), targets).dtype == jnp.float32


# --------------------------------------------------------------------------- metadata


def test_scanned_mask_marks_exactly_the_stacked_params(scanned):
  params = params_of(scanned)
  mask = models.scanned_mask(params)
  assert jax.tree.structure(mask) == jax.tree.structure(params)
  flat_mask = nnx.to_flat_state(mask)
  assert {path for path, m in flat_mask if m.get_value()} == {
      path for path, _ in nnx.to_flat_state(params) if path[:2] == ("blocks", "layers")}
  for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask)):
    assert not m or p.shape[0] == LAYERS
  # The optimizer takes it as is: one factor batch entry per layer.
  layouts = psgd.plan_layouts(params, scanned_layers=mask)
  assert nnx.to_pure_dict(layouts)["blocks"]["layers"]["mlp"]["up"].layers == LAYERS

  # The loop layout also has 'layers' in its paths, but nothing stacked.
  loop_mask = models.scanned_mask(params_of(build(scan_layers=False)))
  assert not any(jax.tree.leaves(loop_mask))


def test_partition_specs_and_param_info_follow_the_rules(scanned):
  params = params_of(scanned)
  specs = nnx.to_pure_dict(models.partition_specs(params, RULES))
  assert specs["embed"]["table"] == P("tensor", "fsdp")
  assert specs["head"]["kernel"] == P("fsdp", "tensor")
  assert specs["final_norm"]["scale"] == P(None)
  layer = specs["blocks"]["layers"]
  assert layer["attn"]["wq"] == P(None, "fsdp", "tensor", None)
  assert layer["attn"]["wk"] == P(None, "fsdp", "tensor", None)
  assert layer["attn"]["wv"] == P(None, "fsdp", "tensor", None)
  assert layer["attn"]["wo"] == P(None, "tensor", None, "fsdp")
  assert layer["mlp"]["gate"] == layer["mlp"]["up"] == P(None, "fsdp", "tensor")
  assert layer["mlp"]["down"] == P(None, "tensor", "fsdp")
  assert layer["mlp_norm"]["scale"] == P(None, None)

  info = models.param_info(params, (("layers", "fsdp"),) +
                           tuple(rule for rule in RULES if rule[0] != "layers"))
  wq = info[("blocks", "layers", "attn", "wq")]
  assert wq.logical_axes == ("layers", "embed", "heads", "kv")
  assert (wq.stacked, wq.layer_axis, wq.spec) == (True, 0, P("fsdp", "fsdp", "tensor", None))
  table = info[("embed", "table")]
  assert (table.logical_axes, table.stacked, table.layer_axis) == (("vocab", "embed"), False,
                                                                    None)

  decay = nnx.to_pure_dict(models.weight_decay_mask(params))
  assert decay["embed"]["table"] and decay["head"]["kernel"]
  assert all(decay["blocks"]["layers"]["attn"].values())
  assert all(decay["blocks"]["layers"]["mlp"].values())
  assert not decay["final_norm"]["scale"]
  assert not decay["blocks"]["layers"]["attn_norm"]["scale"]

  with pytest.raises(ValueError, match="'mlp' has no axis rule"):
    models.partition_specs(params, [r for r in RULES if r[0] != "mlp"])
  with pytest.raises(ValueError, match="more than once"):
    models.partition_specs(params, RULES + (("mlp", None),))


def test_params_without_axis_names_are_rejected():
  class Bare(nnx.Module):
    def __init__(self):
      self.w = nnx.Param(jnp.zeros((2, 3)))

  with pytest.raises(ValueError, match="w of shape"):
    models.scanned_mask(params_of(Bare()))


def test_params_with_fewer_axis_names_than_dims_are_rejected():
  class Short(nnx.Module):
    def __init__(self):
      self.w = nnx.Param(jnp.zeros((2, 3)))
      self.w.set_metadata(out_sharding=("embed",))  # flax checks it only under a mesh

  with pytest.raises(ValueError, match="one logical axis name per dim"):
    models.scanned_mask(params_of(Short()))


def test_sharded_init_places_params_by_their_specs_and_matches_one_device(
    scanned, scanned_logits, tokens):
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(RULES):
    sharded = build()
    graphdef, params = nnx.split(sharded, nnx.Param)
    specs = models.partition_specs(params, RULES)
    for array, spec in zip(jax.tree.leaves(params), jax.tree.leaves(specs)):
      assert array.sharding.is_equivalent_to(NamedSharding(mesh, spec), array.ndim), (
          array.sharding, spec)
    assert any(len(a.sharding.device_set) == 8 and not a.sharding.is_fully_replicated
               for a in jax.tree.leaves(params))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params_of(scanned))):
      np.testing.assert_array_equal(a, b)
    batch = jax.device_put(tokens, NamedSharding(mesh, P(("data", "fsdp"))))
    logits = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))(params, batch)
  np.testing.assert_allclose(logits, scanned_logits, rtol=1e-5, atol=1e-5)


def test_constrain_splits_activations_by_the_logical_rules_and_only_under_a_mesh():
  x = jnp.ones((8, 4, 2))
  axes = ("batch", None, "no_rule")  # a name without a rule is not split
  assert models.layers.constrain(x, axes) is x  # no mesh
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)
  with jax.set_mesh(mesh):
    assert models.layers.constrain(x, axes) is x  # no rules
    with nnx.logical_axis_rules((("batch", ("data", "fsdp")),)):
      y = jax.jit(lambda x: models.layers.constrain(x, axes) * 2)(x)
  assert y.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"))), 3)
  np.testing.assert_array_equal(y, 2 * x)


def test_param_count_and_flops_per_token_by_hand(scanned):
  head_dim = D // HEADS
  per_layer = (D * D  # wq
               + 2 * D * KV_HEADS * head_dim  # wk, wv
               + D * D  # wo
               + 3 * D * MLP  # gate, up, down
               + 2 * D)  # two norms
  untied = VOCAB * D + LAYERS * per_layer + D + D * VOCAB
  assert untied == 2048 + 3 * 9280 + 32 + 2048
  assert models.param_count(params_of(scanned)) == untied
  tied = nnx.eval_shape(lambda: build(tie_embeddings=True))
  assert models.param_count(params_of(tied)) == untied - D * VOCAB

  matmul_params = LAYERS * (per_layer - 2 * D) + D * VOCAB  # head counted, tied or not
  expected = 6 * matmul_params + 12 * LAYERS * D * SEQ
  assert expected == 6 * (3 * 9216 + 2048) + 12 * 3 * 32 * 16
  assert models.flops_per_token(tiny_config()) == expected
  assert models.flops_per_token(tiny_config(tie_embeddings=True)) == expected
  assert models.flops_per_token(tiny_config(), seq_len=4) == expected - 12 * LAYERS * D * 12


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("overrides, message", [
    (dict(num_heads=3), "model.num_heads=3 must divide model.d_model=32"),
    (dict(num_kv_heads=3), "model.num_kv_heads=3 must divide model.num_heads=4"),
    (dict(num_heads=32, num_kv_heads=None), "must be even"),
    (dict(remat="some"), "model.remat='some' must be one of none, full, save_dots"),
    (dict(dtype="float16"), "model.dtype='float16' must be one of float32, bfloat16"),
    (dict(num_layers=0), "model.num_layers=0 must be a positive int"),
    (dict(scan_layers=1), "model.scan_layers=1 must be True or False"),
    (dict(rope_theta=-1.0), "model.rope_theta=-1.0 must be positive"),
])
def test_bad_config_raises_naming_the_setting(overrides, message):
  config = {**tiny_config().to_dict(), **overrides}  # a plain dict: no ConfigDict type checks
  with pytest.raises(ValueError, match=message):
    models.build(config, rngs=None)  # checked before rngs are touched


def test_unknown_setting_and_unknown_model_name_raise():
  config = tiny_config().to_dict()
  config["num_kv_head"] = 2
  with pytest.raises(ValueError, match="model.num_kv_head is not a transformer setting"):
    models.build(config, rngs=None)
  with pytest.raises(ValueError, match=r"model.name='gpt9' is unknown; known names: .*"
                                       r"transformer"):
    models.build(tiny_config(name="gpt9"), rngs=None)
  with pytest.raises(ValueError, match="model.name='gpt9' is unknown"):
    models.flops_per_token(tiny_config(name="gpt9"))


def test_register_adds_a_model_by_name():
  @models.register("test_linear")
  class Linear(nnx.Module):
    def __init__(self, width, rngs):
      self.w = nnx.Param(jax.random.normal(rngs.params(), (width, width)),
                         out_sharding=("embed", "mlp"))

    @classmethod
    def from_config(cls, config, *, rngs):
      return cls(config["width"], rngs)

    @staticmethod
    def flops_per_token(config, seq_len=None):
      return 6 * config["width"]**2

  model = models.build({"name": "test_linear", "width": 3}, nnx.Rngs(0))
  assert isinstance(model, Linear) and "test_linear" in models.names()
  assert models.flops_per_token({"name": "test_linear", "width": 3}) == 54.0
  with pytest.raises(ValueError, match="already registered"):
    models.register("test_linear")(Linear)


def test_width_multiplier_widens_every_width_but_head_dim():
  config = common.base_config().model
  config.update(dict(d_model=32, num_heads=2, mlp_dim=64, num_layers=1, vocab_size=64,
                     width_multiplier=2))
  model = nnx.eval_shape(lambda: models.build(config, nnx.Rngs(0)))
  shapes = jax.tree.map(lambda x: x.shape, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  assert shapes["embed"]["table"] == (64, 64)
  assert shapes["blocks"]["layers"]["attn"]["wq"] == (1, 64, 4, 16)  # 4 heads of 16
  assert shapes["blocks"]["layers"]["mlp"]["up"] == (1, 64, 128)
  config.num_kv_heads = 1  # grouped-query attention widens its kv heads too
  model = nnx.eval_shape(lambda: models.build(config, nnx.Rngs(0)))
  assert nnx.state(model, nnx.Param)["blocks"]["layers"]["attn"]["wk"].shape == (1, 64, 2, 16)
  config.width_multiplier = 0
  with pytest.raises(ValueError, match="model.width_multiplier"):
    models.build(config, nnx.Rngs(0))
