"""`adapt bench`: the bucketed case runs and reports what it keeps; the P1/P2/P6 ratios against the reference."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from adapt import bench
from conftest import ROOT


def test_ratios_against_the_reference_and_the_square_case():
    report = {"results": [
        {"name": "p1-sd15", "samples_per_s": 0.5, "step_s": 8.0, "peak_rss_mb": 6000.0, "matmul_fraction": 0.9,
         "flops_per_step": 1.0e12, "reference_flops_per_step": 1.85e12},
        {"name": "ref-sd15", "samples_per_s": 0.25, "step_s": 16.0, "peak_rss_mb": 8000.0},
        {"name": "p1-sd15-regional", "samples_per_s": 0.55, "step_s": 7.3, "peak_rss_mb": 6000.0, "matmul_fraction": 1.0},
        {"name": "p1-sd15-bf16", "samples_per_s": 0.9, "step_s": 4.4, "peak_rss_mb": 5000.0, "matmul_fraction": 1.5},
        {"name": "ref-sd15-bf16", "samples_per_s": 0.3, "step_s": 13.3, "peak_rss_mb": 6000.0},
        {"name": "train-tiny-cache", "samples_per_s": 30.0, "step_s": 0.25, "peak_rss_mb": 500.0},
        {"name": "train-tiny-buckets", "samples_per_s": 27.0, "step_s": 0.3, "peak_rss_mb": 520.0},
    ]}
    bench._speedups(report)
    by = {r["name"]: r for r in report["results"]}
    assert by["p1-sd15"]["P1_vs_reference"] == pytest.approx(2.0) and by["p1-sd15"]["P6_rss_vs_reference"] == pytest.approx(0.75)
    assert by["p1-sd15"]["P2_matmul_fraction"] == 0.9 and "P1_vs_reference" not in by["ref-sd15"]
    assert by["p1-sd15"]["P1_at_equal_flop_rate"] == pytest.approx(1.85) and "P1_at_equal_flop_rate" not in by["p1-sd15-bf16"]
    assert by["p1-sd15-regional"]["P1_vs_reference"] == pytest.approx(2.2)  # the compiled variant against the same reference
    # bf16: against the reference in bf16 (equal precision) and in fp32 (its default)
    assert by["p1-sd15-bf16"]["P1_vs_reference"] == pytest.approx(3.0)
    assert by["p1-sd15-bf16"]["P1_vs_reference_fp32"] == pytest.approx(3.6) and "P1_vs_reference_fp32" not in by["p1-sd15"]
    assert by["train-tiny-buckets"]["throughput_vs_square"] == pytest.approx(0.9)
    assert "P1_vs_reference=2.000" in bench.table({"machine": {"cpu": "x", "threads": 1, "torch": "t"}, **report})


@pytest.mark.parametrize("flag, case, p1", [("avx512_bf16", "p1-sd15-bf16", 3.6), (None, "p1-sd15", 2.0)])
def test_p1_at_each_trainers_default(monkeypatch, flag, case, p1):
    """adapt's default is train.mixed_precision=auto as it resolves on this CPU; the reference's is fp32."""
    from adapt import precision
    monkeypatch.setattr(precision, "cpu_bf16_flag", lambda *a: flag)
    report = {"machine": {"cpu": "x", "threads": 1, "torch": "t"}, "results": [
        {"name": "p1-sd15", "samples_per_s": 0.5, "step_s": 8.0, "peak_rss_mb": 6000.0},
        {"name": "ref-sd15", "samples_per_s": 0.25, "step_s": 16.0, "peak_rss_mb": 8000.0},
        {"name": "p1-sd15-bf16", "samples_per_s": 0.9, "step_s": 4.4, "peak_rss_mb": 5000.0},
        {"name": "p1-tiny", "samples_per_s": 50.0, "step_s": 0.16, "peak_rss_mb": 500.0}]}  # no ref-tiny: no tiny row
    report["defaults"] = bench.bench_reference.at_defaults(report)
    assert list(report["defaults"]) == ["sd15"]
    d = report["defaults"]["sd15"]
    assert (d["adapt_case"], d["reference_case"]) == (case, "ref-sd15") and d["P1"] == pytest.approx(p1)
    assert f"P1 at each trainer's default, sd15: {p1:.3f} ({case}: train.mixed_precision=auto" in bench.table(report)


def test_reference_cases_need_the_reference_trainer():
    exe = Path(sys.executable).parent / "adapt"
    r = subprocess.run([str(exe), "--threads", "1", "bench", "--config", "p1"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and "--reference-venv and --reference-script" in r.stderr


@pytest.mark.integration  # a bench subprocess per case: `make test-integration`
def test_bucketed_bench_case_reports_kept_pixels_and_throughput(tmp_path):
    exe = Path(sys.executable).parent / "adapt"
    r = subprocess.run([str(exe), "--threads", "1", "bench", "--config", "train-tiny-cache,train-tiny-buckets,p1-tiny", "--out",
                        str(tmp_path / "b.json")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    by = {x["name"]: x for x in json.loads((tmp_path / "b.json").read_text())["results"]}
    b = by["train-tiny-buckets"]
    assert b["buckets"] == ["48x80", "64x64", "80x48"] and b["kept_buckets"] > b["kept_square_crop"] + 0.1
    assert b["throughput_vs_square"] > 0 and b["peak_rss_mb"] > 0 and "throughput_vs_square" in r.stdout
    # the reference's work counted on the same pipeline (FLOP counts depend on shapes only): the embedded base's VAE
    # and text encoder, and LoRA on attn1 too, add 18% to adapt's cached step
    p = by["p1-tiny"]
    assert p["reference_flops_per_step"] / p["flops_per_step"] == pytest.approx(1.176, abs=0.002) and "P1_at_equal_flop_rate" in r.stdout
