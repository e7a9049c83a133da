"""Data input: corpora (stdlib, TFDS, local files), tokenizers and grain pipelines.

The trainer needs only make_train_iterator, make_eval_iterator and vocab_size; see
inputs.py. The settings (config.data) are in configs/common.py.
"""

from trainer.data.inputs import make_eval_iterator
from trainer.data.inputs import make_train_iterator
from trainer.data.inputs import vocab_size
from trainer.data.stdlib_corpus import load_stdlib_corpus
from trainer.data.tokenizers import ByteTokenizer
from trainer.data.tokenizers import make_tokenizer

__all__ = [
    "ByteTokenizer",
    "load_stdlib_corpus",
    "make_eval_iterator",
    "make_tokenizer",
    "make_train_iterator",
    "vocab_size",
]
