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


def test_gpu_check_deadline_skips_and_lists_runs(tmp_path):
    """A lease too short for the plan returns a results file that names every skipped run, and exits non-zero."""
    res_dir = tmp_path / "res"
    r = subprocess.run([sys.executable, str(ROOT / "recipes/gpu_check.py"), "--out", str(tmp_path / "out"), "--tiny",
                        "--compile", "sd15", "--deadline", "20", "--results", str(res_dir)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, (r.stdout + r.stderr)[-3000:]
    assert "skipped" in r.stdout
    # --deadline 20 leaves under 30 s for every run: nothing is built or launched, and each planned run is named
    assert not (tmp_path / "out" / "base_sd15").exists()
    for d in (tmp_path / "out", res_dir):
        res = json.loads((d / "results.json").read_text())
        assert [x.split(":")[0] for x in res["skipped"]] == ["sd15 adapt", "sdxl adapt", "sd15 compile"]
        assert all(not r["runs"] for r in res["cases"].values())
        assert "skipped: sd15 compile" in (d / "results.md").read_text()


def test_gpu_check_sh_runs_the_check_verbatim(tmp_path):
    """`bash recipes/gpu_check.sh OUT ARGS` (the README's command): environment set-up, versions, then gpu_check.py."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", WHEELS=str(tmp_path / "no_wheels"))
    r = subprocess.run(["bash", str(ROOT / "recipes/gpu_check.sh"), str(tmp_path), "--tiny", "--cases", "sd15", "--deadline", "20"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 1, (r.stdout + r.stderr)[-3000:]  # every run skipped: the check says so in its exit code
    assert "torch " in r.stdout and " datasets " in r.stdout  # the versions line
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["skipped"][0].startswith("sd15 adapt:")
