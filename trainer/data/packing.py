"""Packs a stream of token arrays into fixed-length rows, checkpointably."""

from typing import Any

import grain
import numpy as np

_NO_TOKENS = np.zeros(0, np.int32)


class PackedRows(grain.IterDataset):
  """Concatenates token arrays end to end and cuts the stream into rows of `length`.

  Documents continue across row boundaries, so no token is dropped and nothing is padded
  until the input runs out; the last row is then padded with `pad_id`. Rows are
  {'tokens': int32[length], 'mask': bool[length]}, mask False on padding.
  """

  def __init__(self, parent: grain.IterDataset, length: int, pad_id: int = 0):
    super().__init__(parent)
    self._length = length
    self._pad_id = pad_id

  def __iter__(self) -> grain.DatasetIterator:
    return _PackedRowsIterator(self._parent.__iter__(), self._length, self._pad_id)


class _PackedRowsIterator(grain.DatasetIterator):
  """State is the parent's state before the current document plus an offset into it.

  No tokens go into the checkpoint: a restore re-reads that one document and skips the
  offset, which is exact because the parent is deterministic.
  """

  def __init__(self, parent: grain.DatasetIterator, length: int, pad_id: int):
    super().__init__(parent)
    self._length = length
    self._pad_id = pad_id
    self._doc = _NO_TOKENS
    self._offset = 0
    self._doc_state = self._parent.get_state()

  def __next__(self) -> dict[str, np.ndarray]:
    tokens = np.full(self._length, self._pad_id, np.int32)
    filled = 0
    while filled < self._length:
      if self._offset == len(self._doc):
        state = self._parent.get_state()
        try:
          doc = next(self._parent)
        except StopIteration:
          if filled == 0:
            raise
          break
        self._doc, self._offset, self._doc_state = doc, 0, state
      n = min(self._length - filled, len(self._doc) - self._offset)
      tokens[filled:filled + n] = self._doc[self._offset:self._offset + n]
      filled += n
      self._offset += n
    return {"tokens": tokens, "mask": np.arange(self._length) < filled}

  def get_state(self) -> dict[str, Any]:
    return {"parent": self._doc_state, "offset": self._offset}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._doc_state = state["parent"]
    self._offset = state["offset"]
    self._doc = next(self._parent) if self._offset else _NO_TOKENS
