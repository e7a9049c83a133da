"""Facts about the built-in stdlib corpus: size, splits, build time, byte entropy.

Builds into a fresh temporary data_dir so the build time is a real one, then reads the
splits back through the TFDS data sources the pipeline uses.

    python scripts/corpus_stats.py
"""

import pathlib
import sys
import tempfile
import time

import numpy as np

# The trainer is used from this checkout, not installed: put the checkout on the path.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from trainer.data import stdlib_corpus


def main():
  root = stdlib_corpus.stdlib_dir()
  files = stdlib_corpus.corpus_files(root)
  total = sum((root / f).stat().st_size for f in files)
  with tempfile.TemporaryDirectory() as data_dir:
    start = time.perf_counter()
    corpus = stdlib_corpus.load_stdlib_corpus(data_dir)
    build_s = time.perf_counter() - start
    counts = {}
    for split, source in corpus.items():
      counts[split] = np.zeros(256, np.int64)
      docs = [source[i]["text"] for i in range(len(source))]
      for text in docs:
        counts[split] += np.bincount(np.frombuffer(text, np.uint8), minlength=256)
      print(f"{split:>10}: {len(docs)} files, {counts[split].sum():,} bytes")
  p = counts["train"][counts["train"] > 0] / counts["train"].sum()
  entropy = -(p * np.log(p)).sum()
  print(f"stdlib: {root}\ncorpus: {len(files)} files, {total:,} bytes")
  print(f"build: {build_s:.1f} s (into a fresh data_dir)")
  print(f"train unigram byte entropy: {entropy:.4f} nats/byte ({entropy / np.log(2):.4f} "
        "bits/byte)")


if __name__ == "__main__":
  main()
