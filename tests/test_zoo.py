"""The embedded base: loads by name through the normal loader; the demo config runs a few steps."""

import json

import torch

from adapt import lora, model
from conftest import ROOT, read_log, run_recipe

ZOO = ROOT / "adapt" / "zoo" / "tiny-faces"


def test_embedded_base_loads_by_name():
    for name in ("tiny-faces", "adapt:tiny-faces"):
        pipe, facts = model.load_base(name)
        assert facts.resolved == str(ZOO) and facts.architecture == "sd" and facts.prediction_type == "epsilon"
        assert facts.vae_factor == 4 and facts.sample_size == 64
    assert pipe.unet.dtype == torch.float32  # stored fp16, loaded in the dtype asked for
    stats = json.loads((ZOO / "stats.json").read_text())
    assert abs(stats["scaled_overall_std"] - 1) < 0.05 and stats["vae_psnr_db"] >= 28
    size = sum(f.stat().st_size for f in ZOO.rglob("*") if f.is_file())
    assert size <= 30e6


def test_latent_shift_fold_kept_scaled_latents_centered():
    from adapt import cache, data
    pipe, facts = model.load_base("tiny-faces")
    px, _, _ = data.load(str(ROOT / "datasets" / "synth_faces"), 64, "eval", num_images=16, logger=lambda m: None)
    stats = cache.latent_stats(cache.encode_posteriors(pipe.vae, px), facts.scaling_factor)
    assert 0.9 < stats["overall_std"] < 1.1 and abs(stats["overall_mean"]) < 0.15


def test_demo_config_short_run(tmp_path):
    out = tmp_path / "demo"
    r = run_recipe(["--config", str(ROOT / "recipes/configs/tiny_sunglasses.yaml"), f"out_dir={out}", "train.max_steps=3",
                    "train.checkpointing_steps=0", "validation.steps=0", "validation.num_images=2"], launcher="python")
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(read_log(out)) == 3 and (out / "validation" / "step_000003.png").is_file()
    f = lora.facts(out)
    assert f["base"] == "tiny-faces" and f["strength"] == 0.6 and f["num_images"] == 32
