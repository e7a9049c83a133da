r"""Sample text from a trained run: `python -m trainer.sample --workdir runs/cpu_lm`.

    python -m trainer.sample --workdir runs/cpu_lm --prompt 'import os' --length 200 \
        --temperature 0.8 --top_k 40 --top_p 0.95 --seed 0 --num_samples 4

restores the params of the newest step that restores intact (or of --step) on the run's
mesh (`--config.mesh.shape=...` for another device count), encodes the prompt with the
run's tokenizer and decodes with a key/value cache: the prompt in one pass, then one
token per step that attends over the cache, instead of running the whole sequence
again for each token. --temperature 0 is greedy decoding. Each sample is printed as
prompt + continuation, cut at the first EOS. It reads the workdir only.
"""

import math
import sys
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from jax.experimental import multihost_utils

from trainer import data as data_lib
from trainer import distributed
from trainer import mesh as mesh_lib
from trainer import saved_run

_PROMPT = flags.DEFINE_string("prompt", "", "The text to continue, from the start of a "
                              "document ('': a new document).")
_LENGTH = flags.DEFINE_integer("length", 200, "Tokens to generate per sample.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "Samples of the same prompt.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "Softmax temperature; 0 is greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0: all).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Sample among the most likely tokens whose "
                            "probabilities add up to p (1: all).")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed: the same seed gives the same text.")


def next_token(logits: jax.Array, key: jax.Array, *, temperature: float, top_k: int,
               top_p: float, vocab_size: int) -> jax.Array:
  """One token id per row of logits [B, V]: the most likely at temperature 0, else a
  draw from softmax(logits / temperature) over the `top_k` most likely ids (0: all) and,
  of those, the most likely ones whose probabilities first reach `top_p` (1: all;
  nucleus sampling, Holtzman et al. 2020). Ids >= vocab_size (the model's padding of
  the tokenizer's vocabulary) are never picked."""
  logits = logits.astype(jnp.float32)
  logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_size, logits, -jnp.inf)
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_k:
    kth_largest = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]
    logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
  if top_p < 1:
    descending = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(descending, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # of the strictly likelier ids
    smallest_kept = jnp.min(jnp.where(mass_before < top_p, descending, jnp.inf), axis=-1,
                            keepdims=True)
    logits = jnp.where(logits < smallest_kept, -jnp.inf, logits)
  return jax.random.categorical(key, logits).astype(jnp.int32)


@nnx.jit(static_argnames=("length", "use_cache", "temperature", "top_k", "top_p",
                          "vocab_size"))
def generate(model, prompt: jax.Array, key: jax.Array, *, length: int, temperature: float,
             top_k: int, top_p: float, vocab_size: int, use_cache: bool = True) -> jax.Array:
  """`length` tokens [B, length] continuing each row of `prompt` [B, P], each picked by
  `next_token` with its own key (split from `key`, so the same key gives the same
  tokens). use_cache=False runs the whole sequence again for every token (quadratic;
  it is the reference the cache is tested against)."""
  how = dict(temperature=temperature, top_k=top_k, top_p=top_p, vocab_size=vocab_size)
  batch, prompt_len = prompt.shape
  # The loops carry the model's arrays and rebuild it in their bodies: an nnx module
  # captured from outside a jax.lax loop cannot be used inside it.
  graphdef, weights = nnx.split(model)
  keys = jax.random.split(key, length)
  if not use_cache:
    tokens = jnp.concatenate([prompt, jnp.zeros((batch, length), jnp.int32)], axis=1)

    def step_without_cache(carry, position_and_key):
      tokens, weights = carry
      position, step_key = position_and_key
      logits = jax.lax.dynamic_index_in_dim(nnx.merge(graphdef, weights)(tokens),
                                            position - 1, axis=1, keepdims=False)
      token = next_token(logits, step_key, **how)
      tokens = jax.lax.dynamic_update_slice_in_dim(tokens, token[:, None], position, 1)
      return (tokens, weights), None

    positions = prompt_len + jnp.arange(length)
    (tokens, _), _ = jax.lax.scan(step_without_cache, (tokens, weights), (positions, keys))
    return tokens[:, prompt_len:]

  logits, cache = model.decode(prompt, model.init_cache(batch, prompt_len + length), 0)
  first = next_token(logits[:, -1], keys[0], **how)

  def step_with_cache(carry, position_and_key):
    token, cache, weights = carry
    position, step_key = position_and_key
    logits, cache = nnx.merge(graphdef, weights).decode(token[:, None], cache, position)
    token = next_token(logits[:, -1], step_key, **how)
    return (token, cache, weights), token

  positions = prompt_len + jnp.arange(length - 1)  # where each fed-back token sits
  _, rest = jax.lax.scan(step_with_cache, (first, cache, weights), (positions, keys[1:]))
  return jnp.concatenate([first[:, None], rest.T], axis=1)


def sample_texts(config, workdir: str, prompt: str, *, length: int, num_samples: int = 1,
                 seed: int = 0, temperature: float = 0.8, top_k: int = 0,
                 top_p: float = 1.0, step: Optional[int] = None, devices=None) -> list[str]:
  """`num_samples` continuations of `prompt` by the run in `workdir`, as text (the
  prompt included, decoded with the continuation so that tokenizers which join pieces,
  like SentencePiece's spaces, join them across the boundary)."""
  _, params, run = saved_run.restore_params(config, workdir, step, devices)
  model = nnx.merge(run.graphdef, params, run.rest)
  tokenizer = data_lib.make_tokenizer(run.config.data.tokenizer)
  # Training documents follow an EOS, so a prompt starts after one too.
  ids = np.concatenate([[tokenizer.eos_id], tokenizer.encode(prompt)]).astype(np.int32)
  # Rows are split over the data-parallel devices: pad to a multiple of them.
  parallel = mesh_lib.data_parallel_size(run.mesh, run.rules)
  rows = math.ceil(num_samples / parallel) * parallel
  replicated = jax.sharding.NamedSharding(run.mesh, jax.sharding.PartitionSpec())
  batch = jax.device_put(np.tile(ids, (rows, 1)), replicated)  # the same on every process
  with jax.set_mesh(run.mesh), nnx.logical_axis_rules(run.rules):
    tokens = generate(model, batch, jax.random.PRNGKey(seed), length=length,
                      temperature=temperature, top_k=top_k, top_p=top_p,
                      vocab_size=tokenizer.vocab_size)
  tokens = multihost_utils.process_allgather(tokens, tiled=True)  # rows on other hosts too
  texts = []
  for row in tokens[:num_samples]:
    ends = np.flatnonzero(row == tokenizer.eos_id)
    texts.append(tokenizer.decode(np.concatenate([ids, row[:ends[0]] if ends.size else row])))
  return texts


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments {argv[1:]}.")
  for name, ok, rule in (("length", _LENGTH.value >= 1, ">= 1"),
                         ("num_samples", _NUM_SAMPLES.value >= 1, ">= 1"),
                         ("temperature", _TEMPERATURE.value >= 0, ">= 0"),
                         ("top_k", _TOP_K.value >= 0, ">= 0 (0: all tokens)"),
                         ("top_p", 0 < _TOP_P.value <= 1, "in (0, 1] (1: all tokens)")):
    if not ok:
      raise app.UsageError(f"--{name}={flags.FLAGS[name].value} must be {rule}.")
  config = flags.FLAGS.config
  distributed.initialize(config.distributed)
  texts = sample_texts(config, flags.FLAGS.workdir, _PROMPT.value, length=_LENGTH.value,
                       num_samples=_NUM_SAMPLES.value, seed=_SEED.value,
                       temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
                       top_p=_TOP_P.value, step=flags.FLAGS.step)
  if jax.process_index() == 0:
    for i, text in enumerate(texts):
      print(f"--- sample {i}" if len(texts) > 1 else "---")
      print(text)


if __name__ == "__main__":
  saved_run.define_flags(sys.argv)
  app.run(saved_run.one_line_errors(main))
