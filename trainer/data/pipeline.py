"""grain pipelines from a random-access source of documents to LM batches.

A batch is {'inputs': int32[b, seq_len], 'targets': int32[b, seq_len],
'mask': bool[b, seq_len]}: rows of seq_len + 1 packed tokens, targets the inputs shifted
by one, mask False where the target is padding (only ever at the end of an eval pass).
"""

import itertools
from collections.abc import Iterator
from typing import Any

import grain
import numpy as np

from trainer.data.packing import PackedRows

# Threads that read and tokenize documents ahead of the packer: the host has few cores
# and documents are small, so grain's default of 16 would mostly contend for the GIL.
READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=128)


def document_text(value: Any) -> bytes | str:
  """A text field as str or bytes: TFDS Text features come back as bytes (or a numpy
  bytes scalar), local files as bytes, other sources as str."""
  if isinstance(value, np.ndarray):
    value = value.item()
  if isinstance(value, np.bytes_):
    return bytes(value)
  return value


class Tokenize(grain.transforms.Map):
  """Record -> int32 ids of its text field followed by EOS (module level: picklable)."""

  def __init__(self, tokenizer, text_key: str):
    self._tokenizer = tokenizer
    self._text_key = text_key

  def map(self, record) -> np.ndarray:
    ids = self._tokenizer.encode(document_text(record[self._text_key]))
    return np.append(ids, np.int32(self._tokenizer.eos_id)).astype(np.int32)


def rows_to_batch(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Stacked packed rows [b, seq_len + 1] -> inputs / targets / mask [b, seq_len]."""
  tokens = rows["tokens"]
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": rows["mask"][:, 1:]}


EVAL_ORDER_SEED = 0


def process_shard(source, process_index: int, process_count: int) -> grain.MapDataset:
  """Documents process_index, process_index + process_count, ...: disjoint across
  processes, together everything."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, {process_count}).")
  return grain.MapDataset.source(source)[process_index::process_count]


def train_dataset(source, tokenizer, *, text_key: str, seq_len: int, batch_size: int,
                  seed: int | None, process_index: int = 0,
                  process_count: int = 1) -> grain.IterDataset:
  """Endless batches of this process's shard, reshuffled every epoch.

  seed=None keeps the source order (for tests and debugging). Iterators of the result
  support get_state / set_state, and so grain.checkpoint.CheckpointSave / Restore.
  """
  docs = process_shard(source, process_index, process_count)
  if len(docs) == 0:
    raise ValueError(f"Process {process_index} of {process_count} has no training "
                     "documents.")
  if seed is not None:
    docs = docs.shuffle(seed=seed)
  docs = docs.repeat().map(Tokenize(tokenizer, text_key)).to_iter_dataset(READ_OPTIONS)
  rows = PackedRows(docs, seq_len + 1)
  return rows.batch(batch_size, drop_remainder=True).map(rows_to_batch)


def eval_batches(source, tokenizer, *, text_key: str, seq_len: int, batch_size: int,
                 num_batches: int, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """Exactly `num_batches` batches: one pass over this process's shard in a fixed
  shuffled order, cut off at `num_batches`, and padded with masked-out rows once the
  shard is used up.

  The fixed order spreads a short eval over many documents instead of the first few
  (one long file would otherwise be most of it); the fixed count keeps every process in
  step in collective eval steps even when shards differ in size; the same call always
  yields the same batches.
  """
  docs = process_shard(source, process_index, process_count).shuffle(seed=EVAL_ORDER_SEED)
  docs = docs.map(Tokenize(tokenizer, text_key)).to_iter_dataset(READ_OPTIONS)
  rows = iter(PackedRows(docs, seq_len + 1))
  empty = {"tokens": np.zeros(seq_len + 1, np.int32), "mask": np.zeros(seq_len + 1, bool)}
  for _ in range(num_batches):
    batch = list(itertools.islice(rows, batch_size))
    batch += [empty] * (batch_size - len(batch))
    yield rows_to_batch({k: np.stack([row[k] for row in batch]) for k in empty})
