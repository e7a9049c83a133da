"""The pre-launch check (--dry_run): bytes per device of the sharded state, and ahead-of-
time compiles for TPU topologies on this CPU-only machine."""

import importlib.util
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from jax.experimental import mesh_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import models
from trainer import dry_run
from trainer import hardware
from trainer import mesh as mesh_lib
from trainer import setup as setup_lib
from trainer_utils import REPO, tiny_config

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="compiling for a TPU topology needs libtpu: pip install -e '.[tpu]'")

# configs/llm_tpu.py with its model shrunk to compile in about a minute on 2 cores.
SMALL_MODEL = ("model.d_model=256", "model.num_layers=2", "model.num_heads=4",
               "model.num_kv_heads=2", "model.mlp_dim=512", "model.vocab_size=2048",
               "model.max_seq_len=256", "data.seq_len=256")


def dry_run_llm_tpu(*overrides) -> subprocess.CompletedProcess:
  """The check as a user runs it: no topology given, so the config's own (v5p:2x2x2)."""
  command = [sys.executable, "-m", "trainer.main", "--config", "configs/llm_tpu.py:v5p-16",
             "--dry_run", *[f"--config.{o}" for o in overrides]]
  return subprocess.run(command, cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                        capture_output=True, text=True, timeout=600)


def test_reported_bytes_per_device_are_those_of_the_sharded_state():
  config = tiny_config()
  config.mesh.shape = (2, 2, 2)
  report = dry_run.check(config, unroll_for_cost=False)  # the 8 local devices

  run = setup_lib.build_setup(config)
  with jax.set_mesh(run.mesh):
    state = run.init_state()
  first = jax.devices()[0]
  on_first = lambda tree: sum(shard.data.nbytes for leaf in jax.tree.leaves(tree)
                              for shard in leaf.addressable_shards if shard.device == first)
  assert report.params_bytes == on_first(state.params)
  assert report.opt_state_bytes == on_first(state.opt_state)
  assert report.params_bytes < sum(x.nbytes for x in jax.tree.leaves(state.params)) / 2
  assert (report.target, report.num_devices, report.mesh_shape) == (
      "local devices", 8, {"data": 2, "fsdp": 2, "tensor": 2})
  assert report.step_bytes > report.params_bytes + report.opt_state_bytes
  assert report.fits is None  # CPUs have no memory figure
  assert any(line.startswith("  optimizer state") for line in report.lines())
  assert report.cost.loops > 0  # XLA's own count of the looped step, and it says so
  assert any("XLA counts a loop's body once" in line for line in report.lines())


def test_activations_split_by_batch_cut_the_step_memory_on_an_fsdp_mesh(monkeypatch):
  # Each block pins the residual stream to the batch split. Without that, XLA follows the
  # weights' FSDP split and keeps whole activations on every device.
  config = tiny_config()
  config.mesh.shape = (1, 8, 1)
  pinned = dry_run.check(config, unroll_for_cost=False).memory.temp_size_in_bytes
  monkeypatch.setattr(models.transformer, "constrain", lambda x, axes: x)
  loose = dry_run.check(config, unroll_for_cost=False).memory.temp_size_in_bytes
  assert 2 * pinned < loose, (pinned, loose)


@needs_libtpu
@pytest.mark.slow
def test_llm_tpu_compiles_for_its_v5p_slice_on_this_cpu_and_fits():
  result = dry_run_llm_tpu(*SMALL_MODEL)  # no data or tokenizer on this machine: unread
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.splitlines()
  assert lines[0] == ("Target: v5p:2x2x2, 8 x TPU v5 on 2 host(s), mesh {'data': 1, "
                      "'fsdp': 4, 'tensor': 2}")
  total = next(line for line in lines if line.startswith("  total"))
  assert total.endswith("of 95.00 GiB per chip (0%): fits")


@needs_libtpu
def test_a_step_too_big_for_the_chip_fails_the_check():
  result = dry_run_llm_tpu("model.remat=none")  # the full 1B model, nothing rematerialized
  assert result.returncode == 1, result.stderr[-3000:]
  assert "DOES NOT FIT: the compiler refused it: RESOURCE_EXHAUSTED" in result.stdout
  assert "model.remat='full'" in result.stdout  # and says what to change


def test_collectives_are_counted_with_their_bytes_in_a_compiled_program():
  # One collective of each kind, on the 8 local devices, with known result sizes.
  mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,))

  def body(a, b, c, d, e):
    return (jax.lax.psum(a, "x"), jax.lax.all_gather(b, "x", tiled=True),
            jax.lax.psum_scatter(c, "x", tiled=True), jax.lax.all_to_all(d, "x", 0, 0, tiled=True),
            jax.lax.ppermute(e, "x", [(i, (i + 1) % 8) for i in range(8)]))

  step = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("x"), check_vma=False,
                               out_specs=(P(), P(), P("x"), P("x"), P("x"))))
  arg = jax.ShapeDtypeStruct((8 * 16,), jnp.float32, sharding=NamedSharding(mesh, P("x")))
  cost = dry_run.Cost.of(step.lower(*[arg] * 5).compile())
  # Per device: 16 floats reduced, 128 gathered, 2 scattered, 16 exchanged, 16 passed on.
  assert cost.collectives == {"all-reduce": (1, 64), "all-gather": (1, 512),
                              "reduce-scatter": (1, 8), "all-to-all": (1, 64),
                              "collective-permute": (1, 64)}
  assert cost.collective_bytes == 712 and cost.bytes_accessed > 0


def test_async_collectives_count_their_results_once():
  # TPU programs start and finish collectives apart; a gather's start holds operands then
  # results (a permute's then two u32[] of context, as XLA writes them for a TPU), an
  # all-reduce's its results; the -done ops are not counted again.
  hlo = """
    %ags = ((f32[2]{0}, bf16[4]{0}), (f32[16]{0}, bf16[32]{0})) all-gather-start(%a, %b)
    %agd = (f32[16]{0}, bf16[32]{0}) all-gather-done(%ags)
    %ars = f32[4,4]{1,0} all-reduce-start(%c), to_apply=%add
    %ard = f32[4,4]{1,0} all-reduce-done(%ars)
    %fusion = f32[16]{0} fusion(f32[16]{0} %agd), calls=%all-gather.clone
    %cps = (f32[1024]{0:T(1024)}, f32[1024]{0:T(1024)}, u32[]{:S(2)}, u32[]{:S(2)}) collective-permute-start(%d), source_target_pairs={{0,1},{1,0}}
    %cpd = f32[1024]{0:T(1024)} collective-permute-done(%cps)
  """
  found = dry_run.collectives(hlo)
  assert found["all-gather"] == (1, 16 * 4 + 32 * 2)
  assert found["all-reduce"] == (1, 64)
  assert found["collective-permute"] == (1, 1024 * 4)  # the result, not the u32[] context
  assert found["all-to-all"] == (0, 0)


def test_dry_run_compare_prints_both_optimizers_costs_and_ratios(capsys):
  config = tiny_config()
  config.mesh.shape = (2, 2, 2)
  assert dry_run.main(config, "", compare="adamw") == 0
  out = capsys.readouterr().out
  assert "Compiled train step cost per device (kron):" in out
  comparison = out[out.index("Per device, kron vs adamw:"):].splitlines()
  rows = {line.split()[0]: line for line in comparison[2:]}
  assert {"flops", "bytes", "all-reduce", "collectives,", "compile", "optimizer"} <= set(rows)
  assert rows["flops"].rstrip().endswith("x")  # a ratio on every row
  # Ratios are report / other: checked on the optimizer state's row against the bytes
  # of both optimizers' states, counted here.
  state_bytes = {}
  for name in ("kron", "adamw"):
    other = config.copy_and_resolve_references()
    other.optimizer.name = name
    state_bytes[name] = dry_run.bytes_per_device(
        setup_lib.build_setup(other).abstract_state.opt_state)
  printed = float(re.search(r"([\d.]+)x$", rows["optimizer"].rstrip()).group(1))
  assert printed == pytest.approx(state_bytes["kron"] / state_bytes["adamw"], abs=0.006)
  # The scanned layers were counted unrolled: no loop is left to be counted once.
  assert "XLA counts a loop's body once" not in out


def test_the_cost_counts_every_layer_and_microbatch_though_xla_counts_a_loop_once():
  config = tiny_config(microbatches=2, global_batch_size=16)
  config.model.num_layers = 4
  config.optimizer.name = "adamw"  # a few flops per parameter: the model's are the bulk
  report = dry_run.check(config)
  run = setup_lib.build_setup(config)
  tokens = config.train.global_batch_size * config.data.seq_len
  model_flops = run.flops_per_token * tokens / jax.device_count()  # per device
  assert report.cost.loops == 0
  assert model_flops <= report.cost.flops < 1.2 * model_flops, (report.cost, model_flops)
  # The step as it runs loops over 2 microbatches, each with a forward and a backward
  # loop over 4 layers, and XLA's own count of it holds about one pass of each loop.
  with jax.set_mesh(run.mesh):
    looped = dry_run.Cost.of(
        run.train_step.lower(run.abstract_state, run.abstract_batch()).compile())
  assert looped.loops == 3
  assert looped.flops < 0.3 * model_flops, (looped, model_flops)


def test_loops_of_random_bits_alone_are_not_counted_as_loops():
  hlo = """
    %w1 = (s32[], u32[2,3]{1,0}, u32[4]{0}) while(%t1), condition=%c1, body=%b1
    %w2 = (s32[], f32[8,8]{1,0}) while(%t2), condition=%c2, body=%b2
    %w3 = (s32[], bf16[4]{0}) while(%t3), condition=%c3, body=%b3
  """
  assert dry_run.loops(hlo) == 2


@pytest.mark.slow
@pytest.mark.parametrize("nodes", [1, 2])
def test_llm_gpu_builds_and_compiles_on_as_many_fake_devices_as_it_has_gpus(nodes):
  gpus = 8 * nodes
  command = [sys.executable, "-m", "trainer.main", "--config", f"configs/llm_gpu.py:{nodes}",
             "--dry_run", *[f"--config.{o}" for o in SMALL_MODEL]]
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={gpus} "
                      "--xla_cpu_enable_concurrency_optimized_scheduler=false"}
  result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"{gpus} x cpu on 1 host(s), mesh {{'data': 1, 'fsdp': {gpus}, 'tensor': 1}}" in (
      result.stdout)
  assert "Compiled train step cost per device (kron):" in result.stdout


@needs_libtpu
@pytest.mark.parametrize("topology, shape", [("v5p:2x2x2", (1, 4, 2)), ("v5p:4x4x4", (1, 32, 2))])
def test_the_dry_run_lays_out_the_mesh_a_run_on_the_slice_builds(topology, shape):
  """Topology devices report the coordinates and kind of a real slice's. Where
  jax.make_mesh has a layout, the run's mesh is it; where it has none (a tensor axis of
  2 on the 4x4x4 torus), both split physical axes instead of failing on the slice."""
  devices = dry_run.target_devices(topology)
  mesh = mesh_lib.make_mesh(("data", "fsdp", "tensor"), shape, devices)
  assert dict(mesh.shape) == dict(zip(("data", "fsdp", "tensor"), shape))
  try:
    expected = jax.make_mesh(shape, ("data", "fsdp", "tensor"), devices=devices).devices
  except NotImplementedError:
    assert topology == "v5p:4x4x4"
    expected = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  assert [d.id for d in mesh.devices.flat] == [d.id for d in expected.flat]


@needs_libtpu
def test_a_mesh_whose_batch_axes_do_not_split_the_batch_over_processes_is_refused():
  """v5p:2x2x2 is 2 hosts of 4 chips. With the batch axes 1 wide the batch would be
  replicated over both, each feeding its own rows for it: refused before any compile."""
  devices = dry_run.target_devices("v5p:2x2x2")
  config = tiny_config(global_batch_size=8)
  rules = tuple(tuple(rule) for rule in config.mesh.rules)
  replicated = mesh_lib.make_mesh(("data", "fsdp", "tensor"), (1, 1, 8), devices)
  with pytest.raises(ValueError, match=r"do not split the batch over the 2 processes"):
    setup_lib._check_batch(config, replicated, rules)
  split = mesh_lib.make_mesh(("data", "fsdp", "tensor"), (2, 1, 4), devices)
  setup_lib._check_batch(config, split, rules)


@pytest.mark.parametrize("kind, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H100 NVL", 835e12), ("TPU v5 lite", 197e12), ("TPU v5p", 459e12),
    ("cpu", None)])
def test_peak_flops_take_the_longest_device_kind_that_matches(kind, peak):
  """MFU's denominator: an H100 PCIe card is not rated as the SXM part."""
  assert hardware._by_kind(hardware.PEAK_FLOPS, kind) == peak  # pylint: disable=protected-access
