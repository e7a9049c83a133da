"""The data pipeline: corpus build, splits, tokenizers, packing, sharding, checkpoints."""

import itertools
import json
import sys
import threading

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import common
from trainer import data
from trainer.data import inputs
from trainer.data import pipeline
from trainer.data import splits
from trainer.data import stdlib_corpus
from trainer.data import text_files

EOS = data.ByteTokenizer.eos_id

# Relative paths of the fixture tree; 'pkg/sub/deep.py' and 'e.py' hash into validation.
TREE_FILES = {
    "__init__.py": b"",
    "setup.py": b"from pkg import core\n\ncore.main()\n",
    "util.py": b"def double(x):\n  return 2 * x\n",
    "e.py": b"E = 2.718281828\n",
    "pkg/__init__.py": b'"""The package."""\n',
    "pkg/core.py": b"def main():\n  print('caf\xc3\xa9 \xe2\x80\x94 \xf0\x9f\x90\x8d')\n",
    "pkg/io.py": b"# -*- coding: latin-1 -*-\nNAME = 'Jos\xe9'\n",  # not UTF-8
    "pkg/sub/__init__.py": b'"""Subpackage."""\n',
    "pkg/sub/deep.py": b"import os\n\nDEPTH = len(os.sep)\n",
    "pkg/sub/more.py": b"MORE = [1, 2, 3]\n" * 40,
    "tools/cli.py": b"import sys\n\nif __name__ == '__main__':\n  sys.exit(0)\n",
    "tools/\u00fcn\u00efcode.py": "\u00fcn\u00efcode = '\u65e5\u672c'\n".encode(),
}
SKIPPED_FILES = {
    "site-packages/third_party.py": b"VENDORED = True\n",
    "notes.txt": b"not python\n",
    "pkg/data.json": b"{}\n",
}


def write_tree(root, files):
  for rel, content in files.items():
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
  root = tmp_path_factory.mktemp("tree")
  write_tree(root, TREE_FILES | SKIPPED_FILES)
  return root


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def corpus(tree, tfds_dir):
  return data.load_stdlib_corpus(tfds_dir, source_dir=tree)


def documents(source):
  """{path: text} of a stdlib-corpus data source (TFDS Text comes back as bytes)."""
  records = [source[i] for i in range(len(source))]
  assert all(isinstance(r["text"], bytes) and isinstance(r["path"], bytes) for r in records)
  return {r["path"].decode(): r["text"] for r in records}


def token_stream(batches):
  """The packed rows of `batches` concatenated: each row is inputs + its last target."""
  rows = [np.concatenate([b["inputs"], b["targets"][:, -1:]], axis=1) for b in batches]
  return np.concatenate(rows).reshape(-1)


def docs_in(stream):
  """The complete documents (EOS-terminated) at the start of a token stream."""
  ends = np.flatnonzero(stream == EOS)
  starts = np.concatenate([[0], ends[:-1] + 1])
  return [stream[s:e].astype(np.uint8).tobytes() for s, e in zip(starts, ends)]


def expected_stream(texts):
  return np.concatenate([np.append(np.frombuffer(t, np.uint8), EOS) for t in texts])


def test_split_is_a_fixed_function_of_the_path():
  # Fixed values: a salted or otherwise changed hash would move documents between splits.
  assert [splits.split_of(p) for p in ("pkg/sub/deep.py", "e.py", "pkg/core.py", "a.py")] \
      == ["validation", "validation", "train", "train"]
  fraction = np.mean([splits.split_of(f"m/{i}.py") == "validation" for i in range(4000)])
  assert 0.04 < fraction < 0.06


def test_builder_yields_every_file_once_into_its_hash_split(corpus):
  by_split = {name: documents(source) for name, source in corpus.items()}
  assert set(by_split) == {"train", "validation"}
  assert all(by_split.values()), "both splits must be non-empty for this fixture"
  paths = [p for docs in by_split.values() for p in docs]
  assert sorted(paths) == sorted(TREE_FILES)  # every file, none twice, none skipped wrong
  for name, docs in by_split.items():
    for path, text in docs.items():
      assert splits.split_of(path) == name
      assert text == TREE_FILES[path]


def test_corpus_listing_skips_site_packages_and_non_python(tree):
  assert stdlib_corpus.corpus_files(tree) == sorted(TREE_FILES)


def test_tfds_source_reads_a_prepared_dataset_by_name(tree, tfds_dir, corpus):
  config = common.base_config().data
  name = stdlib_corpus.source_tree_config(tree).name
  config.update(source="tfds", tfds_name=f"python_stdlib/{name}", data_dir=str(tfds_dir),
                seq_len=16, eval_batches=20)
  assert next(data.make_train_iterator(config, 2))["inputs"].shape == (2, 16)
  evaluated = docs_in(token_stream(data.make_eval_iterator(config, 2)))
  assert sorted(evaluated) == sorted(documents(corpus["validation"]).values())


def test_concurrent_loads_build_once(tree, tmp_path):
  results, errors = [], []

  def load():
    try:
      results.append({k: len(v) for k, v in data.load_stdlib_corpus(tmp_path, tree).items()})
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)

  threads = [threading.Thread(target=load) for _ in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors
  assert results[0] == results[1] and sum(results[0].values()) == len(TREE_FILES)


def test_real_stdlib_corpus_builds_and_feeds_the_trainer_entry_points(tmp_path):
  config = common.base_config().data
  config.data_dir = str(tmp_path)
  config.seq_len = 128
  corpus = data.load_stdlib_corpus(tmp_path)
  expected = stdlib_corpus.corpus_files(stdlib_corpus.stdlib_dir())
  assert len(corpus["train"]) + len(corpus["validation"]) == len(expected) > 500
  batch = next(data.make_train_iterator(config, global_batch_size=8, process_index=1,
                                        process_count=2))
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
      "inputs": ((4, 128), np.int32), "targets": ((4, 128), np.int32),
      "mask": ((4, 128), np.bool_)}
  assert len(list(data.make_eval_iterator(config, 8))) == config.eval_batches


def test_train_batches_pack_documents_in_order(corpus):
  source = corpus["train"]
  texts = [source[i]["text"] for i in range(len(source))]
  dataset = pipeline.train_dataset(source, data.ByteTokenizer(), text_key="text", seq_len=16,
                                   batch_size=3, seed=None)
  batches = list(itertools.islice(dataset, 40))
  for b in batches:
    assert {k: (v.shape, v.dtype) for k, v in b.items()} == {
        "inputs": ((3, 16), np.int32), "targets": ((3, 16), np.int32),
        "mask": ((3, 16), np.bool_)}
    np.testing.assert_array_equal(b["targets"][:, :-1], b["inputs"][:, 1:])
    assert b["mask"].all()
  stream = token_stream(batches)
  epoch = expected_stream(texts)
  epochs = len(stream) // len(epoch) + 1
  assert epochs >= 2  # wraps around, in the same order without a seed
  np.testing.assert_array_equal(stream, np.tile(epoch, epochs)[:len(stream)])


def test_shuffled_epochs_cover_every_document_in_new_orders(corpus):
  source = corpus["train"]
  texts = [source[i]["text"] for i in range(len(source))]
  dataset = pipeline.train_dataset(source, data.ByteTokenizer(), text_key="text", seq_len=32,
                                   batch_size=2, seed=3)
  seen = docs_in(token_stream(itertools.islice(dataset, 60)))
  n = len(texts)
  assert len(seen) >= 2 * n
  assert sorted(seen[:n]) == sorted(texts) == sorted(seen[n:2 * n])
  assert seen[:n] != texts and seen[:n] != seen[n:2 * n]


def test_eval_is_one_padded_pass_of_fixed_length(corpus):
  source = corpus["train"]
  texts = [source[i]["text"] for i in range(len(source))]
  config = dict(text_key="text", seq_len=64, batch_size=4)
  batches = list(pipeline.eval_batches(source, data.ByteTokenizer(), num_batches=12,
                                       **config))
  assert len(batches) == 12
  again = list(pipeline.eval_batches(source, data.ByteTokenizer(), num_batches=12, **config))
  assert all((a[k] == b[k]).all() for a, b in zip(batches, again) for k in a)
  order = list(grain.MapDataset.source(list(range(len(texts)))).shuffle(
      seed=pipeline.EVAL_ORDER_SEED))
  assert order != sorted(order)
  epoch = expected_stream([texts[i] for i in order])
  stream = token_stream(batches)
  np.testing.assert_array_equal(stream[:len(epoch)], epoch)  # every token once, fixed order
  assert not stream[len(epoch):].any()  # then padding
  # A target is unmasked exactly when it lies within the pass.
  row_len = config["seq_len"] + 1
  target_position = np.arange(len(stream)).reshape(-1, row_len)[:, 1:]
  mask = np.concatenate([b["mask"] for b in batches])
  np.testing.assert_array_equal(mask, target_position < len(epoch))
  assert not batches[-1]["mask"].any()


@pytest.mark.parametrize("split", ["train", "eval"])
def test_processes_see_disjoint_shards_that_cover_everything(corpus, split):
  source = corpus["train"]
  texts = [source[i]["text"] for i in range(len(source))]
  seen = []
  for index in range(2):
    kwargs = dict(text_key="text", seq_len=32, batch_size=2, process_index=index,
                  process_count=2)
    if split == "train":
      batches = pipeline.train_dataset(source, data.ByteTokenizer(), seed=0, **kwargs)
      docs = docs_in(token_stream(itertools.islice(batches, 40)))
      assert len(docs) > len(texts) // 2 + 1  # got past one epoch of the shard
      docs = set(docs)
    else:
      docs = set(docs_in(token_stream(pipeline.eval_batches(
          source, data.ByteTokenizer(), num_batches=40, **kwargs))))
    seen.append(docs)
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == set(texts)


def test_train_iterator_restores_to_identical_batches(corpus):
  def make():
    return iter(pipeline.train_dataset(corpus["train"], data.ByteTokenizer(),
                                       text_key="text", seq_len=24, batch_size=2, seed=7))

  it = make()
  for _ in range(37):  # past the first epoch
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # as grain's Orbax handler stores it
  assert state["offset"] > 0  # the restore re-reads a document and skips into it
  after = [next(it) for _ in range(25)]
  restored = make()
  restored.set_state(state)
  # A save right after a restore (a run preempted again before its next step) gives
  # the restored position back, and restores to the same batches.
  assert json.loads(json.dumps(restored.get_state())) == state
  again_restored = make()
  again_restored.set_state(json.loads(json.dumps(restored.get_state())))
  again = [next(restored) for _ in range(25)]
  for a, b, c in zip(after, again, [next(again_restored) for _ in range(25)]):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
      np.testing.assert_array_equal(a[k], c[k])


def test_train_iterator_checkpoints_through_orbax(tree, tmp_path):
  config = common.base_config().data
  config.update(source="files", files_glob=str(tree / "**" / "*.py"), seq_len=16)
  it = data.make_train_iterator(config, global_batch_size=2)
  for _ in range(5):
    next(it)
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    manager.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
  after = [next(it) for _ in range(5)]
  restored = data.make_train_iterator(config, global_batch_size=2)
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    manager.restore(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(
        restored)))
  for a, b in zip(after, [next(restored) for _ in range(5)]):
    np.testing.assert_array_equal(a["inputs"], b["inputs"])


def test_byte_tokenizer_round_trips_utf8():
  tokenizer = data.make_tokenizer("bytes")
  text = "def f(x):  # caf\u00e9, \u65e5\u672c\u8a9e, \U0001f40d\n  return x\n"
  ids = tokenizer.encode(text)
  assert ids.dtype == np.int32 and ids.max() < 256
  assert list(ids) == list(text.encode("utf-8"))
  assert tokenizer.decode(ids) == text
  assert tokenizer.decode(np.append(ids, tokenizer.eos_id)) == text
  assert tokenizer.encode(text.encode("utf-8")).tolist() == ids.tolist()
  assert (tokenizer.vocab_size, tokenizer.eos_id) == (257, 256)
  assert data.vocab_size(common.base_config().data) == 257


def test_sentencepiece_tokenizer_errors_are_clear(tmp_path, monkeypatch):
  with pytest.raises(FileNotFoundError, match="neither 'bytes'"):
    data.make_tokenizer(str(tmp_path / "missing.model"))
  model = tmp_path / "sp.model"
  model.write_bytes(b"")
  monkeypatch.setitem(sys.modules, "sentencepiece", None)  # as if not installed
  with pytest.raises(ImportError, match="pip install sentencepiece"):
    data.make_tokenizer(str(model))


def test_sentencepiece_tokenizer_round_trips(tmp_path):
  spm = pytest.importorskip("sentencepiece")
  corpus_text = tmp_path / "corpus.txt"
  corpus_text.write_bytes(b"".join(TREE_FILES.values()).replace(b"\xe9", b"e") * 20)
  spm.SentencePieceTrainer.train(input=str(corpus_text), model_prefix=str(tmp_path / "sp"),
                                 vocab_size=80, eos_id=-1, minloglevel=2)
  tokenizer = data.make_tokenizer(str(tmp_path / "sp.model"))
  assert (tokenizer.vocab_size, tokenizer.eos_id) == (81, 80)  # EOS added past the model
  ids = tokenizer.encode(b"def main():")
  assert ids.dtype == np.int32 and ids.max() < 80
  assert tokenizer.decode(np.append(ids, tokenizer.eos_id)) == "def main():"


def test_files_glob_source(tmp_path):
  files = {f"doc_{i}.txt": f"document {i}\n".encode() * (i + 1) for i in range(14)}
  files["more/deep.txt"] = "nested \u00fc\n".encode()
  write_tree(tmp_path / "corpus", files | {"skip.md": b"# no\n"})
  assert text_files.glob_root(str(tmp_path / "corpus" / "**" / "*.txt")) == str(
      tmp_path / "corpus")
  by_split = text_files.text_file_splits(str(tmp_path / "corpus" / "**" / "*.txt"))
  seen = {}
  for name, source in by_split.items():
    for i in range(len(source)):
      rel = source[i]["path"].split("/corpus/", 1)[1]
      assert splits.split_of(rel) == name
      seen[rel] = source[i]["text"]
  assert seen == files
  assert len(by_split["validation"]) >= 2  # doc_9 and doc_13

  config = common.base_config().data
  config.update(source="files", files_glob=str(tmp_path / "corpus" / "**" / "*.txt"),
                seq_len=8, eval_batches=3)
  batch = next(data.make_train_iterator(config, global_batch_size=4))
  assert batch["inputs"].shape == (4, 8)
  assert len(list(data.make_eval_iterator(config, global_batch_size=4))) == 3


def test_config_errors_are_reported():
  with pytest.raises(ValueError, match="not divisible"):
    inputs.per_process_batch_size(6, 4)
  assert inputs.per_process_batch_size(8, 4) == 2
  config = common.base_config().data
  config.source = "nonsense"
  with pytest.raises(ValueError, match="Unknown data source"):
    data.make_train_iterator(config, global_batch_size=8)
