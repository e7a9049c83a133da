"""scripts/bench_heldout.py as a user runs it: its table and its paired margins."""

import json
import math
import re
import statistics
import subprocess
import sys

from trainer_utils import REPO


def test_table_columns_and_paired_margins_match_the_saved_losses(tmp_path):
  out = subprocess.run(
      [sys.executable, "scripts/bench_heldout.py", "--tasks", "teacher", "--schedules",
       "constant", "--optimizers", "muon,kron", "--seeds", "0,1,2", "--lrs", "1e-3",
       "--steps", "20", "--evals", "2", "--out", str(tmp_path)],
      cwd=REPO, capture_output=True, text=True, check=True).stdout
  rows = [line for line in out.splitlines() if line.startswith("|")]
  header, _, row = rows
  assert header.count("|") == row.count("|") == 6  # task, schedule, muon, kron, margin
  results = {r["optimizer"]: r for r in json.loads((tmp_path / "heldout.json").read_text())}
  muon, kron = (results[n]["per_seed"]["0.001"] for n in ("muon", "kron"))
  assert len(kron) == len(muon) == 3 and kron != muon
  diffs = [k - m for k, m in zip(kron, muon)]
  mean, se = statistics.mean(diffs), statistics.stdev(diffs) / math.sqrt(3)
  ratio, printed_mean, printed_se = re.search(
      r"([0-9.]+)x \(([-+][0-9.]+) \+- ([0-9.]+)\)", row).groups()
  assert float(ratio) == round(statistics.mean(kron) / statistics.mean(muon), 3)
  assert float(printed_mean) == round(mean, 4) and float(printed_se) == round(se, 4)
