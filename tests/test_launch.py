"""The launchers' dry runs print exactly the commands they would run."""

import importlib.util
import pathlib
import shlex
import subprocess
import sys
import tarfile
import time

import pytest

from trainer_utils import REPO



def _load(name):
  spec = importlib.util.spec_from_file_location(name, REPO / f"scripts/{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


launch_gpu, launch_tpu = _load("launch_gpu"), _load("launch_tpu")


def dry_run(script: str, *args, trainer_flags=()) -> list[str]:
  """The lines `python scripts/<script> <args> --dry_run [-- <trainer_flags>]` prints."""
  extra = ["--", *trainer_flags] if trainer_flags else []
  result = subprocess.run([sys.executable, f"scripts/{script}", *args, "--dry_run", *extra],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stderr
  return result.stdout.splitlines()


def test_tpu_launcher_creates_installs_trains_on_every_host_streams_and_deletes():
  lines = dry_run("launch_tpu.py", "--name", "llm1b", "--slice", "v5p-16", "--zone",
                  "us-east5-a", "--project", "my-proj", "--workdir", "gs://bkt/runs/1",
                  trainer_flags=["--config.train.steps=100"])
  where = ["--zone", "us-east5-a", "--project", "my-proj"]
  pack, create, scp, install, train, logs, delete = lines
  assert shlex.split(create) == ["gcloud", "compute", "tpus", "tpu-vm", "create", "llm1b",
                                 "--accelerator-type", "v5p-16", "--version",
                                 "v2-alpha-tpuv5", *where]
  assert pack.startswith("# pack") and pack.endswith(" /tmp/llm1b-psgd-train.tar.gz")
  assert shlex.split(scp) == ["gcloud", "compute", "tpus", "tpu-vm", "scp",
                              "/tmp/llm1b-psgd-train.tar.gz", "llm1b:~/", *where,
                              "--worker=all"]
  ssh = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "llm1b", *where]
  for line, worker in ((install, "all"), (train, "all"), (logs, "0")):
    argv = shlex.split(line)
    assert argv[:-2] == [*ssh, f"--worker={worker}"] and argv[-2] == "--command"
  assert "-e '.[train,tpu,sentencepiece]'" in shlex.split(install)[-1]
  remote_train = shlex.split(train)[-1]
  assert ("~/psgd-venv/bin/python -m trainer.main --config configs/llm_tpu.py:v5p-16 "
          "--workdir gs://bkt/runs/1 --config.train.steps=100") in remote_train
  assert "tail -n +1 -F ~/train.log" in shlex.split(logs)[-1]
  assert shlex.split(delete) == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "llm1b",
                                 "--quiet", *where]


def test_tpu_launcher_queued_resource():
  lines = dry_run("launch_tpu.py", "--name", "big", "--slice", "v5p-128", "--zone", "z1",
                  "--project", "p1", "--workdir", "gs://b/r", "--queued", "--spot",
                  "--steps", "create,train,delete")
  assert [shlex.split(line) for line in lines[::2]] == [
      ["gcloud", "compute", "tpus", "queued-resources", "create", "big", "--node-id", "big",
       "--accelerator-type", "v5p-128", "--runtime-version", "v2-alpha-tpuv5", "--spot",
       "--zone", "z1", "--project", "p1"],
      ["gcloud", "compute", "tpus", "queued-resources", "delete", "big", "--force",
       "--quiet", "--zone", "z1", "--project", "p1"]]
  assert "--config configs/llm_tpu.py:v5p-128" in shlex.split(lines[1])[-1]


def test_gpu_launcher_over_ssh_gives_each_node_its_process_id():
  # A host may name its ssh user; the coordinator address is the host alone.
  lines = dry_run("launch_gpu.py", "ssh", "--hosts", "me@gpu1,gpu2,gpu3", "--config",
                  "configs/cpu_lm.py", "--workdir", "/shared/run", "--port", "9999")
  assert len(lines) == 3
  for i, (line, host) in enumerate(zip(lines, ("me@gpu1", "gpu2", "gpu3"))):
    argv = shlex.split(line)
    assert argv[:4] == ["ssh", "-o", "BatchMode=yes", host]
    before, after = launch_gpu.stopped_with_stdin("COMMAND").split("COMMAND")
    assert argv[4].startswith(before) and argv[4].endswith(after)
    remote = shlex.split(argv[4][len(before):-len(after)].split(" && ", 1)[1])
    assert remote[0] == f"XLA_FLAGS={launch_gpu.GPU_XLA_FLAGS}"
    assert remote[1:9] == ["exec", "python", "-m", "trainer.main", "--config",
                           "configs/cpu_lm.py", "--workdir", "/shared/run"]
    assert remote[9:] == ["--config.distributed.mode=manual",
                          "--config.distributed.coordinator_address=gpu1:9999",
                          "--config.distributed.num_processes=3",
                          f"--config.distributed.process_id={i}"]


def _node(tmp_path, name, exit_status=None):
  """A node's shell command as the ssh launcher wraps it, run here by bash: a stand-in
  trainer that records SIGTERM (and exits 0, as the trainer does), or exits with
  `exit_status` after a second (by when the others have set their traps)."""
  marker = tmp_path / name
  trainer = (f"sleep 1; exit {exit_status}" if exit_status is not None else
             f"trap 'echo SIGTERM > {marker}; exit 0' TERM; while true; do sleep 0.1; done")
  return ["bash", "-c", launch_gpu.stopped_with_stdin(f"bash -c {shlex.quote(trainer)}")]


def test_gpu_launcher_stops_the_other_nodes_when_one_fails(tmp_path):
  """One node's trainer exits 3: the launcher returns 3, and the other node's trainer
  got SIGTERM (it saves and exits) instead of waiting on its peer forever."""
  started = time.monotonic()
  status = launch_gpu.run_all([_node(tmp_path, "ok"), _node(tmp_path, "bad", 3)],
                              ["ok", "bad"])
  assert status == 3 and (tmp_path / "ok").read_text() == "SIGTERM\n"
  assert time.monotonic() - started < 30


def test_gpu_launcher_nodes_exit_with_their_trainers_status(tmp_path):
  assert launch_gpu.run_all([_node(tmp_path, "a", 0), _node(tmp_path, "b", 0)],
                            ["a", "b"]) == 0
  node = subprocess.Popen(_node(tmp_path, "c", 7), stdin=subprocess.PIPE)  # stdin open
  assert node.wait(timeout=30) == 7
  node.stdin.close()


def test_gpu_launcher_host_list_ignores_blanks_and_refuses_an_empty_one(monkeypatch):
  lines = dry_run("launch_gpu.py", "ssh", "--hosts", " gpu1, gpu2,", "--config",
                  "configs/cpu_lm.py", "--workdir", "/shared/run")
  assert [shlex.split(line)[3] for line in lines] == ["gpu1", "gpu2"]
  assert "--config.distributed.num_processes=2" in lines[0]
  result = subprocess.run([sys.executable, "scripts/launch_gpu.py", "ssh", "--hosts", " ,",
                           "--config", "c.py", "--workdir", "/w", "--dry_run"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
  assert result.returncode == 2 and "--hosts" in result.stderr


def test_gpu_launcher_default_project_path_may_hold_a_space(monkeypatch):
  monkeypatch.setattr(launch_gpu, "REPO", pathlib.Path("/home/me/my repo"))
  args = launch_gpu.parse_args(["ssh", "--hosts", "gpu1", "--config", "c.py", "--workdir",
                                "/w"])
  command = launch_gpu.trainer_command(args, "gpu1:1", "1", "0")
  assert shlex.split(command)[:3] == ["cd", "/home/me/my repo", "&&"]


def test_gpu_launcher_slurm_script_runs_one_task_per_node():
  lines = dry_run("launch_gpu.py", "slurm", "--nodes", "4", "--gpus_per_node", "8",
                  "--config", "configs/cpu_lm.py", "--workdir", "/shared/run")
  assert lines[0] == "#!/bin/bash"
  assert {"#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1",
          "#SBATCH --gpus-per-node=8"} <= set(lines)
  assert any(line.startswith('export COORDINATOR="$(scontrol show hostnames') and
             line.endswith(':12355"') for line in lines)
  srun = shlex.split(next(line for line in lines if line.startswith("srun")))
  assert srun[:3] == ["srun", "--kill-on-bad-exit=1", "bash"]
  assert srun[-1].endswith("--config.distributed.mode=manual "
                           "--config.distributed.coordinator_address=$COORDINATOR "
                           "--config.distributed.num_processes=$SLURM_NTASKS "
                           "--config.distributed.process_id=$SLURM_PROCID")
  assert lines[-1] == "sbatch psgd-train.sbatch"


TPU_ARGS = ["--name", "n1", "--slice", "v5p-16", "--zone", "z", "--project", "p",
            "--workdir", "gs://b/r"]


def _run_tpu_launcher(monkeypatch, logs_outcome, steps="train,logs,delete"):
  """main() with gcloud stubbed: the `logs` ssh returns `logs_outcome` (an exit status)
  or raises it (an exception); the steps that ran, in order."""
  ran = []

  def fake_run(command, **kwargs):
    step = ("logs" if "--worker=0" in command else "delete" if "delete" in command
            else "train")
    ran.append(step)
    if step == "logs" and isinstance(logs_outcome, BaseException):
      raise logs_outcome
    status = logs_outcome if step == "logs" else 0
    if kwargs.get("check") and status:
      raise subprocess.CalledProcessError(status, command)
    return subprocess.CompletedProcess(command, status)
  monkeypatch.setattr(launch_tpu.subprocess, "run", fake_run)
  error = None
  try:
    launch_tpu.main([*TPU_ARGS, f"--steps={steps}"])
  except (SystemExit, subprocess.CalledProcessError) as e:
    error = e
  return ran, error


def test_tpu_launcher_deletes_the_slice_after_the_run_ends_or_fails(monkeypatch):
  assert _run_tpu_launcher(monkeypatch, 0) == (["train", "logs", "delete"], None)
  ran, error = _run_tpu_launcher(monkeypatch, 1)  # the trainer exited 1
  assert ran == ["train", "logs", "delete"]
  assert isinstance(error, subprocess.CalledProcessError)


@pytest.mark.parametrize("lost", [255, KeyboardInterrupt()], ids=["dropped", "ctrl-c"])
def test_tpu_launcher_keeps_a_slice_whose_log_stream_ended_before_the_run(monkeypatch,
                                                                          lost):
  """A dropped connection (ssh's 255) or Ctrl-C ends the stream, not the detached run:
  the slice stays, and the message gives the commands to follow or delete it."""
  ran, error = _run_tpu_launcher(monkeypatch, lost)
  assert ran == ["train", "logs"]
  assert isinstance(error, SystemExit) and "not deleted" in str(error.code)
  follow = next(line for line in str(error.code).splitlines() if "logs,delete" in line)
  assert shlex.split(follow) == ["python", "scripts/launch_tpu.py", *TPU_ARGS,
                                 "--steps=logs,delete"]


def test_tpu_launcher_packs_the_checkout_without_deleted_or_ignored_files(tmp_path,
                                                                          monkeypatch):
  git = lambda *a: subprocess.run(["git", *a], cwd=tmp_path, check=True,
                                  capture_output=True)
  git("init", "-q")
  for name in ("kept.py", "deleted.py", ".gitignore"):
    (tmp_path / name).write_text("runs/\n" if name == ".gitignore" else "x = 1\n")
  git("add", ".")
  (tmp_path / "deleted.py").unlink()  # tracked, deleted, not committed
  (tmp_path / "new.py").write_text("y = 2\n")
  (tmp_path / "runs").mkdir()
  (tmp_path / "runs" / "big.bin").write_text("ignored")
  args = launch_tpu.parse_args([*TPU_ARGS[:1], tmp_path.name, *TPU_ARGS[2:]])
  monkeypatch.setattr(launch_tpu, "REPO", tmp_path)
  launch_tpu.pack_checkout(args)
  with tarfile.open(launch_tpu.archive(args)) as tar:
    assert sorted(tar.getnames()) == [".gitignore", "kept.py", "new.py"]
  pathlib.Path(launch_tpu.archive(args)).unlink()


@pytest.mark.parametrize("flags, message", [
    (["--workdir", "runs/x"], "give a gs:// path"),
    (["--slice", "v6e-16"], "no settings for --slice v6e-16"),
])
def test_tpu_launcher_refuses_what_the_run_cannot_use_before_creating_a_slice(
    flags, message):
  argv = [*TPU_ARGS, *flags, "--dry_run"]
  result = subprocess.run([sys.executable, "scripts/launch_tpu.py", *argv], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
  assert result.returncode == 2 and message in result.stderr and not result.stdout
  # A config of the user's own covers a slice configs/llm_tpu.py does not know.
  if "--slice" in flags:
    assert dry_run("launch_tpu.py", *TPU_ARGS, *flags, "--config", "my.py:v6e-16")


def test_tpu_launcher_train_step_refuses_to_start_beside_a_running_trainer(tmp_path):
  """The train step's remote guard, run here by bash, sees a process whose command line
  is the trainer's (as on a host where one still runs) and stops before starting one."""
  args = launch_tpu.parse_args(TPU_ARGS)
  remote = launch_tpu.step_commands(args, "train")[0][-1]
  guard = remote.split("; fi; ")[0] + "; fi; echo would start"
  trainer = subprocess.Popen(["bash", "-c", f"exec -a '{tmp_path}/bin/python -m "
                              "trainer.main --config c.py' sleep 60"])
  try:
    deadline = time.monotonic() + 10
    while subprocess.run(["pgrep", "-f", f"^{tmp_path}/bin/python"]).returncode:
      assert time.monotonic() < deadline
      time.sleep(0.1)
    result = subprocess.run(["bash", "-c", guard], capture_output=True, text=True,
                            timeout=30)
  finally:
    trainer.kill()
  assert result.returncode == 1 and "already running" in result.stderr
  assert "would start" not in result.stdout
