r"""Train on a Cloud TPU VM slice: create it, install this project on every host, start
the trainer on every host, stream the log, delete the slice.

    python scripts/launch_tpu.py --name llm1b --slice v5p-16 --zone us-east5-a \
        --project my-project --workdir gs://my-bucket/runs/llm1b [-- --config.train.steps=100]

--dry_run prints the commands, one per line, and runs nothing. --queued asks for the
slice as a queued resource (it waits for capacity); --spot asks for spot capacity.
--steps runs a part, e.g. --steps=train,logs on a slice that already exists. Checkpoints
live in the gs:// workdir, so after a preemption the same command resumes the run.
If the log stream ends before the run (a dropped connection, Ctrl-C), the slice is left
running and the commands to follow it again or delete it are printed. Flags after `--`
go to the trainer. Check the config fits first: docs/pod_slices.md.
"""

import argparse
import ast
import os
import pathlib
import shlex
import subprocess
import sys
import tarfile
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
STEPS = ("create", "install", "train", "logs", "delete")
# TPU VM software version per generation (`gcloud compute tpus versions list`).
RUNTIME_VERSIONS = {"v4": "tpu-ubuntu2204-base", "v5litepod": "v2-alpha-tpuv5-lite",
                    "v5p": "v2-alpha-tpuv5", "v6e": "v2-alpha-tpuv6e"}
REMOTE_DIR, REMOTE_VENV, REMOTE_LOG = "~/psgd-train", "~/psgd-venv", "~/train.log"
SSH_LOST_CONNECTION = 255  # ssh's exit status when the connection, not the command, failed


def known_slices() -> list[str]:
  """configs/llm_tpu.py's SLICES, read without importing it (this script needs only the
  standard library on the machine it runs on)."""
  module = ast.parse((REPO / "configs" / "llm_tpu.py").read_text())
  return next(list(ast.literal_eval(node.value)) for node in module.body
              if isinstance(node, ast.Assign) and
              any(getattr(t, "id", None) == "SLICES" for t in node.targets))


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
  parser.add_argument("--name", required=True, help="TPU VM (and queued resource) name")
  parser.add_argument("--slice", required=True, help="accelerator type, e.g. v5p-16")
  parser.add_argument("--zone", required=True)
  parser.add_argument("--project", required=True)
  parser.add_argument("--workdir", required=True, help="gs:// run directory")
  parser.add_argument("--config", help="default: configs/llm_tpu.py:<slice>")
  parser.add_argument("--version", help="TPU software version; default by generation")
  parser.add_argument("--queued", action="store_true", help="create via a queued resource")
  parser.add_argument("--spot", action="store_true", help="spot (preemptible) capacity")
  parser.add_argument("--steps", default=",".join(STEPS),
                      help=f"comma-separated subset of {','.join(STEPS)}")
  parser.add_argument("--dry_run", action="store_true", help="print the commands only")
  split = argv.index("--") if "--" in argv else len(argv)  # the rest is the trainer's
  args = parser.parse_args(argv[:split])
  args.trainer_flags = argv[split + 1:]
  args.launcher_flags = argv[:split]
  args.steps = args.steps.split(",")
  unknown = sorted(set(args.steps) - set(STEPS))
  if unknown:
    parser.error(f"--steps: unknown {unknown}; choose from {','.join(STEPS)}")
  generation = args.slice.split("-")[0]
  args.version = args.version or RUNTIME_VERSIONS.get(generation)
  if not args.version:
    parser.error(f"--version is needed for {args.slice!r} (known generations: "
                 f"{', '.join(RUNTIME_VERSIONS)})")
  if not args.workdir.startswith("gs://"):
    parser.error(f"--workdir {args.workdir!r}: give a gs:// path. Every host writes the "
                 "same checkpoints there, and a path on the slice's own disks is deleted "
                 "with the slice.")
  if args.config is None and args.slice not in known_slices():
    parser.error(f"configs/llm_tpu.py has no settings for --slice {args.slice} (known: "
                 f"{', '.join(known_slices())}): add it to SLICES there, or pass --config.")
  args.config = args.config or f"configs/llm_tpu.py:{args.slice}"
  return args


def gcloud(args, *command) -> list[str]:
  return ["gcloud", "compute", "tpus", *command, "--zone", args.zone, "--project",
          args.project]


def ssh(args, worker: str, remote_command: str) -> list[str]:
  return [*gcloud(args, "tpu-vm", "ssh", args.name), f"--worker={worker}", "--command",
          remote_command]


def archive(args) -> str:
  return f"/tmp/{args.name}-psgd-train.tar.gz"


def pack_checkout(args) -> None:
  """Archive this checkout's files, tracked and untracked but not ignored, for the hosts.
  A tracked file deleted from the working tree is left out (tar would stop at it)."""
  listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO,
                          check=True, capture_output=True, text=True).stdout.split("\0")
  with tarfile.open(archive(args), "w:gz") as tar:
    for name in dict.fromkeys(filter(None, listed)):
      if os.path.lexists(REPO / name):
        tar.add(REPO / name, arcname=name, recursive=False)


def step_commands(args, step: str) -> list:
  """The commands of one step, as argv lists."""
  spot = ["--spot"] if args.spot else []
  if step == "create" and args.queued:
    return [gcloud(args, "queued-resources", "create", args.name, "--node-id", args.name,
                   "--accelerator-type", args.slice, "--runtime-version", args.version,
                   *spot)]
  if step == "create":
    return [gcloud(args, "tpu-vm", "create", args.name, "--accelerator-type", args.slice,
                   "--version", args.version, *spot)]
  if step == "install":
    remote = (f"mkdir -p {REMOTE_DIR} && tar -xzf ~/{pathlib.Path(archive(args)).name} "
              f"-C {REMOTE_DIR} && cd {REMOTE_DIR} && python3 -m pip install -q uv && "
              f"python3 -m uv venv -q --python 3.11 {REMOTE_VENV} && "
              f"python3 -m uv pip install -q --python {REMOTE_VENV}/bin/python "
              "-c .ci/constraints.txt -e '.[train,tpu,sentencepiece]' gcsfs")
    return [[*gcloud(args, "tpu-vm", "scp", archive(args), f"{args.name}:~/"),
             "--worker=all"],
            ssh(args, "all", remote)]
  if step == "train":
    trainer = f"{REMOTE_VENV}/bin/python -m trainer.main " + shlex.join(
        ["--config", args.config, "--workdir", args.workdir, *args.trainer_flags])
    script = shlex.quote(f"{trainer}; echo $? > {REMOTE_LOG}.exit")
    # Detached, so the run outlives this ssh session; its exit status lands by the log.
    # Not beside a trainer still running there (the pattern, anchored at the command
    # line's start, matches the python process, not this shell).
    running = "pgrep -f '^[^ ]*python[^ ]* -m trainer[.]main' > /dev/null"
    return [ssh(args, "all", f"if {running}; then echo \"A trainer is already running on "
                "$(hostname): follow it with --steps=logs, or stop it first.\" >&2; exit 1; "
                f"fi; cd {REMOTE_DIR} && rm -f {REMOTE_LOG}.exit && "
                f"(setsid nohup bash -c {script} > {REMOTE_LOG} 2>&1 < /dev/null &)")]
  if step == "logs":  # process 0's log until its trainer exits, then its exit status
    return [ssh(args, "0", f"sleep 5; tail -n +1 -F {REMOTE_LOG} & TAIL=$!; "
                "while pgrep -f '[t]rainer.main' > /dev/null; do sleep 10; done; "
                f"sleep 2; kill $TAIL; exit $(cat {REMOTE_LOG}.exit 2> /dev/null || echo 1)")]
  if step == "delete" and args.queued:
    return [gcloud(args, "queued-resources", "delete", args.name, "--force", "--quiet")]
  return [gcloud(args, "tpu-vm", "delete", args.name, "--quiet")]


def wait_until_active(args) -> None:
  """Poll a queued resource until its slice is up (capacity can take hours)."""
  describe = gcloud(args, "queued-resources", "describe", args.name,
                    "--format=value(state.state)")
  while True:
    state = subprocess.run(describe, check=True, capture_output=True, text=True).stdout
    if state.strip() == "ACTIVE":
      return
    if state.strip() in ("FAILED", "SUSPENDED"):
      raise SystemExit(f"Queued resource {args.name} is {state.strip()}.")
    print(f"queued resource {args.name}: {state.strip()}", flush=True)
    time.sleep(60)


def follow_log(args) -> bool:
  """The `logs` step: True once the trainer has exited 0, CalledProcessError if it failed,
  False if the stream ended first (ssh lost its connection, or Ctrl-C): the run goes on."""
  try:
    status = subprocess.run(step_commands(args, "logs")[0], cwd=REPO).returncode
  except KeyboardInterrupt:
    return False
  if status == SSH_LOST_CONNECTION:
    return False
  if status:
    raise subprocess.CalledProcessError(status, "logs")
  return True


def detached_message(args) -> str:
  flags = [f for i, f in enumerate(args.launcher_flags) if not f.startswith("--steps")
           and not (i and args.launcher_flags[i - 1] == "--steps")]
  again = lambda steps: shlex.join(["python", "scripts/launch_tpu.py", *flags,
                                    f"--steps={steps}"])
  return (f"Stopped following the log; the run goes on on slice {args.name}, which is not "
          f"deleted. Follow it and delete the slice when it ends:\n  {again('logs,delete')}"
          f"\nor delete it now:\n  {again('delete')}")


def main(argv=None) -> None:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  steps = [s for s in STEPS if s in args.steps]
  if args.dry_run:
    if "install" in steps:
      print(f"# pack this checkout (git ls-files -co --exclude-standard) into {archive(args)}")
    for step in steps:
      for command in step_commands(args, step):
        print(shlex.join(command))
    return
  if "install" in steps:  # before paying for a slice
    pack_checkout(args)
  run_goes_on = False
  try:
    for step in (s for s in steps if s != "delete"):
      if step == "logs":
        run_goes_on = not follow_log(args)
        if run_goes_on:
          break
        continue
      for command in step_commands(args, step):
        subprocess.run(command, check=True, cwd=REPO)
      if step == "create" and args.queued:
        wait_until_active(args)
  finally:
    # A slice left running costs money, whatever went wrong; but not one still training.
    if "delete" in steps and not run_goes_on:
      for command in step_commands(args, "delete"):
        subprocess.run(command, check=True, cwd=REPO)
  if run_goes_on:
    raise SystemExit(detached_message(args))


if __name__ == "__main__":
  main()
