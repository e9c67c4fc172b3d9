"""The `adapt` command: sample (txt2img, img2img with stored strength), inspect, data build, clean errors."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adapt.facts import AdapterFacts
from adapt import lora, model
from conftest import ROOT


def adapt_cli(*args, timeout=300):
    exe = Path(sys.executable).parent / "adapt"
    return subprocess.run([str(exe), "--threads", "1", *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def adapter_dir(tiny_base, tmp_path_factory):
    """A saved adapter with random (non-zero) LoRA weights and stored strength 0.5."""
    out = tmp_path_factory.mktemp("adapter")
    pipe, facts = model.load_base(str(tiny_base))
    lora.attach(pipe.unet, "cross_attn", rank=4, alpha=4)
    g = torch.Generator().manual_seed(0)
    for n, p in pipe.unet.named_parameters():
        if "lora_B" in n:
            p.data = torch.randn(p.shape, generator=g) * 0.5
    lora.save(out, pipe.unet, AdapterFacts(base=str(tiny_base), strength=0.5, inference_steps=10, scheduler="ddim",
                               architecture="sd", rank=4, alpha=4))
    return out


@pytest.mark.integration  # subprocess-heavy: `make test-integration`
def test_data_build_then_sample_img2img_with_stored_strength(tiny_base, adapter_dir, tmp_path):
    r = adapt_cli("data", "build", "synth_faces", "--out", tmp_path / "faces", "--n", 2, "--split", "eval")
    assert r.returncode == 0, r.stderr
    img = tmp_path / "faces" / "eval_000000.png"
    r = adapt_cli("sample", "--base", tiny_base, "--adapter", adapter_dir, "--image", img, "--out", tmp_path / "s",
                  "--prompt", "{caption} wearing sunglasses", "--grid", tmp_path / "grid.png")
    assert r.returncode == 0, r.stderr
    assert "using strength 0.5 stored in adapter" in r.stdout
    out = Image.open(tmp_path / "s" / "img2img_000.png")
    assert out.size == (64, 64)
    assert Image.open(tmp_path / "grid.png").size[0] > 3 * 64
    # scale 0 reproduces the base exactly
    r0 = adapt_cli("sample", "--base", tiny_base, "--adapter", adapter_dir, "--scale", 0, "--image", img, "--out", tmp_path / "s0")
    rb = adapt_cli("sample", "--base", tiny_base, "--image", img, "--strength", 0.5, "--steps", 10, "--out", tmp_path / "sb")
    assert r0.returncode == 0 and rb.returncode == 0, r0.stderr + rb.stderr
    a = np.asarray(Image.open(tmp_path / "s0" / "img2img_000.png"))
    b = np.asarray(Image.open(tmp_path / "sb" / "img2img_000.png"))
    assert np.array_equal(a, b)


def test_txt2img_and_missing_strength(tiny_base, tmp_path):
    r = adapt_cli("sample", "--base", tiny_base, "--prompt", "a face", "--num-images", 2, "--steps", 4, "--out", tmp_path)
    assert r.returncode == 0, r.stderr
    assert len(list(tmp_path.glob("txt2img_*.png"))) == 2
    Image.new("RGB", (64, 64)).save(tmp_path / "x.png")
    r = adapt_cli("sample", "--base", tiny_base, "--image", tmp_path / "x.png", "--out", tmp_path)
    assert r.returncode != 0 and "--strength is required" in r.stderr


def test_inspect(adapter_dir):
    r = adapt_cli("inspect", adapter_dir, "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["num_modules"] == 16 and info["self_attention_modules"] == 0 and info["rank"] == 4
    assert info["facts"]["strength"] == 0.5


@pytest.mark.integration  # subprocess-heavy: `make test-integration`
def test_errors_are_one_clear_line(tiny_base, tmp_path):
    (tmp_path / "evil.bin").write_bytes(b"\x80\x04K\x01.")
    r = adapt_cli("inspect", tmp_path / "evil.bin")
    assert r.returncode == 2 and "pickle" in r.stderr and "Traceback" not in r.stderr
    r = adapt_cli("sample", "--base", tmp_path / "nope", "--out", tmp_path)
    assert r.returncode == 2 and "not found" in r.stderr and "Traceback" not in r.stderr
    r = adapt_cli("sample", "--base", tiny_base, "--prompt", "a face", "--device", "cuda", "--out", tmp_path)
    assert r.returncode == 2 and "CUDA is not available" in r.stderr and "Traceback" not in r.stderr


def test_device_and_dtype_choice():
    import torch
    assert model.pick_device("auto") == model.pick_device(None) == torch.device("cpu")  # this machine has no GPU
    assert model.pick_dtype("auto", torch.device("cpu")) == torch.float32
    assert model.pick_dtype("auto", torch.device("cuda")) == torch.float16
    with pytest.raises(model.ModelError, match="dtype 'fp8'"):
        model.pick_dtype("fp8", torch.device("cpu"))
    with pytest.raises(model.ModelError, match="device 'gpu0'"):
        model.pick_device("gpu0")


def test_sample_keeps_each_inputs_aspect_and_the_grid_pads(tiny_base, adapter_dir, tmp_path):
    """A portrait and a landscape photo run img2img at their own aspect (within --resolution² pixels, sides
    multiples of the VAE factor), the outputs are written at that size, and the grid pads rather than squashes."""
    from adapt import synth
    paths = []
    for name, aspect, scale in (("portrait.png", 0.5, 3.0), ("landscape.png", 1.5, 2.0)):
        img, _, _ = synth.make_photo("faces", "eval", 0, 64, aspect, scale)
        img.save(tmp_path / name)
        paths.append(tmp_path / name)
    r = adapt_cli("sample", "--base", tiny_base, "--adapter", adapter_dir, "--image", *paths, "--resolution", 128,
                  "--out", tmp_path / "s", "--grid", tmp_path / "grid.png", "--mask", "auto")
    assert r.returncode == 0, r.stderr
    sizes = [Image.open(tmp_path / "s" / f"img2img_00{i}.png").size for i in range(2)]
    assert sizes == [(88, 176), (144, 96)]  # 192x384 and 192x128 inputs at 128² px, multiples of 8
    for (w, h), src in zip(sizes, paths):
        sw, sh = Image.open(src).size
        assert abs(w / h - sw / sh) / (sw / sh) < 0.05 and w * h <= 128 * 128
    assert [Image.open(tmp_path / "s" / f"mask_00{i}.png").size for i in range(2)] == sizes
    g = Image.open(tmp_path / "grid.png")
    assert g.size == (4 * (144 + 2) + 2, 2 * (176 + 2) + 2)  # cells as large as the largest image, 4 columns
