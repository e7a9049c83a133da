"""Using a trained run: evaluate its checkpoints and sample from it, from the command line."""

import json
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from trainer import main as trainer_main
from trainer import sample, saved_run
from trainer_utils import REPO, read_metrics, tiny_config, trainer_env


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  """A tiny run on one device with evals (and checkpoints) at steps 10 and 20."""
  workdir = tmp_path_factory.mktemp("trained_run")
  trainer_main.train(tiny_config(steps=20, eval_every=10), str(workdir),
                     devices=jax.devices()[:1])
  return workdir


def _tool(module, workdir, *args) -> subprocess.CompletedProcess:
  """`python -m trainer.<module> --workdir <relative path> ...`, run as a user would."""
  return subprocess.run(
      [sys.executable, "-m", f"trainer.{module}", "--workdir", workdir.name, *args],
      cwd=workdir.parent, env=trainer_env(), capture_output=True, text=True, timeout=600)


def _files(workdir) -> list[tuple[str, int]]:
  return sorted((str(p.relative_to(workdir)), p.stat().st_mtime_ns)
                for p in workdir.rglob("*"))


def test_eval_reproduces_the_runs_eval_loss_of_any_step_and_writes_nothing(trained_run):
  logged = {m["step"]: m for m in read_metrics(trained_run) if "eval/loss" in m}
  assert sorted(logged) == [10, 20]
  before = _files(trained_run)
  for args, step in (((), 20), (("--step", "10"), 10)):
    result = _tool("eval", trained_run, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["step"] == step
    assert report["eval/loss"] == logged[step]["eval/loss"]  # exactly: same params, data
    assert report["eval/bits_per_byte"] == logged[step]["eval/bits_per_byte"]
  assert _files(trained_run) == before

  # Another eval set, through the config overrides: fewer batches, another loss; a
  # tuple-valued setting (saved as a JSON list) overrides too.
  result = _tool("eval", trained_run, "--config.data.eval_batches=1",
                 "--config.mesh.shape=(1,1,1)")
  assert result.returncode == 0, result.stderr[-3000:]
  one_batch = json.loads(result.stdout.strip().splitlines()[-1])
  assert one_batch["step"] == 20 and one_batch["eval/loss"] != logged[20]["eval/loss"]


def test_eval_of_a_directory_that_is_no_run_says_so(tmp_path):
  (tmp_path / "empty").mkdir()
  result = _tool("eval", tmp_path / "empty")
  assert result.returncode != 0
  assert "--workdir must be the workdir of a run" in result.stderr


@pytest.mark.parametrize("module, args, said", [
    ("eval", ("--step", "15"), "15"),  # no checkpoint at that step
    ("sample", ("--step", "15"), "15"),
    ("eval", ("--config.data.eval_split=test",), "data.eval_split='test'"),  # no such split
])
def test_a_step_or_split_the_run_lacks_is_one_line_naming_it(trained_run, module, args,
                                                              said):
  result = _tool(module, trained_run, *args)
  assert result.returncode == 1
  assert "Traceback" not in result.stderr
  assert result.stderr.strip().splitlines()[-1].startswith("Error: ")
  assert said in result.stderr.strip().splitlines()[-1]


def test_a_run_in_a_workdir_named_checkpoints_reads_back(trained_run, tmp_path):
  """Readers take a workdir or its checkpoints directory; a workdir may itself be named
  checkpoints."""
  workdir = tmp_path / "checkpoints"
  shutil.copytree(trained_run, workdir)
  config = saved_run.load_config(str(workdir))
  for path in (workdir, workdir / "checkpoints"):
    step, params, _ = saved_run.restore_params(config, str(path), devices=jax.devices()[:1])
    assert step == 20 and jax.tree.leaves(params)


def _tiny_model(scan_layers: bool, num_kv_heads=None):
  config = tiny_config().model.to_dict()
  config.update(scan_layers=scan_layers, num_kv_heads=num_kv_heads, num_heads=4)
  return models.build(config, nnx.Rngs(3))


@pytest.mark.parametrize("scan_layers, num_kv_heads", [(True, None), (False, 2)])
def test_decoding_with_the_cache_gives_the_full_forward_pass_logits(scan_layers, num_kv_heads):
  model = _tiny_model(scan_layers, num_kv_heads)
  tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 12), 0, 257)
  cache = model.init_cache(2, 16)
  logits, cache = model.decode(tokens[:, :5], cache, 0)  # a prompt, then token by token
  pieces = [logits]
  for position in range(5, 12):
    logits, cache = model.decode(tokens[:, position:position + 1], cache, position)
    pieces.append(logits)
  np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), model(tokens), atol=2e-5)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_greedy_decoding_with_the_cache_equals_decoding_without_it(scan_layers):
  model = _tiny_model(scan_layers)
  prompt = jax.random.randint(jax.random.PRNGKey(1), (3, 7), 0, 257)
  how = dict(length=20, temperature=0.0, top_k=0, top_p=1.0, vocab_size=257)
  cached = sample.generate(model, prompt, jax.random.PRNGKey(0), **how)
  uncached = sample.generate(model, prompt, jax.random.PRNGKey(0), use_cache=False, **how)
  assert cached.shape == (3, 20)
  np.testing.assert_array_equal(cached, uncached)
  assert len(np.unique(np.asarray(cached))) > 1  # not a constant


def test_next_token_keeps_to_top_k_top_p_and_the_tokenizers_vocabulary():
  logits = jnp.log(jnp.array([[0.05, 0.4, 0.3, 0.15, 0.1, 0.0]]))  # the last id is padding
  logits = jnp.where(jnp.isfinite(logits), logits, 50.0)  # padding would win if allowed
  draws = lambda **how: {int(sample.next_token(logits, jax.random.PRNGKey(i), **how)[0])
                         for i in range(300)}
  base = dict(temperature=1.0, top_k=0, top_p=1.0, vocab_size=5)
  assert draws(**base) == {0, 1, 2, 3, 4}
  assert draws(**{**base, "top_k": 2}) == {1, 2}
  assert draws(**{**base, "top_p": 0.65}) == {1, 2}  # 0.4 + 0.3 reaches 0.65
  assert draws(**{**base, "top_p": 0.75}) == {1, 2, 3}
  assert draws(**{**base, "temperature": 0.0}) == {1}


def test_sample_from_the_command_line_is_deterministic_per_seed(trained_run):
  args = ("--prompt", "def ", "--length", "24", "--num_samples", "2", "--top_k", "20")
  first, again, other = (_tool("sample", trained_run, *args, "--seed", seed)
                         for seed in ("0", "0", "1"))
  for result in (first, again, other):
    assert result.returncode == 0, result.stderr[-3000:]
  assert first.stdout == again.stdout and first.stdout != other.stdout
  samples = first.stdout.split("--- sample ")[1:]
  assert len(samples) == 2 and all(s.split("\n", 1)[1].startswith("def ") for s in samples)


def test_sample_on_the_8_device_mesh_the_run_used_equals_one_device(trained_run):
  config = saved_run.load_config(str(trained_run))
  how = dict(length=16, num_samples=3, seed=4, temperature=0.0)
  on_one = sample.sample_texts(config, str(trained_run), "import ", devices=jax.devices()[:1],
                               **how)
  on_eight = sample.sample_texts(config, str(trained_run), "import ", **how)
  assert len(jax.devices()) == 8 and on_one == on_eight
