"""Model registry: `config.model.name` -> the model class that builds it.

A registered class provides
  * `from_config(config, *, rngs)` (classmethod): check the config, then build the model;
  * `flops_per_token(config, seq_len=None)` (staticmethod): training FLOPs per token.
Adding a model is one module defining such a class under `@register("name")`, imported
from `models/__init__.py`.
"""

import contextlib
from typing import Any, Optional

import jax
from flax import nnx

_MODELS: dict[str, type] = {}


def register(name: str):
  """Class decorator adding a model class to the registry under `name`."""
  def add(cls: type) -> type:
    if name in _MODELS:
      raise ValueError(f"model name {name!r} is already registered to "
                       f"{_MODELS[name].__qualname__}.")
    _MODELS[name] = cls
    return cls

  return add


def names() -> tuple[str, ...]:
  """The registered model names, sorted."""
  return tuple(sorted(_MODELS))


def lookup(config: Any) -> type:
  """The model class registered under `config['name']`."""
  name = config.get("name")
  if name not in _MODELS:
    raise ValueError(f"model.name={name!r} is unknown; known names: {', '.join(names())}.")
  return _MODELS[name]


def build(config: Any, rngs: Optional[nnx.Rngs]) -> nnx.Module:
  """The model `config` describes (a ConfigDict or dict with `name` and sizes).

  Parameters are sharded eagerly when a mesh is set (`jax.set_mesh`, with
  `nnx.logical_axis_rules`); with no mesh they stay on one device and keep their axis
  names as metadata only.
  """
  cls = lookup(config)
  no_mesh = jax.sharding.get_abstract_mesh().empty
  with nnx.use_eager_sharding(False) if no_mesh else contextlib.nullcontext():
    return cls.from_config(config, rngs=rngs)


def flops_per_token(config: Any, seq_len: Optional[int] = None) -> float:
  """Training FLOPs (forward + backward) per token of the model `config` describes."""
  return float(lookup(config).flops_per_token(config, seq_len))
