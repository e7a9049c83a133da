"""What the trainer calls: config.data in, checkpointable train and finite eval batches out."""

from collections.abc import Iterator

import grain
import numpy as np

from trainer.data import pipeline
from trainer.data.sources import open_split
from trainer.data.tokenizers import make_tokenizer


def per_process_batch_size(global_batch_size: int, process_count: int) -> int:
  if global_batch_size % process_count:
    raise ValueError(f"Global batch size {global_batch_size} is not divisible by "
                     f"{process_count} processes.")
  return global_batch_size // process_count


def vocab_size(data_config) -> int:
  return make_tokenizer(data_config.tokenizer).vocab_size


def make_train_iterator(data_config, global_batch_size: int, process_index: int = 0,
                        process_count: int = 1) -> grain.DatasetIterator:
  """Endless batches of global_batch_size / process_count rows from this process's shard.

  Save and restore with get_state / set_state, or with Orbax through
  grain.checkpoint.CheckpointSave(it) / CheckpointRestore(it).
  """
  dataset = pipeline.train_dataset(
      open_split(data_config, data_config.train_split),
      make_tokenizer(data_config.tokenizer),
      text_key=data_config.text_key,
      seq_len=data_config.seq_len,
      batch_size=per_process_batch_size(global_batch_size, process_count),
      seed=data_config.shuffle_seed,
      process_index=process_index,
      process_count=process_count)
  return iter(dataset)


def make_eval_iterator(data_config, global_batch_size: int, process_index: int = 0,
                       process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """A fresh, deterministic pass: exactly data_config.eval_batches batches (see
  pipeline.eval_batches); call again for the next eval."""
  source = open_split(data_config, data_config.eval_split)
  if len(source) == 0:
    raise ValueError(f"Eval split {data_config.eval_split!r} of the "
                     f"{data_config.source!r} source is empty.")
  return pipeline.eval_batches(
      source,
      make_tokenizer(data_config.tokenizer),
      text_key=data_config.text_key,
      seq_len=data_config.seq_len,
      batch_size=per_process_batch_size(global_batch_size, process_count),
      num_batches=data_config.eval_batches,
      process_index=process_index,
      process_count=process_count)
