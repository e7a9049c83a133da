"""Multi-host: two processes on this machine form one JAX system (jax.distributed, gloo
collectives on CPU), train exactly like one process on the same 4-device mesh, and leave
a checkpoint that one process resumes."""

import re
import signal
import socket
import subprocess
import time

import jax
import numpy as np
import pytest

from jax.experimental import multihost_utils

from configs import common
from trainer import checkpoint as checkpoint_lib
from trainer import data as data_lib
from trainer import distributed
from trainer import setup as setup_lib
from trainer_utils import (REPO, losses_by_step, read_metrics, run_trainer, tiny_config,
                           trainer_command, trainer_env)

STEPS, STOP = 8, 5
# On top of trainer_command's tiny model: what tiny_config(steps=STEPS) also says.
SETTINGS = (f"train.steps={STEPS}", "train.log_every=1", "checkpoint.save_every=5",
            "optimizer.learning_rate=0.03")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start_process(workdir, index: int, port: int, log_path,
                  *overrides: str) -> subprocess.Popen:
  """Process `index` of 2, with 2 CPU devices of its own."""
  env = {**trainer_env(), "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=2 "
                      "--xla_cpu_enable_concurrency_optimized_scheduler=false"}
  command = trainer_command(
      workdir, *SETTINGS, *overrides, "distributed.mode=manual",
      f"distributed.coordinator_address=127.0.0.1:{port}", "distributed.num_processes=2",
      f"distributed.process_id={index}")
  with open(log_path, "w") as log:  # a file, not a pipe: a full pipe would stall a process
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def losses_when_fed(config, shards: tuple[int, ...], steps: int) -> list[float]:
  """Per-step losses of this process on 4 devices when each global batch is the
  concatenation of the batches the pipeline gives process p of 2, for p in `shards`."""
  run = setup_lib.build_setup(config, jax.devices()[:4])
  iterators = [data_lib.make_train_iterator(config.data, config.train.global_batch_size, p,
                                            len(shards)) for p in shards]
  losses = []
  with jax.set_mesh(run.mesh):
    state = run.init_state()
    for _ in range(steps):
      parts = [next(it) for it in iterators]
      batch = {k: jax.device_put(np.concatenate([part[k] for part in parts]),
                                 run.batch_sharding) for k in parts[0]}
      state, metrics = run.train_step(state, batch)
      losses.append(float(metrics["train/loss"]))
  return losses


@pytest.mark.slow
@pytest.mark.exclusive
def test_two_processes_train_like_one_and_one_process_resumes_them(tmp_path):
  workdir, port = tmp_path / "run", free_port()
  logs = [tmp_path / f"process_{i}.log" for i in range(2)]
  processes = [start_process(workdir, i, port, logs[i], f"train.stop_at={STOP}")
               for i in range(2)]
  try:
    codes = [p.wait(timeout=600) for p in processes]
  finally:
    for p in processes:
      if p.poll() is None:
        p.kill()
  assert codes == [0, 0], "\n".join(log.read_text()[-3000:] for log in logs)
  assert "process 1 of 2" in logs[1].read_text()

  # Only process 0 wrote metrics: one line per step.
  assert [m["step"] for m in read_metrics(workdir)] == list(range(1, STOP + 1))
  two = losses_by_step(workdir)

  # Each process read its own shard (documents p, p + 2, ...) into its own rows of the
  # global batch: the losses are those of one process on the same mesh fed both shards.
  config = tiny_config(steps=STEPS)
  expected = losses_when_fed(config, (0, 1), STOP)
  np.testing.assert_allclose([two[s] for s in range(1, STOP + 1)], expected, rtol=2e-4)
  # The comparison can tell: had both processes read process 0's shard, step 1 differs.
  both_read_shard_0 = losses_when_fed(config, (0, 0), 1)[0]
  assert abs(both_read_shard_0 - two[1]) > 20 * 2e-4 * two[1]

  # One process cannot take over the two processes' data positions: refused, naming
  # the setting; with it, one process (one device) resumes the state and trains on.
  refused = run_trainer(workdir, *SETTINGS, timeout=600)
  assert refused.returncode == 1 and "checkpoint.restart_data=True" in refused.stderr
  result = run_trainer(workdir, *SETTINGS, "checkpoint.restart_data=True", timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"Starting at step {STOP}" in result.stderr
  assert "data stream starts afresh" in result.stderr
  resumed = losses_by_step(workdir)
  assert sorted(resumed) == list(range(1, STEPS + 1))
  assert resumed[STOP + 1] < two[1] - 0.3  # trained params, not a fresh model


def _signal_one_of_two(tmp_path, name: str, signum, ready, *overrides):
  """Start two processes on the run in tmp_path/run, send `signum` to process 1 once
  ready(workdir, process 1's log text) holds, and wait for both; returns (exit codes,
  the steps each said it saved and stopped at, both logs)."""
  workdir, port = tmp_path / "run", free_port()
  logs = [tmp_path / f"{name}_{i}.log" for i in range(2)]
  processes = [start_process(workdir, i, port, logs[i], *overrides) for i in range(2)]
  try:
    deadline = time.time() + 300
    while not ready(workdir, logs[1].read_text() if logs[1].exists() else ""):
      assert time.time() < deadline and all(p.poll() is None for p in processes), (
          "\n".join(log.read_text()[-3000:] for log in logs))
      time.sleep(0.05)
    processes[1].send_signal(signum)
    codes = [p.wait(timeout=300) for p in processes]
  finally:
    for p in processes:
      if p.poll() is None:
        p.kill()
  texts = [log.read_text() for log in logs]
  saved = [re.findall(r"Saved step (\d+) and stopped", text) for text in texts]
  assert "Traceback" not in texts[0] + texts[1], "\n".join(t[-3000:] for t in texts)
  return codes, saved, texts


def _logged_at_least(steps):
  return lambda workdir, _: ((workdir / "metrics.jsonl").exists() and
                             len(read_metrics(workdir)) >= steps)


@pytest.mark.slow
@pytest.mark.exclusive
@pytest.mark.parametrize("signum, codes", [(signal.SIGTERM, [0, 0]), (signal.SIGINT, [0, 130])],
                         ids=["sigterm", "ctrl_c"])
def test_a_signal_to_one_process_stops_both_at_the_same_saved_step(tmp_path, signum, codes):
  exit_codes, saved, texts = _signal_one_of_two(
      tmp_path, "run", signum, _logged_at_least(3), "train.steps=100000",
      "checkpoint.save_every=100000")
  assert exit_codes == codes, "\n".join(text[-3000:] for text in texts)
  assert len(saved[0]) == len(saved[1]) == 1 and saved[0] == saved[1], saved
  step = int(saved[0][0])
  assert step >= 3
  assert (tmp_path / "run" / "checkpoints" / str(step) / "_CHECKPOINT_METADATA").exists()


@pytest.mark.slow
@pytest.mark.exclusive
def test_a_preemption_in_a_resumed_run_stops_it_at_one_agreed_step(tmp_path):
  """The sync service counts steps from this run's start: a notice during the restore
  of a run resumed at step 2 stops both processes after step 3, the first they take;
  a notice some steps into a run resumed at step 3 stops both at one step, saved once."""
  port = free_port()
  processes = [start_process(tmp_path / "run", i, port, tmp_path / f"first_{i}.log",
                             "train.stop_at=2") for i in range(2)]
  assert [p.wait(timeout=600) for p in processes] == [0, 0]
  joined = lambda _, log: "jax.distributed: process 1 of 2" in log
  exit_codes, saved, texts = _signal_one_of_two(
      tmp_path, "resumed", signal.SIGTERM, joined, "train.steps=100000")
  assert exit_codes == [0, 0], "\n".join(text[-3000:] for text in texts)
  assert all("Starting at step 2" in text for text in texts)
  assert saved == [["3"], ["3"]], saved

  # A notice later in a resumed run: both stop at one step and save only that one (the
  # checkpoint manager must not answer the sync service with another count of steps).
  later = lambda workdir, _: read_metrics(workdir)[-1]["step"] >= 7
  exit_codes, saved, texts = _signal_one_of_two(
      tmp_path, "again", signal.SIGTERM, later, "train.steps=100000",
      "checkpoint.save_every=100000")
  assert exit_codes == [0, 0], "\n".join(text[-3000:] for text in texts)
  assert len(saved[0]) == 1 and saved[0] == saved[1], saved
  step = int(saved[0][0])
  assert step >= 7
  saved_since = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir()
                       if int(p.name) > 3)
  assert saved_since == [step]


def test_multi_process_stop_checks_gather_nothing_until_a_signal(monkeypatch):
  """With JAX's preemption service, asking every step costs no collective: the answer
  comes from the service's sync point, and SIGTERM is left to the service's handler."""
  def gathered(*args):
    raise AssertionError("process_allgather called")

  sync_calls = []
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(checkpoint_lib, "_preemption_service_running", lambda: True)
  monkeypatch.setattr(multihost_utils, "process_allgather", gathered)
  monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point",
                      lambda step: sync_calls.append(step) or step == 3)
  before = signal.getsignal(signal.SIGTERM)
  with checkpoint_lib.StopSignals() as signals:
    assert signal.getsignal(signal.SIGTERM) is before
    assert [signals.requested(step) for step in (1, 2, 3)] == [None, None, "SIGTERM"]
  assert sync_calls == [1, 2, 3]
  # A resumed run asks the service with the steps since it started, as it counts them.
  sync_calls.clear()
  with checkpoint_lib.StopSignals(start_step=30) as signals:
    assert [signals.requested(step) for step in (31, 32, 33)] == [None, None, "SIGTERM"]
  assert sync_calls == [1, 2, 3]


def test_ctrl_c_asks_for_a_save_a_second_aborts_and_handlers_come_back():
  before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
  with checkpoint_lib.StopSignals() as signals:
    handler = signal.getsignal(signal.SIGINT)
    assert handler is not before[signal.SIGINT]
    assert signals.requested(1) is None
    handler(signal.SIGINT, None)
    assert signals.requested(2) == "SIGINT"
    with pytest.raises(KeyboardInterrupt):
      handler(signal.SIGINT, None)
  assert {s: signal.getsignal(s) for s in before} == before


def test_manual_mode_reads_what_the_config_leaves_empty_from_the_environment(monkeypatch):
  cfg = common.base_config().distributed
  cfg.mode = "manual"
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
  monkeypatch.setenv("JAX_PROCESS_ID", "3")
  assert distributed.manual_settings(cfg) == ("10.0.0.1:1234", 4, 3)
  cfg.update(dict(coordinator_address="host0:99", num_processes=2, process_id=1))
  assert distributed.manual_settings(cfg) == ("host0:99", 2, 1)  # the config wins
  cfg.process_id = 2
  with pytest.raises(ValueError, match="distributed.process_id=2"):
    distributed.manual_settings(cfg)
  cfg.process_id = None
  monkeypatch.delenv("JAX_PROCESS_ID")
  with pytest.raises(ValueError, match="distributed.process_id"):
    distributed.manual_settings(cfg)


@pytest.mark.parametrize("address", ["10.0.0.1", "node1:", ":12355"])
def test_manual_mode_refuses_a_coordinator_address_without_host_and_port(address):
  """JAX would fail on it with an IndexError naming no setting."""
  cfg = common.base_config().distributed
  cfg.update(dict(mode="manual", coordinator_address=address, num_processes=2,
                  process_id=0))
  with pytest.raises(ValueError, match=r"distributed\.coordinator_address=.* needs "
                                       r"host:port"):
    distributed.manual_settings(cfg)
  cfg.coordinator_address = "[::1]:12355"  # an IPv6 host has colons of its own
  assert distributed.manual_settings(cfg)[0] == "[::1]:12355"


def test_auto_mode_stays_single_process_off_clusters(monkeypatch):
  for name in ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "SLURM_NTASKS",
               "OMPI_COMM_WORLD_SIZE"):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setattr(distributed, "_has_tpu_chips", lambda: False)
  distributed.initialize(common.base_config().distributed)  # would fail after jax started
  assert not jax.distributed.is_initialized()
  monkeypatch.setenv("SLURM_NTASKS", "4")
  assert distributed._cluster_detected()  # pylint: disable=protected-access


def test_auto_mode_on_a_tpu_host_joins_the_slice_unless_told_to_use_the_cpu(monkeypatch):
  """`JAX_PLATFORMS=cpu python -m trainer.eval` beside a training job on a TPU host must
  not join that job's slice."""
  for name in ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "SLURM_NTASKS",
               "OMPI_COMM_WORLD_SIZE"):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setattr(distributed, "_has_tpu_chips", lambda: True)
  for platforms, joins in (("", True), ("tpu", True), ("cpu,tpu", True), ("cpu", False)):
    monkeypatch.setenv("JAX_PLATFORMS", platforms)
    assert distributed._cluster_detected() == joins, platforms  # pylint: disable=protected-access


def test_auto_mode_that_cannot_join_says_how_to_run_alone(monkeypatch):
  """VFIO devices on a machine without TPUs look like chips; JAX then fails with its own
  message, which names none of this launch's settings."""
  for name in ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "SLURM_NTASKS",
               "OMPI_COMM_WORLD_SIZE", "JAX_PLATFORMS"):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setattr(distributed, "_has_tpu_chips", lambda: True)

  def no_peers():
    raise ValueError("coordinator_address should be defined.")
  monkeypatch.setattr(distributed.jax.distributed, "initialize", no_peers)
  with pytest.raises(RuntimeError, match=r"TPU chips.*coordinator_address should be "
                                         r"defined\..*distributed\.mode=off"):
    distributed.initialize(common.base_config().distributed)
