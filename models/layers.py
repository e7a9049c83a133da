"""Transformer building blocks whose parameters carry logical axis names.

Parameters are float32 and named through `out_sharding` metadata (so Flax shards them
when they are created under a mesh with logical axis rules); each layer casts them to its
compute dtype where it uses them.
"""

import flax.core.spmd
import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec


def constrain(x: jax.Array, axes: tuple) -> jax.Array:
  """x pinned to the sharding its logical axis names get under the current mesh and
  `nnx.logical_axis_rules` (a name without a rule is not split), or x as is when there
  is no mesh or no rules.

  Pinning the residual stream to be split over the batch keeps the compiler from
  following the weights' FSDP split into activations that are whole on every device.
  """
  rules = dict(flax.core.spmd.get_logical_axis_rules() or ())
  if not rules or jax.sharding.get_abstract_mesh().empty:
    return x
  return jax.lax.with_sharding_constraint(x, PartitionSpec(*(rules.get(a) for a in axes)))


def normal_param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...],
                 fan_in: int) -> nnx.Param:
  """float32 N(0, 1 / fan_in) parameter: unit-variance outputs for unit-variance inputs."""
  value = jax.random.normal(rngs.params(), shape, jnp.float32) * fan_in**-0.5
  return nnx.Param(value, out_sharding=axes)


def project(equation: str, x: jax.Array, weight: nnx.Param, dtype, **kwargs) -> jax.Array:
  """einsum of activations and a weight, both in the compute dtype."""
  return jnp.einsum(equation, x.astype(dtype), weight[...].astype(dtype), **kwargs)


class RMSNorm(nnx.Module):
  """RMS normalization with a learned scale, computed in float32 for stability."""

  def __init__(self, dim: int, *, dtype, eps: float = 1e-6):
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), out_sharding=("norm",))
    self.dtype = dtype
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return (x * self.scale[...]).astype(self.dtype)


class Embedding(nnx.Module):
  """Token table (vocab, embed); `attend` reuses it as the output head when tied."""

  def __init__(self, vocab_size: int, dim: int, *, dtype, rngs: nnx.Rngs):
    self.table = normal_param(rngs, (vocab_size, dim), ("vocab", "embed"), fan_in=dim)
    self.dtype = dtype

  def __call__(self, tokens: jax.Array) -> jax.Array:
    # The lookup reads the table whole along `embed` (gathered over its FSDP split), so
    # its output can be split by batch without a round trip through a full replica.
    table = constrain(self.table[...], ("vocab", None))
    return jnp.take(table, tokens, axis=0).astype(self.dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    """float32 logits of x against every token's embedding."""
    return project("btd,vd->btv", x, self.table, self.dtype,
                   preferred_element_type=jnp.float32)


class OutputHead(nnx.Module):
  """Untied output projection (embed, vocab) to float32 logits."""

  def __init__(self, dim: int, vocab_size: int, *, dtype, rngs: nnx.Rngs):
    self.kernel = normal_param(rngs, (dim, vocab_size), ("embed", "vocab"), fan_in=dim)
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    return project("btd,dv->btv", x, self.kernel, self.dtype,
                   preferred_element_type=jnp.float32)


def apply_rotary(x: jax.Array, theta: float, start=0) -> jax.Array:
  """Rotary position embedding of x (batch, time, heads, head_dim) at positions
  start..start+T-1 (`start` may be traced, for decoding with a cache).

  Feature i of the first half and feature i of the second half form a pair rotated by
  angle position * theta^(-2i / head_dim); computed on the fly, so any length works.
  """
  seq_len, head_dim = x.shape[1], x.shape[-1]
  inv_freq = theta**(-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  positions = start + jnp.arange(seq_len, dtype=jnp.float32)
  angles = positions[:, None] * inv_freq
  sin, cos = jnp.sin(angles)[:, None, :], jnp.cos(angles)[:, None, :]
  first, second = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], -1)
  return rotated.astype(x.dtype)


class CausalSelfAttention(nnx.Module):
  """Multi-head causal attention with rotary positions; num_kv_heads < num_heads is GQA."""

  def __init__(self, dim: int, num_heads: int, num_kv_heads: int, *, rope_theta: float,
               dtype, rngs: nnx.Rngs):
    head_dim = dim // num_heads
    self.wq = normal_param(rngs, (dim, num_heads, head_dim), ("embed", "heads", "kv"), dim)
    self.wk = normal_param(rngs, (dim, num_kv_heads, head_dim), ("embed", "kv_heads", "kv"),
                           dim)
    self.wv = normal_param(rngs, (dim, num_kv_heads, head_dim), ("embed", "kv_heads", "kv"),
                           dim)
    self.wo = normal_param(rngs, (num_heads, head_dim, dim), ("heads", "kv", "embed"), dim)
    self.rope_theta = rope_theta
    self.dtype = dtype

  def _qkv(self, x: jax.Array, start=0) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Queries, keys and values of x, whose first token is at position `start`."""
    q = apply_rotary(project("btd,dnh->btnh", x, self.wq, self.dtype), self.rope_theta, start)
    k = apply_rotary(project("btd,dnh->btnh", x, self.wk, self.dtype), self.rope_theta, start)
    return q, k, project("btd,dnh->btnh", x, self.wv, self.dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    q, k, v = self._qkv(x)
    # The generic entry point, so TPU/GPU backends can pick their fused kernels.
    y = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    return project("btnh,nhd->btd", y, self.wo, self.dtype)

  def decode(self, x: jax.Array, cache: dict, start) -> tuple[jax.Array, dict]:
    """Attention of x, the tokens at positions start..start+T-1, over them and the
    `cache` of every earlier position's keys and values ({'k', 'v'}: [B, S, kv_heads,
    head_dim], S the longest sequence to decode); returns (output, cache with x's keys
    and values written in)."""
    q, k, v = self._qkv(x, start)
    cache = {"k": jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype),
                                                     start, axis=1),
             "v": jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype),
                                                     start, axis=1)}
    query_pos = start + jnp.arange(x.shape[1])
    visible = jnp.arange(cache["k"].shape[1])[None, :] <= query_pos[:, None]  # [T, S]
    y = jax.nn.dot_product_attention(q, cache["k"], cache["v"], mask=visible[None, None])
    return project("btnh,nhd->btd", y, self.wo, self.dtype), cache


class SwiGLU(nnx.Module):
  """Gated MLP: down(silu(gate(x)) * up(x))."""

  def __init__(self, dim: int, hidden_dim: int, *, dtype, rngs: nnx.Rngs):
    self.gate = normal_param(rngs, (dim, hidden_dim), ("embed", "mlp"), dim)
    self.up = normal_param(rngs, (dim, hidden_dim), ("embed", "mlp"), dim)
    self.down = normal_param(rngs, (hidden_dim, dim), ("mlp", "embed"), hidden_dim)
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    hidden = (jax.nn.silu(project("btd,df->btf", x, self.gate, self.dtype))
              * project("btd,df->btf", x, self.up, self.dtype))
    return project("btf,fd->btd", hidden, self.down, self.dtype)
