r"""Train on several GPU nodes: one trainer process per node, each with all its node's
GPUs, joined by jax.distributed with the address of the first node as coordinator.

Plain ssh to a host list (the project installed at the same path on every node, the
workdir on a shared file system or a bucket); prints every node's output, prefixed.
Ctrl-C here, or a node that fails, sends every other node's trainer SIGTERM (it saves
and exits, as on a preemption), so no node is left holding its GPUs:

    python scripts/launch_gpu.py ssh --hosts node1,node2 --config configs/llm_gpu.py:2 \
        --workdir /shared/runs/x [-- --config.train.steps=100]

Slurm: writes a batch script running one task per node and submits it with sbatch:

    python scripts/launch_gpu.py slurm --nodes 2 --gpus_per_node 8 --partition gpu \
        --config configs/llm_gpu.py:2 --workdir /shared/runs/x

Each process gets --config.distributed.mode=manual and the coordinator address, process
count and its own process id as config overrides, and XLA_FLAGS set to --xla_flags
(default GPU_XLA_FLAGS; '' leaves the nodes' own). --dry_run prints what would run (the
ssh commands one per line; the batch script and the sbatch command) and runs nothing.
"""

import argparse
import pathlib
import shlex
import subprocess
import sys
import threading

REPO = pathlib.Path(__file__).resolve().parent.parent
# XLA's GPU flags for FSDP training: the latency-hiding scheduler overlaps the weights'
# all-gathers and the gradients' reduce-scatters with the matmuls; collectives get the
# high-priority stream; small collectives are combined up to 128 MiB.
GPU_XLA_FLAGS = " ".join([
    "--xla_gpu_enable_latency_hiding_scheduler=true",
    "--xla_gpu_enable_highest_priority_async_stream=true",
    "--xla_gpu_all_gather_combine_threshold_bytes=134217728",
    "--xla_gpu_reduce_scatter_combine_threshold_bytes=134217728",
    "--xla_gpu_all_reduce_combine_threshold_bytes=134217728",
])


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
  sub = parser.add_subparsers(dest="launcher", required=True)
  for name in ("ssh", "slurm"):
    p = sub.add_parser(name, allow_abbrev=False)
    p.add_argument("--config", required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("--port", type=int, default=12355, help="coordinator port on node 0")
    # Shell words on the nodes: ~ and $HOME expand there.
    p.add_argument("--repo_dir", default=shlex.quote(str(REPO)),
                   help="the project on every node")
    p.add_argument("--python", default="python", help="its interpreter on every node")
    p.add_argument("--xla_flags", default=GPU_XLA_FLAGS, help="XLA_FLAGS on every node")
    p.add_argument("--dry_run", action="store_true", help="print what would run only")
  sub.choices["ssh"].add_argument("--hosts", required=True, help="comma-separated")
  slurm = sub.choices["slurm"]
  slurm.add_argument("--nodes", type=int, required=True)
  slurm.add_argument("--gpus_per_node", type=int, required=True)
  slurm.add_argument("--partition")
  slurm.add_argument("--time", default="24:00:00")
  slurm.add_argument("--job_name", default="psgd-train")
  slurm.add_argument("--script", default="psgd-train.sbatch", help="batch script path")
  split = argv.index("--") if "--" in argv else len(argv)  # the rest is the trainer's
  args = parser.parse_args(argv[:split])
  args.trainer_flags = argv[split + 1:]
  if args.launcher == "ssh":
    args.hosts = [host.strip() for host in args.hosts.split(",") if host.strip()]
    if not args.hosts:
      parser.error("--hosts: give the nodes' ssh names, comma-separated")
  return args


def trainer_command(args, coordinator: str, num_processes: str, process_id: str) -> str:
  """The shell command one node runs. Paths and the distributed values go in unquoted:
  they may be ~ or shell variables ($SLURM_PROCID) that each node's shell expands."""
  fixed = shlex.join(["--config", args.config, "--workdir", args.workdir,
                      "--config.distributed.mode=manual", *args.trainer_flags])
  env = f"XLA_FLAGS={shlex.quote(args.xla_flags)} " if args.xla_flags else ""
  return (f"cd {args.repo_dir} && {env}exec {args.python} -m trainer.main {fixed} "
          f"--config.distributed.coordinator_address={coordinator} "
          f"--config.distributed.num_processes={num_processes} "
          f"--config.distributed.process_id={process_id}")


def stopped_with_stdin(command: str) -> str:
  """`command` in the background, sent SIGTERM once this shell's stdin ends (the ssh
  connection's: when the launcher exits, is interrupted or closes it), and waited for;
  its exit status is the shell's. Without it a node's trainer outlives the launcher.
  (`<&0`: a background job of a script otherwise reads /dev/null, which ends at once.)"""
  return (f"{{ {command} & }}; trainer=$!; (cat > /dev/null; kill -TERM $trainer) <&0 "
          "> /dev/null 2>&1 & wait $trainer")


def ssh_commands(args) -> list[list[str]]:
  hosts = args.hosts
  coordinator = f"{hosts[0].rsplit('@', 1)[-1]}:{args.port}"  # user@node1: ssh's, not JAX's
  return [["ssh", "-o", "BatchMode=yes", host, stopped_with_stdin(
      trainer_command(args, coordinator, str(len(hosts)), str(i)))]
          for i, host in enumerate(hosts)]


def slurm_script(args) -> str:
  partition = [f"#SBATCH --partition={args.partition}"] if args.partition else []
  task = trainer_command(args, "$COORDINATOR", "$SLURM_NTASKS", "$SLURM_PROCID")
  return "\n".join([
      "#!/bin/bash",
      f"#SBATCH --job-name={args.job_name}",
      f"#SBATCH --nodes={args.nodes}",
      "#SBATCH --ntasks-per-node=1",
      f"#SBATCH --gpus-per-node={args.gpus_per_node}",
      f"#SBATCH --time={args.time}",
      f"#SBATCH --output={args.job_name}-%j.log",
      *partition,
      "# One task per node with all its GPUs; the first node coordinates.",
      "set -euo pipefail",
      f'export COORDINATOR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)'
      f':{args.port}"',
      f"srun --kill-on-bad-exit=1 bash -c {shlex.quote(task)}",
      "",
  ])


def run_all(commands: list[list[str]], names: list[str]) -> int:
  """Run the commands at once, print their output lines prefixed by name; the first
  non-zero exit status, or 0. Each gets a stdin pipe that nothing writes to: once one
  fails (or on Ctrl-C) the others' pipes are closed, which `stopped_with_stdin` turns
  into SIGTERM for their trainers."""
  procs = [subprocess.Popen(c, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for c in commands]
  failed = threading.Event()

  def relay(name, proc):
    for line in proc.stdout:
      print(f"[{name}] {line}", end="", flush=True)
    if proc.wait():
      failed.set()

  threads = [threading.Thread(target=relay, args=(n, p), daemon=True)
             for n, p in zip(names, procs)]
  for t in threads:
    t.start()
  try:
    while any(t.is_alive() for t in threads):
      if failed.wait(timeout=1):
        break
  finally:  # a failed node or Ctrl-C: stop the others (a no-op for those done)
    for proc in procs:
      proc.stdin.close()
  for t in threads:
    t.join()
  return next((c for c in (p.wait() for p in procs) if c), 0)


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  if args.launcher == "ssh":
    commands = ssh_commands(args)
    if args.dry_run:
      print("\n".join(shlex.join(c) for c in commands))
      return 0
    return run_all(commands, args.hosts)
  script = slurm_script(args)
  submit = ["sbatch", args.script]
  if args.dry_run:
    print(script + shlex.join(submit))
    return 0
  pathlib.Path(args.script).write_text(script)
  return subprocess.run(submit, check=False).returncode


if __name__ == "__main__":
  sys.exit(main())
