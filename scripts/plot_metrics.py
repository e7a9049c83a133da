"""Plot training curves of one or more runs: python scripts/plot_metrics.py RUN... -o out.png

Reads <workdir>/metrics.jsonl (see trainer/metrics.py) and draws one panel per metric
(train/loss and eval/loss by default), one line per run.
"""

import argparse
import json
import math
import pathlib


def read_series(workdir: str, metric: str) -> tuple[list[int], list[float]]:
  """(steps, values) of `metric` in step order. Where a step appears more than once (a
  file from before resumes dropped the steps past the restored one), its last record
  wins: that is the run that went on."""
  by_step = {}
  for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines():
    record = json.loads(line)
    if metric in record:  # null: a non-finite value, a gap in the curve
      by_step[record["step"]] = math.nan if record[metric] is None else record[metric]
  steps = sorted(by_step)
  return steps, [by_step[s] for s in steps]


def plot(workdirs: list[str], metrics: list[str], output: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
  for ax, metric in zip(axes[0], metrics):
    for workdir in workdirs:
      steps, values = read_series(workdir, metric)
      if steps:
        ax.plot(steps, values, label=pathlib.Path(workdir).name)
    ax.set_title(metric)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(output, dpi=120)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("workdirs", nargs="+")
  parser.add_argument("-o", "--output", default="curves.png")
  parser.add_argument("--metrics", default="train/loss,eval/loss")
  args = parser.parse_args()
  plot(args.workdirs, args.metrics.split(","), args.output)
  print(f"wrote {args.output}")


if __name__ == "__main__":
  main()
