"""The embedded base: loads by name through the normal loader; the demo config runs a few steps."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adapt import lora, model
from conftest import ROOT, read_log, run_recipe

ZOO = ROOT / "adapt" / "zoo" / "tiny-faces"


def test_embedded_base_loads_by_name():
    for name in ("tiny-faces", "adapt:tiny-faces"):
        pipe, facts = model.load_base(name)
        assert facts.resolved == str(ZOO) and facts.architecture == "sd" and facts.prediction_type == "epsilon"
        assert facts.vae_factor == 4 and facts.sample_size == 64
    assert pipe.unet.dtype == torch.float32  # stored fp16, loaded in the dtype asked for
    # diffusers reads attention_head_dim as the head count: heads of 2-4 channels made a LoRA step 1.38x slower
    widths = {m.inner_dim // m.heads for n, m in pipe.unet.named_modules() if n.endswith(("attn1", "attn2"))}
    assert widths == {32}, widths
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
                    "train.checkpointing_steps=0", "validation.steps=0", "validation.num_images=2", "decoder.steps=2"],
                   launcher="python")  # the demo config with its decoder phase cut to 2 of its 200 steps
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(read_log(out)) == 3 and (out / "validation" / "step_000003.png").is_file()
    assert "optim.warmup_steps (20) >= train.max_steps (3): the learning rate never reaches optim.lr (0.003)" in r.stdout
    f = lora.facts(out)
    assert f.base == "tiny-faces" and f.strength == 0.8 and f.num_images == 32


def _blocks(markdown: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", markdown, flags=re.S)


def _plain_python(code: str, cwd):
    """Run code in a fresh interpreter, as a user pastes it (no adapt test fixtures, no dtype arguments)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


def test_zoo_readme_load_line_runs_verbatim_in_plain_diffusers(tmp_path):
    (code,) = _blocks((ZOO / "README.md").read_text(), "python")
    extra = ("\nfrom diffusers import StableDiffusionImg2ImgPipeline\n"
             "i2i = StableDiffusionImg2ImgPipeline(**pipe.components)\n"
             "out = i2i('a face', image=image, strength=0.5, num_inference_steps=10).images[0]\n"
             "print('OK', image.size, out.size, pipe.text_encoder.dtype, pipe.unet.dtype)\n")
    r = _plain_python(code + extra, tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "OK (64, 64) (64, 64) torch.float32 torch.float32" in r.stdout


@pytest.mark.integration  # subprocess-heavy: `make test-integration`
def test_model_card_snippets_run_verbatim_and_agree(tmp_path):
    """The card of a freshly trained demo adapter: its plain-diffusers block and its `adapt sample` line run as
    written and give the same image (within 2/255). Trained into a relative out_dir with a space, as a user types it,
    and pasted in another directory."""
    (tmp_path / "work").mkdir()
    out = tmp_path / "work" / "runs" / "demo run"
    r = run_recipe(["--config", str(ROOT / "recipes/configs/tiny_sunglasses.yaml"), "out_dir=runs/demo run",
                    "train.max_steps=3", "train.checkpointing_steps=0", "validation.source=null", "decoder.steps=5"],
                   cwd=tmp_path / "work", launcher="python")
    assert r.returncode == 0, r.stderr[-3000:]
    card = (out / "README.md").read_text()
    from adapt import synth
    synth.render(synth.sample_face(synth.split_seed("val", 7)), sunglasses=False).save(tmp_path / "source.png")
    (py,) = _blocks(card, "python")
    assert "pipe.vae = AutoencoderKL.from_pretrained(" in py  # the demo ships its tuned decoder; both sides use it
    r = _plain_python(py, tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    (sh,) = _blocks(card, "bash")
    argv = shlex.split(sh.strip())
    assert argv[:2] == ["adapt", "sample"]
    r = subprocess.run([str(Path(sys.executable).parent / "adapt"), "--threads", "1", *argv[1:]], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    a = np.asarray(Image.open(tmp_path / "adapted.png"), dtype=float)
    b = np.asarray(Image.open(tmp_path / "adapted" / "img2img_000.png"), dtype=float)
    diff = np.abs(a - b).max()
    print(f"model card (plain diffusers) vs adapt sample --no-fuse: max pixel diff {diff:.0f}/255")
    assert a.shape == b.shape == (64, 64, 3) and diff <= 2


def test_model_card_commands_survive_paths_and_captions_as_pasted(tmp_path, monkeypatch):
    """An out_dir with a space, given relative, and a caption with quotes, `$`, a backslash and a newline: the card's
    shell line parses to exactly those arguments from any directory, and its Python block names exactly those strings."""
    import ast
    from adapt import config
    from adapt.card import write_model_card
    from adapt.facts import AdapterFacts
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my base").mkdir()
    out = Path("runs/my run")
    out.mkdir(parents=True)
    caption = 'a "sks" face, $HOME `x` \\ it\'s\nsecond line'
    f = AdapterFacts(architecture="sd", base="my base", base_resolved=str(tmp_path / "my base"), preset="cross_attn",
                     rank=4, alpha=4.0, strength=0.6, window="img2img_exact", window_range=[1, 561], scheduler="ddim",
                     inference_steps=25, steps_trained=3, resolution=64, dataset="d", example_prompt=caption,
                     audit={"num_modules": 1, "trainable_params": 10})
    cfg = config.RunConfig(data=config.DataConfig(source="d"))
    card = write_model_card(out, f, cfg).read_text()
    (sh,) = _blocks(card, "bash")
    argv = shlex.split(sh.strip())
    args = dict(zip(argv[2::2], argv[3::2]))
    assert args["--adapter"] == str(tmp_path / "runs" / "my run")  # absolute: the card works from anywhere
    assert args["--base"] == str(tmp_path / "my base") and args["--prompt"] == caption
    (py,) = _blocks(card, "python")
    strings = [n.value for n in ast.walk(ast.parse(py)) if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    assert caption in strings and str(tmp_path / "runs" / "my run") in strings and str(tmp_path / "my base") in strings
