"""The prepared GPU check runs its whole path on CPU with tiny models (the numbers come from a GPU run)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_tiny_path_on_cpu(tmp_path):
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    r = subprocess.run([sys.executable, str(ROOT / "recipes/gpu_check.py"), "--out", str(tmp_path), "--tiny"],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    for case in ("sd15", "sdxl"):
        (run,) = res["cases"][case]["runs"]
        assert run["trainer"] == "adapt cross_attn" and run["steps"] == 3 and run["samples_s"] > 0
        assert run["loss_first_quarter"] > 0 and run["loss_last_quarter"] > 0
    assert "| sdxl | adapt cross_attn |" in (tmp_path / "results.md").read_text()


@pytest.mark.slow
def test_gpu_check_compile_run_on_cpu(tmp_path):
    """--compile adds an adapt run with train.compile=regional beside the eager one."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    r = subprocess.run([sys.executable, str(ROOT / "recipes/gpu_check.py"), "--out", str(tmp_path), "--tiny", "--cases", "sd15",
                        "--compile", "--no-reference"], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    eager, compiled = json.loads((tmp_path / "results.json").read_text())["cases"]["sd15"]["runs"]
    assert eager["trainer"] == "adapt cross_attn" and compiled["trainer"] == "adapt cross_attn compile=regional"
    assert compiled["steps"] == 3 and compiled["samples_s"] > 0
    assert "compile: regional" in (tmp_path / "adapt_sd15_cross_attn_compile" / "train.log").read_text()
