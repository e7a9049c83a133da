"""Tokenizers: raw bytes by default, SentencePiece when a model file is named.

Both map a document (str or bytes) to an int32 id array and expose `vocab_size` and
`eos_id`; the pipeline appends `eos_id` after every document.
"""

import os

import numpy as np
from etils import epath


class ByteTokenizer:
  """Id layout: 0..255 are the byte values themselves, 256 is EOS. Vocabulary 257.

  Needs no files and never fails on input: text is tokenized as its UTF-8 bytes, bytes
  as they are (so non-UTF-8 files round-trip exactly).
  """

  vocab_size = 257
  eos_id = 256

  def encode(self, text: str | bytes) -> np.ndarray:
    if isinstance(text, str):
      text = text.encode("utf-8")
    return np.frombuffer(text, np.uint8).astype(np.int32)

  def decode(self, ids) -> str:
    """UTF-8 text of the byte ids; EOS is dropped and bad UTF-8 (as a model may emit)
    becomes U+FFFD."""
    ids = np.asarray(ids)
    return ids[ids < 256].astype(np.uint8).tobytes().decode("utf-8", errors="replace")


class SentencePieceTokenizer:
  """A trained SentencePiece model, a local file or a gs:// object (with gcsfs installed).
  EOS is the model's own if it has one; otherwise one extra id, `piece_size`, is appended
  to the vocabulary."""

  def __init__(self, model_path: str):
    try:
      import sentencepiece  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise ImportError(
          f"Tokenizer {model_path!r} is a SentencePiece model, but the sentencepiece "
          "package is not installed: pip install sentencepiece") from e
    try:
      self._processor = sentencepiece.SentencePieceProcessor(
          model_proto=epath.Path(model_path).read_bytes())
    except RuntimeError as e:  # sentencepiece's parse error names no file
      raise ValueError(f"Tokenizer {model_path!r} is not a SentencePiece .model file "
                       f"({e}): give the path of one, or 'bytes'.") from e
    pieces = self._processor.get_piece_size()
    own_eos = self._processor.eos_id()
    self.eos_id = own_eos if own_eos >= 0 else pieces
    self.vocab_size = pieces if own_eos >= 0 else pieces + 1

  def encode(self, text: str | bytes) -> np.ndarray:
    if isinstance(text, bytes):
      text = text.decode("utf-8", errors="replace")
    return np.asarray(self._processor.encode(text), np.int32)

  def decode(self, ids) -> str:
    ids = [int(i) for i in np.asarray(ids).reshape(-1) if i != self.eos_id]
    return self._processor.decode(ids)


def make_tokenizer(name_or_path: str):
  """'bytes' gives the ByteTokenizer; anything else is a path to a SentencePiece model."""
  if name_or_path == "bytes":
    return ByteTokenizer()
  path = os.path.expanduser(name_or_path)
  if not epath.Path(path).is_file():
    raise FileNotFoundError(
        f"Tokenizer {name_or_path!r} is neither 'bytes' nor an existing SentencePiece "
        ".model file.")
  return SentencePieceTokenizer(path)
