"""The README's commands, read from README.md itself, so CI runs what users read.

    python scripts/readme_commands.py command 1     # print the first command
    python scripts/readme_commands.py check_result  # compare runs/cpu_lm with the README
    python scripts/readme_commands.py use_commands  # the "Using a trained run" commands
    python scripts/readme_commands.py check_eval out.txt

`command N` prints the N-th indented command of the README's "The two commands"
section. `check_result` reads the final `eval/loss` of the first command's workdir and
fails unless it is within --tolerance of the figure the README states for it
("ends at `eval/loss` **X**"). `use_commands` prints the commands of the "Using a
trained run" section, one per line; `check_eval` fails unless the eval report in a
file of their output equals the run's last logged `eval/loss` exactly.
"""

import argparse
import json
import pathlib
import re
import sys

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
SECTION = "## The two commands"
USE_SECTION = "## Using a trained run"
STATED_LOSS = re.compile(r"ends at `eval/loss` \*\*([0-9.]+)\*\*")
WORKDIR = re.compile(r"--workdir (\S+)")


def commands(readme: str, heading: str = SECTION) -> list[str]:
  """The indented (code) lines of a section, in order."""
  section = readme.split(heading, 1)[1].split("\n## ", 1)[0]
  return [line.strip() for line in section.splitlines() if line.startswith("    ")]


def final_eval_loss(workdir: pathlib.Path) -> float:
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  losses = {r["step"]: r["eval/loss"] for r in records if "eval/loss" in r}
  return losses[max(losses)]


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest="what", required=True)
  sub.add_parser("command").add_argument("n", type=int)
  check = sub.add_parser("check_result")
  check.add_argument("--tolerance", type=float, default=0.03)
  sub.add_parser("use_commands")
  sub.add_parser("check_eval").add_argument("output", type=pathlib.Path)
  args = parser.parse_args()
  readme = README.read_text()
  found = commands(readme)
  if args.what == "command":
    print(found[args.n - 1])
    return 0
  if args.what == "use_commands":
    print("\n".join(commands(readme, USE_SECTION)))
    return 0
  workdir = README.parent / WORKDIR.search(found[0]).group(1)
  measured = final_eval_loss(workdir)
  if args.what == "check_eval":
    reports = [json.loads(line) for line in args.output.read_text().splitlines()
               if line.startswith("{") and "eval/loss" in line]
    print(f"trainer.eval: {reports}; the run logged eval/loss {measured}")
    return 0 if len(reports) == 1 and reports[0]["eval/loss"] == measured else 1
  stated = float(STATED_LOSS.search(readme).group(1))
  print(f"final eval/loss {measured:.4f}, README states {stated} (tolerance {args.tolerance})")
  return 0 if abs(measured - stated) <= args.tolerance else 1


if __name__ == "__main__":
  sys.exit(main())
