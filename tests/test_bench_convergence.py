"""scripts/bench_convergence.py's sweep bookkeeping, with training and timing stubbed
(each real run trains the CPU LM for minutes; tests/test_trainer.py covers training)."""

import importlib.util
import json
import sys

import pytest

from trainer_utils import REPO


@pytest.fixture
def bench(monkeypatch):
  """The script as a module, with run_one returning a made-up curve (loss 2 + lr) and
  each step timer a constant."""
  spec = importlib.util.spec_from_file_location(
      "bench_convergence", REPO / "scripts" / "bench_convergence.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  module.trained = []

  def run_one(args, optimizer, mode, lr, width, steps):
    module.trained.append((optimizer, mode, lr, steps))
    return dict(optimizer=optimizer, mode=mode, lr=lr, width=width, steps=steps,
                config=args.config, curve=[(steps // 2, 3.0), (steps, 2.0 + lr)],
                best=2.0 + lr, step_time=0.01)
  monkeypatch.setattr(module, "run_one", run_one)
  monkeypatch.setattr(module, "plot", lambda *a, **k: None)
  monkeypatch.setattr(module, "step_timer", lambda *a, **k: lambda: 0.01)

  def main(*argv):
    monkeypatch.setattr(sys, "argv", ["bench_convergence.py", *argv])
    module.main()
  module.run = main
  return module


def test_timing_without_adamw_in_the_sweep(bench, tmp_path, capsys):
  bench.run("--optimizers", "kron,muon", "--modes", "QEQ", "--kron_lrs", "1e-3",
            "--muon_lrs", "1e-3", "--budget_fraction", "0", "--time_rounds", "2",
            "--out", str(tmp_path))
  assert "adamw" in capsys.readouterr().out  # the baseline is timed all the same


def test_the_focus_mode_defaults_to_a_swept_one_and_must_be_swept(bench, tmp_path):
  common = ("--optimizers", "kron", "--kron_lrs", "1e-3", "--time_rounds", "0",
            "--steps", "400", "--out", str(tmp_path))
  bench.run("--modes", "Q0.5EQ1.5", *common)  # the config's QEQ is not swept
  assert bench.trained[-1] == ("kron", "Q0.5EQ1.5", 1e-3, 300)  # its shorter budget
  with pytest.raises(SystemExit):
    bench.run("--modes", "Q0.5EQ1.5", "--focus_modes", "QEQ", *common)


def test_resume_keeps_only_runs_of_the_same_steps(bench, tmp_path):
  common = ("--optimizers", "adamw", "--adamw_lrs", "1e-3", "--time_rounds", "0",
            "--budget_fraction", "0", "--out", str(tmp_path))
  bench.run("--steps", "200", *common)
  bench.run("--steps", "400", "--resume", *common)
  assert bench.trained == [("adamw", "Q0.5EQ1.5", 1e-3, 200), ("adamw", "Q0.5EQ1.5", 1e-3, 400)]
  saved = json.loads((tmp_path / "runs.json").read_text())
  assert [r["steps"] for r in saved] == [400]
  bench.run("--steps", "400", "--resume", *common)  # the same sweep again: nothing to redo
  assert len(bench.trained) == 2
