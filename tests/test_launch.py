"""The launchers' dry runs print exactly the commands they would run."""

import importlib.util
import shlex
import subprocess
import sys

from trainer_utils import REPO

_spec = importlib.util.spec_from_file_location("launch_gpu", REPO / "scripts/launch_gpu.py")
launch_gpu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(launch_gpu)


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
  create, pack, scp, install, train, logs, delete = lines
  assert shlex.split(create) == ["gcloud", "compute", "tpus", "tpu-vm", "create", "llm1b",
                                 "--accelerator-type", "v5p-16", "--version",
                                 "v2-alpha-tpuv5", *where]
  assert pack.startswith("git ls-files") and "/tmp/llm1b-psgd-train.tar.gz" in pack
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
    remote = shlex.split(argv[4].split(" && ", 1)[1])
    assert remote[0] == f"XLA_FLAGS={launch_gpu.GPU_XLA_FLAGS}"
    assert remote[1:9] == ["exec", "python", "-m", "trainer.main", "--config",
                           "configs/cpu_lm.py", "--workdir", "/shared/run"]
    assert remote[9:] == ["--config.distributed.mode=manual",
                          "--config.distributed.coordinator_address=gpu1:9999",
                          "--config.distributed.num_processes=3",
                          f"--config.distributed.process_id={i}"]


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
