"""PSGD Kron vs AdamW and Muon on real data: learning-rate sweeps, curves, speedup.

For a fixed step budget, sweeps the learning rate (log-spaced) for AdamW, Muon
(optax.contrib.muon, AdamW's lr and weight decay carried over by consistent_rms) and
each Kron mode on the same model, data order and seeds, then reports each one's best
validation loss and the steps each run needs to reach AdamW's and Muon's best final
validation loss. The best Kron run is also trained for a shorter budget (its schedule
fitted to it) to see whether it reaches AdamW's final loss in fewer steps, and the
train steps of AdamW, Muon and Kron (at p=1 and at the floor) are timed side by side. Writes
<out>/curves.png, <out>/results.md and <out>/runs.json (--resume reuses its runs).

    python scripts/bench_convergence.py                     # writes docs/convergence
    python scripts/bench_convergence.py --widths 1,2 --optimizers kron \
        --budget_fraction 0 --time_rounds 0 --out docs/width_transfer   # lr transfer
    python scripts/bench_convergence.py --time_only --focus_modes Q0.5EQ1.5,QEQ  # step times

Runs go through trainer.main.train in this process (sequentially, 2 CPU cores welcome).
"""

import argparse
import importlib.util
import json
import pathlib
import statistics
import sys
import tempfile
import time

import jax
import numpy as np

# The trainer is used from this checkout, not installed: put the checkout on the path.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import psgd

FLOOR = 0.03  # the default schedule's floor


def load_config(path: str):
  spec = importlib.util.spec_from_file_location("bench_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def run_one(args, optimizer: str, mode: str, lr: float, width: int, steps: int) -> dict:
  """Train one configuration for `steps` (the schedule fitted to them); returns its eval
  curve and step times."""
  from trainer import main as trainer_main
  config = load_config(args.config)
  every = max(args.steps // args.evals, 1)  # the same eval steps for every budget
  config.train.update(dict(steps=steps, eval_every=every, log_every=every))
  config.checkpoint.save_every = 10 * steps  # only the final save
  config.optimizer.update(dict(name=optimizer, learning_rate=lr))
  config.optimizer.kron.preconditioner_mode = mode
  config.model.width_multiplier = width
  with tempfile.TemporaryDirectory() as workdir:
    trainer_main.train(config, workdir)
    records = [json.loads(line) for line in open(f"{workdir}/metrics.jsonl")]
  curve = [(r["step"], r["eval/loss"]) for r in records if "eval/loss" in r]
  step_times = [r["train/step_time"] for r in records if "train/step_time" in r]
  return dict(optimizer=optimizer, mode=mode, lr=lr, width=width, steps=steps,
              config=args.config, curve=curve,
              best=min(loss for _, loss in curve), step_time=statistics.median(step_times))


def run_key(run) -> tuple:
  return (run["optimizer"], run["mode"], run["lr"], run["width"], run["steps"])


def step_timer(args, optimizer: str, mode: str, lr: float, update_prob=None):
  """A () -> seconds closure timing one train step of this configuration (compiled and
  warmed up first). update_prob: a constant refit probability for Kron."""
  from trainer import data as data_lib
  from trainer import setup as setup_lib
  config = load_config(args.config)
  config.optimizer.update(dict(name=optimizer, learning_rate=lr))
  if optimizer == "kron":
    config.optimizer.kron.preconditioner_mode = mode
  if update_prob is not None:  # p(n) = clip(exp(-1e9 n), prob, 1): prob from step 1 on
    config.optimizer.kron.update(dict(update_prob_flat_steps=0, update_prob_decay=1e9,
                                      update_prob_floor=update_prob))
  run = setup_lib.build_setup(config)
  batch = next(data_lib.make_train_iterator(config.data, config.train.global_batch_size, 0, 1))
  batch = {k: jax.device_put(np.asarray(v), run.batch_sharding) for k, v in batch.items()}
  with jax.set_mesh(run.mesh):
    state = run.init_state()
    for _ in range(3):
      state, _ = run.train_step(state, batch)
  jax.block_until_ready(state)

  def tick() -> float:
    nonlocal state
    start = time.perf_counter()
    with jax.set_mesh(run.mesh):
      state, _ = run.train_step(state, batch)
    jax.block_until_ready(state)
    return time.perf_counter() - start
  return tick


def time_steps(args, runs) -> str:
  """Median train-step time of the best AdamW, Muon and Kron runs (with no runs: of the
  config's learning rate and the optimizers asked for), timed in interleaved rounds so
  that machine noise hits all alike; Kron at p=1 (the default schedule's first steps)
  and at its floor."""
  def lr(opt, mode=None):
    swept = [r for r in runs if r["optimizer"] == opt and (opt != "kron" or r["mode"] == mode)
             and r["width"] == 1 and r["steps"] == args.steps]
    if not swept:  # not in this sweep (AdamW, the baseline, is timed all the same)
      return load_config(args.config).optimizer.learning_rate
    return min(swept, key=lambda r: r["best"])["lr"]
  timed = ({r["optimizer"] for r in runs} if runs else set(args.optimizers.split(",")))
  timers = {"adamw": step_timer(args, "adamw", "-", lr("adamw"))}
  if "muon" in timed:
    timers["muon"] = step_timer(args, "muon", "-", lr("muon"))
  for mode in args.focus_modes.split(",") if "kron" in timed else ():
    timers[f"kron {mode} p=1"] = step_timer(args, "kron", mode, lr("kron", mode), 1.0)
    timers[f"kron {mode} floor"] = step_timer(args, "kron", mode, lr("kron", mode), FLOOR)
  times = {name: [] for name in timers}
  for _ in range(args.time_rounds):
    for name, tick in timers.items():
      times[name].append(tick())
  base = statistics.median(times["adamw"])
  lines = [f"Train-step time, median of {args.time_rounds} interleaved steps each:", "",
           "| run | ms/step | x AdamW |", "|---|---|---|"]
  for name, ts in times.items():
    lines.append(f"| {name} | {statistics.median(ts) * 1e3:.0f} | "
                 f"{statistics.median(ts) / base:.2f} |")
  return "\n".join(lines)


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
  name = f"kron {run['mode']}" if run["optimizer"] == "kron" else run["optimizer"]
  return f"{name} lr={run['lr']:.3g}" + (f" width x{run['width']}" if run["width"] != 1 else "")


def report(all_runs, out: pathlib.Path, steps: int) -> str:
  runs = [r for r in all_runs if r["steps"] == steps]
  groups = {}
  for run in runs:
    groups.setdefault((run["optimizer"], run["mode"], run["width"]), []).append(run)
  best = {key: min(group, key=lambda r: r["best"]) for key, group in groups.items()}
  # The baselines' best final losses, the targets the other runs are timed to.
  targets = {name: min((r for (opt, _, w), r in best.items() if opt == name and w == 1),
                       key=lambda r: r["best"], default=None) for name in ("adamw", "muon")}
  targets = {name: r["curve"][-1][1] for name, r in targets.items() if r is not None}
  adam_target = targets.get("adamw")
  lines = ["| optimizer | mode | width | lrs tried | best lr | best val loss | " +
           "".join(f"steps to {name}'s best | " for name in targets) +
           "time/step in the run (s) |", "|---" * (7 + len(targets)) + "|"]
  for (opt, mode, width), run in sorted(best.items(), key=lambda kv: str(kv[0])):
    lrs = ", ".join(f"{r['lr']:.3g}" for r in sorted(groups[(opt, mode, width)],
                                                     key=lambda r: r["lr"]))
    reach = [steps_to_reach(run["curve"], target) for target in targets.values()]
    reach_text = "".join("- | " if n is None else f"{n:.0f} ({n / steps:.2f}x) | "
                         for n in reach)
    lines.append(f"| {opt} | {mode if opt == 'kron' else '-'} | {width} | {lrs} | "
                 f"{run['lr']:.3g} | {run['best']:.4f} | {reach_text}"
                 f"{run['step_time']:.3f} |")
  short = [r for r in all_runs if r["steps"] < steps]
  if short and adam_target is not None:
    lines += ["", f"Shorter budgets (schedule fitted to the budget) against AdamW's best "
              f"final {adam_target:.4f} after {steps} steps:", ""]
    lines += [f"- {label(r)}, {r['steps']} steps ({r['steps'] / steps:.2f}x): final "
              f"{r['curve'][-1][1]:.4f}, "
              f"{'reaches' if r['curve'][-1][1] <= adam_target else 'does not reach'} it"
              for r in short]
  table = "\n".join(lines)
  (out / "results.md").write_text(table + "\n\nAll runs (final val loss):\n\n" + "\n".join(
      f"- {label(r)}: {r['curve'][-1][1]:.4f}" for r in runs) + "\n")
  (out / "runs.json").write_text(json.dumps(all_runs, indent=1))
  plot(list(best.values()) + short, adam_target, out / "curves.png")
  return table


def plot(runs, target, path: pathlib.Path) -> None:
  """Validation curves; runs shorter than the first are dashed; target (AdamW's final
  loss) as a horizontal line."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for run in runs:
    steps, losses = zip(*run["curve"])
    short = run["steps"] < runs[0]["steps"]
    ax.plot(steps, losses, marker="o", markersize=3, linestyle="--" if short else "-",
            label=label(run) + (f", {run['steps']}-step budget" if short else ""))
  if target is not None:
    ax.axhline(target, color="gray", linewidth=0.8, linestyle=":",
               label="AdamW's final loss")
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
  parser.add_argument("--optimizers", default="adamw,muon,kron")
  parser.add_argument("--modes", default=",".join(psgd.MODES),
                      help="Kron modes, comma separated")
  parser.add_argument("--adamw_lrs", default="5e-4,1e-3,2e-3,4e-3")
  parser.add_argument("--kron_lrs", default="1e-3,2e-3,4e-3,8e-3")
  parser.add_argument("--muon_lrs", default="1e-3,3e-3,1e-2,3e-2")
  parser.add_argument("--widths", default="1", help="width multipliers, comma separated")
  parser.add_argument("--out", default="docs/convergence")
  parser.add_argument("--focus_modes", default=None,
                      help="Kron modes (at their best lr) timed against AdamW and rerun "
                           "with the shorter budget; default: the config's mode if "
                           "--modes has it, else the first of --modes")
  parser.add_argument("--budget_fraction", type=float, default=0.75,
                      help="shorter budget, as a fraction of --steps (0: none)")
  parser.add_argument("--time_rounds", type=int, default=20, help="0: no timing")
  parser.add_argument("--time_only", action="store_true",
                      help="train nothing: time the config's steps for --optimizers and "
                           "--focus_modes at its learning rate")
  parser.add_argument("--resume", action="store_true",
                      help="keep the runs in <out>/runs.json made with the same --config and "
                           "--steps (reported with this sweep's), and skip redoing them")
  args = parser.parse_args()
  modes = args.modes.split(",")
  if args.focus_modes is None:  # the config's mode, if swept (else the first swept)
    config_mode = load_config(args.config).optimizer.kron.preconditioner_mode
    args.focus_modes = config_mode if args.time_only or config_mode in modes else modes[0]
  if not args.time_only and not set(args.focus_modes.split(",")) <= set(modes):
    parser.error(f"--focus_modes={args.focus_modes} must be among --modes={args.modes}.")
  if args.time_only:
    print(time_steps(args, []))
    return
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  done = {}
  if args.resume and (out / "runs.json").exists():
    budget = round(args.budget_fraction * args.steps)
    done = {run_key(r): r for r in json.loads((out / "runs.json").read_text())
            if r.get("config") == args.config and (r["steps"] == args.steps or (
                r["optimizer"] == "kron" and r["steps"] == budget))}
  requested = []
  for width in [int(w) for w in args.widths.split(",")]:
    for optimizer in args.optimizers.split(","):
      modes = args.modes.split(",") if optimizer == "kron" else ["-"]
      lrs = getattr(args, f"{optimizer}_lrs").split(",")
      for mode in modes:
        for lr in [float(x) for x in lrs]:
          requested.append((optimizer, mode if optimizer == "kron" else "Q0.5EQ1.5", lr,
                            width, args.steps))
  runs = {key: run for key, run in done.items() if key not in requested}  # by run_key

  def get(key):
    run = runs[key] = done.get(key) or run_one(args, *key)
    (out / "runs.json").write_text(json.dumps(list(runs.values()), indent=1))  # crash-safe
    print(f"{label(run)}, {run['steps']} steps: best val {run['best']:.4f}, "
          f"{run['step_time'] * 1e3:.0f} ms/step", flush=True)

  for key in requested:
    get(key)
  if args.budget_fraction and "kron" in args.optimizers:
    for mode in args.focus_modes.split(","):
      best = min((r for r in runs.values() if r["optimizer"] == "kron" and
                  r["mode"] == mode and r["steps"] == args.steps and r["width"] == 1),
                 key=lambda r: r["best"])
      get(("kron", mode, best["lr"], 1, round(args.budget_fraction * args.steps)))
  print(report(list(runs.values()), out, args.steps))
  if args.time_rounds:
    timing = time_steps(args, list(runs.values()))
    with open(out / "results.md", "a") as f:
      f.write("\n" + timing + "\n")
    print(timing)
  print(f"{jax.device_count()} {jax.devices()[0].platform} device(s); wrote {out}/")


if __name__ == "__main__":
  main()
