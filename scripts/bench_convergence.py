"""PSGD Kron vs AdamW on real data: learning-rate sweeps, validation curves, speedup.

For a fixed step budget, sweeps the learning rate (log-spaced) for AdamW and for each
Kron mode on the same model, data order and seeds, then reports each one's best
validation loss, the steps the best Kron run needs to reach AdamW's best final
validation loss, and wall-clock time per step. Writes <out>/curves.png and
<out>/results.md.

    python scripts/bench_convergence.py --out docs/convergence
    python scripts/bench_convergence.py --widths 1,2 --optimizers kron   # lr transfer

Runs go through trainer.main.train in this process (sequentially, 2 CPU cores welcome).
"""

import argparse
import importlib.util
import json
import pathlib
import statistics
import tempfile

import jax

import psgd


def load_config(path: str):
  spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def run_one(args, optimizer: str, mode: str, lr: float, width: int) -> dict:
  """Train one configuration; returns its eval curve and step times."""
  from trainer import main as trainer_main
  config = load_config(args.config)
  config.train.update(dict(steps=args.steps, eval_every=max(args.steps // args.evals, 1),
                           log_every=max(args.steps // args.evals, 1)))
  config.checkpoint.save_every = 10 * args.steps  # only the final save
  config.optimizer.update(dict(name=optimizer, learning_rate=lr))
  config.optimizer.kron.preconditioner_mode = mode
  config.model.width_multiplier = width
  with tempfile.TemporaryDirectory() as workdir:
    trainer_main.train(config, workdir)
    records = [json.loads(line) for line in open(f"{workdir}/metrics.jsonl")]
  curve = [(r["step"], r["eval/loss"]) for r in records if "eval/loss" in r]
  step_times = [r["train/step_time"] for r in records if "train/step_time" in r][1:]
  return dict(optimizer=optimizer, mode=mode, lr=lr, width=width, steps=args.steps,
              config=args.config, curve=curve,
              best=min(loss for _, loss in curve), step_time=statistics.median(step_times))


def run_key(run) -> tuple:
  return (run["optimizer"], run["mode"], run["lr"], run["width"])


def steps_to_reach(curve, target: float):
  """First step at which the (linearly interpolated) eval curve reaches target."""
  previous = None
  for step, loss in curve:
    if loss <= target:
      if previous is None:
        return float(step)
      (s0, l0) = previous
      return s0 + (step - s0) * (l0 - target) / (l0 - loss)
    previous = (step, loss)
  return None


def label(run) -> str:
  name = "adamw" if run["optimizer"] == "adamw" else f"kron {run['mode']}"
  return f"{name} lr={run['lr']:.3g}" + (f" width x{run['width']}" if run["width"] != 1 else "")


def report(runs, out: pathlib.Path, steps: int) -> str:
  groups = {}
  for run in runs:
    groups.setdefault((run["optimizer"], run["mode"], run["width"]), []).append(run)
  best = {key: min(group, key=lambda r: r["best"]) for key, group in groups.items()}
  lines = ["| optimizer | mode | width | lrs tried | best lr | best val loss | "
           "steps to AdamW's best | time/step (s) |", "|---|---|---|---|---|---|---|---|"]
  adam = [r for (opt, _, _), r in best.items() if opt == "adamw"]
  adam_target = adam[0]["curve"][-1][1] if adam else None
  for (opt, mode, width), run in sorted(best.items(), key=lambda kv: str(kv[0])):
    lrs = ", ".join(f"{r['lr']:.3g}" for r in sorted(groups[(opt, mode, width)],
                                                     key=lambda r: r["lr"]))
    reach = steps_to_reach(run["curve"], adam_target) if adam_target is not None else None
    reach_text = "-" if reach is None else f"{reach:.0f} ({reach / steps:.2f}x)"
    lines.append(f"| {opt} | {mode if opt == 'kron' else '-'} | {width} | {lrs} | "
                 f"{run['lr']:.3g} | {run['best']:.4f} | {reach_text} | "
                 f"{run['step_time']:.3f} |")
  table = "\n".join(lines)
  (out / "results.md").write_text(table + "\n\nAll runs (final val loss):\n\n" + "\n".join(
      f"- {label(r)}: {r['curve'][-1][1]:.4f}" for r in runs) + "\n")
  (out / "runs.json").write_text(json.dumps(runs, indent=1))
  plot(best.values(), out / "curves.png")
  return table


def plot(runs, path: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for run in runs:
    steps, losses = zip(*run["curve"])
    ax.plot(steps, losses, marker="o", markersize=3, label=label(run))
  ax.set_xlabel("step")
  ax.set_ylabel("validation loss (nats/token)")
  ax.set_title("best learning rate of each optimizer")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/cpu_lm.py")
  parser.add_argument("--steps", type=int, default=400)
  parser.add_argument("--evals", type=int, default=8, help="evaluations per run")
  parser.add_argument("--optimizers", default="adamw,kron")
  parser.add_argument("--modes", default=",".join(psgd.MODES),
                      help="Kron modes, comma separated")
  parser.add_argument("--adamw_lrs", default="5e-4,1e-3,2e-3,4e-3")
  parser.add_argument("--kron_lrs", default="1e-3,2e-3,4e-3,8e-3")
  parser.add_argument("--widths", default="1", help="width multipliers, comma separated")
  parser.add_argument("--out", default="docs/convergence")
  parser.add_argument("--resume", action="store_true",
                      help="reuse the runs in <out>/runs.json made with the same settings")
  args = parser.parse_args()
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  done = {}
  if args.resume and (out / "runs.json").exists():
    done = {run_key(r): r for r in json.loads((out / "runs.json").read_text())
            if r.get("steps") == args.steps and r.get("config") == args.config}
  runs = []
  for width in [int(w) for w in args.widths.split(",")]:
    for optimizer in args.optimizers.split(","):
      modes = args.modes.split(",") if optimizer == "kron" else ["-"]
      lrs = getattr(args, f"{optimizer}_lrs").split(",")
      for mode in modes:
        for lr in [float(x) for x in lrs]:
          key = (optimizer, mode if optimizer == "kron" else "Q0.5EQ1.5", lr, width)
          run = done.get(key) or run_one(args, *key)
          runs.append(run)
          (out / "runs.json").write_text(json.dumps(runs, indent=1))  # survives a crash
          print(f"{label(run)}: best val {run['best']:.4f}, "
                f"{run['step_time'] * 1e3:.0f} ms/step", flush=True)
  print(report(runs, out, args.steps))
  print(f"{jax.device_count()} {jax.devices()[0].platform} device(s); wrote {out}/")


if __name__ == "__main__":
  main()
