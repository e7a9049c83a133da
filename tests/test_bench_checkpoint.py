"""scripts/bench_checkpoint.py, as the README runs it, on a tiny model."""

import re
import subprocess
import sys

from trainer_utils import REPO, trainer_env

def test_bench_checkpoint_runs_and_reports_both_save_modes(tmp_path):
  config = tmp_path / "tiny.py"
  config.write_text(
      "import sys\n"
      f"sys.path.insert(0, {str(REPO / 'tests')!r})\n"
      "from trainer_utils import tiny_config\n"
      "def get_config():\n"
      "  return tiny_config()\n")
  result = subprocess.run(
      [sys.executable, "scripts/bench_checkpoint.py", "--config", str(config), "--saves", "2",
       "--steps_between", "1"], cwd=REPO, env=trainer_env(), capture_output=True, text=True,
      timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  rows = re.findall(r"^\| (async|sync) \| ([\d.]+) \| ([\d.]+)% \|$", result.stdout, re.M)
  assert [mode for mode, *_ in rows] == ["async", "sync"]
  assert all(float(ms) > 0 for _, ms, _ in rows)
