"""recipes/pretrain_ldm.py checkpoints in adapt's safetensors + JSON format (no pickle) and resumes from it."""

import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.integration


def test_pretrain_checkpoints_are_safetensors_and_resume(tmp_path):
    work, export = tmp_path / "work", tmp_path / "export"
    base = [sys.executable, str(ROOT / "recipes" / "pretrain_ldm.py"), "--config", str(ROOT / "recipes/configs/pretrain_tiny_faces.yaml"),
            f"out_dir={work}", f"export_dir={export}", "num_images=16", "vae_steps=2", "vae_batch=2", "unet_batch=2",
            "checkpoint_every=1", "num_threads=1"]
    r = subprocess.run(base + ["unet_steps=2"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (export / "model_index.json").is_file()
    assert not [p for p in work.rglob("*") if p.suffix in (".pt", ".bin", ".pkl", ".pth")]
    assert (work / "unet_checkpoints" / "checkpoint-2" / "model.safetensors").is_file()
    (work / "unet_ema_final.safetensors").unlink()
    r = subprocess.run(base + ["unet_steps=3"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "UNet: resumed at step 2" in r.stdout + r.stderr
