"""Decoder-only Transformer: RMSNorm pre-norm blocks of rotary GQA attention and SwiGLU.

    model = models.build({"name": "transformer", "vocab_size": 256}, nnx.Rngs(0))
    logits = model(tokens)  # int32[B, T] -> float32[B, T, vocab]

Parameters carry logical axis names (layers, vocab, embed, heads, kv_heads, kv, mlp,
norm); configs/common.py maps them to mesh axes.
"""

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from models import registry
from models.layers import (CausalSelfAttention, Embedding, OutputHead, RMSNorm, SwiGLU,
                           constrain)
from models.stack import REMAT_CHOICES, LayerStack

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# The residual stream [batch, length, d_model]: split over the batch only.
ACTIVATION_AXES = ("batch", None, None)


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Checked sizes and switches (configs/common.py's model section lists them all)."""

  vocab_size: int = 256
  d_model: int = 128
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: Optional[int] = None  # None: num_heads (no grouping)
  mlp_dim: int = 512
  max_seq_len: int = 256  # the training length, for the attention term of the FLOPs
  rope_theta: float = 10000.0
  tie_embeddings: bool = True
  scan_layers: bool = True
  # Scanned layers compiled one after another instead of as a loop: the same stacked
  # params and results, a bigger program (the dry run counts costs this way).
  unroll_layers: bool = False
  remat: str = "none"  # 'none' | 'full' | 'save_dots'
  dtype: str = "float32"  # compute dtype; parameters, logits and loss stay float32
  # Multiplies d_model, num_heads, num_kv_heads and mlp_dim (head_dim stays): one knob
  # for width-transfer studies (trainer/optim.py scales the learning rate by 1 / it).
  width_multiplier: int = 1

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  @classmethod
  def from_mapping(cls, config: Any) -> "TransformerConfig":
    """The config's fields (missing ones take defaults), checked; `name` is ignored.

    Raises ValueError naming the first bad setting, e.g. "model.num_heads=3 must divide
    model.d_model=128", or a key that is no transformer setting (a typo would otherwise
    be silently ignored).
    """
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(config.keys()) - known - {"name"})
    if unknown:
      raise ValueError(f"model.{unknown[0]} is not a transformer setting; known: "
                       f"{', '.join(sorted(known))}.")
    result = cls(**{key: config[key] for key in config.keys() if key in known})
    _require(_is_int(result.width_multiplier) and result.width_multiplier >= 1,
             f"model.width_multiplier={result.width_multiplier!r} must be a positive int.")
    result = result._widened()
    result._check()
    return result

  def _widened(self) -> "TransformerConfig":
    """The same config with the width multiplier applied (and reset to 1)."""
    m = self.width_multiplier
    kv = None if self.num_kv_heads is None else self.num_kv_heads * m
    return dataclasses.replace(self, d_model=self.d_model * m, num_heads=self.num_heads * m,
                               num_kv_heads=kv, mlp_dim=self.mlp_dim * m, width_multiplier=1)

  def _check(self):
    for name in ("vocab_size", "d_model", "num_layers", "num_heads", "mlp_dim",
                 "max_seq_len"):
      _require(_is_int(getattr(self, name)) and getattr(self, name) >= 1,
               f"model.{name}={getattr(self, name)!r} must be a positive int.")
    _require(self.d_model % self.num_heads == 0,
             f"model.num_heads={self.num_heads} must divide model.d_model={self.d_model}.")
    kv = self.num_kv_heads
    _require(kv is None or (_is_int(kv) and kv >= 1 and self.num_heads % kv == 0),
             f"model.num_kv_heads={kv!r} must divide model.num_heads={self.num_heads} "
             "(None: num_heads).")
    _require(self.head_dim % 2 == 0,
             f"model.d_model / model.num_heads = {self.head_dim} must be even: rotary "
             "embeddings rotate pairs of features.")
    _require(isinstance(self.rope_theta, (int, float)) and self.rope_theta > 0,
             f"model.rope_theta={self.rope_theta!r} must be positive.")
    for name in ("tie_embeddings", "scan_layers", "unroll_layers"):
      _require(isinstance(getattr(self, name), bool),
               f"model.{name}={getattr(self, name)!r} must be True or False.")
    _require(self.remat in REMAT_CHOICES,
             f"model.remat={self.remat!r} must be one of {', '.join(REMAT_CHOICES)}.")
    _require(self.dtype in DTYPES,
             f"model.dtype={self.dtype!r} must be one of {', '.join(DTYPES)}.")


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _require(ok: bool, message: str):
  if not ok:
    raise ValueError(message)


class Block(nnx.Module):
  """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    dtype = DTYPES[config.dtype]
    self.attn_norm = RMSNorm(config.d_model, dtype=dtype)
    self.attn = CausalSelfAttention(config.d_model, config.num_heads, config.kv_heads,
                                    rope_theta=config.rope_theta, dtype=dtype, rngs=rngs)
    self.mlp_norm = RMSNorm(config.d_model, dtype=dtype)
    self.mlp = SwiGLU(config.d_model, config.mlp_dim, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = constrain(x, ACTIVATION_AXES)
    x = x + self.attn(self.attn_norm(x))
    return x + self.mlp(self.mlp_norm(x))

  def decode(self, x: jax.Array, cache: dict, start) -> tuple[jax.Array, dict]:
    """The block on tokens at positions start.., attending over the key/value cache."""
    x = constrain(x, ACTIVATION_AXES)
    y, cache = self.attn.decode(self.attn_norm(x), cache, start)
    x = x + y
    return x + self.mlp(self.mlp_norm(x)), cache


@registry.register("transformer")
class Transformer(nnx.Module):
  """tokens int32[B, T] -> float32 logits [B, T, vocab]."""

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    dtype = DTYPES[config.dtype]
    self.config = config
    self.embed = Embedding(config.vocab_size, config.d_model, dtype=dtype, rngs=rngs)
    self.blocks = LayerStack(lambda block_rngs: Block(config, rngs=block_rngs),
                             config.num_layers, scan=config.scan_layers,
                             unroll=config.unroll_layers, remat=config.remat, rngs=rngs)
    self.final_norm = RMSNorm(config.d_model, dtype=dtype)
    self.head = None if config.tie_embeddings else OutputHead(
        config.d_model, config.vocab_size, dtype=dtype, rngs=rngs)

  @classmethod
  def from_config(cls, config: Any, *, rngs: nnx.Rngs) -> "Transformer":
    """Checks the whole config before creating any parameter."""
    return cls(TransformerConfig.from_mapping(config), rngs=rngs)

  @staticmethod
  def flops_per_token(config: Any, seq_len: Optional[int] = None) -> float:
    """Training FLOPs per token, 6 * N + 12 * L * d_model * T (PaLM's MFU convention).

    N counts the weights used in matmuls: per layer the q and o projections (d_model^2
    each), k and v (d_model * kv_heads * head_dim each), and the three SwiGLU matrices
    (d_model * mlp_dim each); plus the output head (d_model * vocab, tied or not).
    Embedding lookups and norms do no matmuls. A matmul weight costs 2 FLOPs per token
    forward and 4 backward. Attention scores and their weighted sum cost
    2 * 2 * T * d_model forward per token and layer, again x3 with the backward;
    T = seq_len or max_seq_len, and the causal mask's savings are not subtracted.
    """
    cfg = TransformerConfig.from_mapping(config)
    seq_len = seq_len or cfg.max_seq_len
    d, kv_dim = cfg.d_model, cfg.kv_heads * cfg.head_dim
    per_layer = 2 * d * d + 2 * d * kv_dim + 3 * d * cfg.mlp_dim
    matmul_params = cfg.num_layers * per_layer + d * cfg.vocab_size
    return 6.0 * matmul_params + 12.0 * cfg.num_layers * d * seq_len

  def __call__(self, tokens: jax.Array) -> jax.Array:
    return self._logits(self.blocks(self.embed(tokens)))

  def _logits(self, x: jax.Array) -> jax.Array:
    x = self.final_norm(x)
    return self.embed.attend(x) if self.head is None else self.head(x)

  def init_cache(self, batch_size: int, max_len: int) -> dict:
    """An empty key/value cache for decoding up to `max_len` tokens per row:
    {'k', 'v'}: [num_layers, batch, max_len, kv_heads, head_dim] in the compute dtype."""
    cfg = self.config
    shape = (cfg.num_layers, batch_size, max_len, cfg.kv_heads, cfg.head_dim)
    return {"k": jnp.zeros(shape, DTYPES[cfg.dtype]), "v": jnp.zeros(shape, DTYPES[cfg.dtype])}

  def decode(self, tokens: jax.Array, cache: dict, start) -> tuple[jax.Array, dict]:
    """(logits, cache) for `tokens` [B, T] at positions start..start+T-1, given the
    cache of positions before `start`: a prompt with start=0, then one token at a time.
    The logits equal those of `model(all tokens so far)` at the same positions. Needs
    start + T <= the cache's max_len (a write past its end would land at wrong rows)."""
    x, cache = self.blocks.decode(self.embed(tokens), cache, start)
    return self._logits(x), cache
