"""recipes/pretrain_ldm.py checkpoints in adapt's safetensors + JSON format (no pickle) and resumes from it."""

import json
import signal
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


def test_pretrain_options_are_validated():
    from adapt import config
    with pytest.raises(config.ConfigError, match="vae_latent_channels: must be 4, 8 or 16, got 6"):
        config.PretrainConfig(vae_latent_channels=6)
    with pytest.raises(config.ConfigError, match="vae_edge_weight: must be >= 0, got -1"):
        config.PretrainConfig(vae_edge_weight=-1.0)
    with pytest.raises(config.ConfigError, match="unet_heads: must divide the UNet's 64 and 128 channels, got 3"):
        config.PretrainConfig(unet_heads=3)


def test_a_bad_pretrain_value_is_one_error_line(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "recipes" / "pretrain_ldm.py"), "--config",
                        str(ROOT / "recipes/configs/pretrain_tiny_faces.yaml"), "unet_heads=3", f"out_dir={tmp_path}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "error: unet_heads: must divide the UNet's 64 and 128 channels, got 3" in r.stderr


def test_pretrain_reuses_a_vae_as_it_is_and_sets_the_head_count(tmp_path):
    """vae_from keeps the VAE's weights and scaling_factor bit for bit (latent caches and tuned decoders made
    against it stay valid); unet_heads is what diffusers reads as the head count."""
    from safetensors.torch import load_file
    work, export, zoo = tmp_path / "work", tmp_path / "export", ROOT / "adapt" / "zoo" / "tiny-faces"
    r = subprocess.run([sys.executable, str(ROOT / "recipes" / "pretrain_ldm.py"), "--config",
                        str(ROOT / "recipes/configs/pretrain_tiny_faces.yaml"), f"out_dir={work}", f"export_dir={export}",
                        f"vae_from={zoo}", "unet_heads=2", "num_images=16", "unet_steps=1", "unet_batch=2", "num_threads=1"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    name = "vae/diffusion_pytorch_model.safetensors"
    ours, theirs = load_file(str(export / name)), load_file(str(zoo / name))
    assert ours.keys() == theirs.keys() and all(ours[k].equal(theirs[k]) for k in ours)
    read = lambda p: json.loads(p.read_text())
    assert read(export / "vae/config.json")["scaling_factor"] == read(zoo / "vae/config.json")["scaling_factor"]
    assert read(export / "unet/config.json")["attention_head_dim"] == 2


def test_pretrain_with_8_latent_channels_exports_a_pipeline_plain_diffusers_runs(tmp_path):
    """The 8-channel VAE option (and the edge loss) end to end: the export loads in plain diffusers and img2img runs."""
    work, export = tmp_path / "work", tmp_path / "export"
    r = subprocess.run([sys.executable, str(ROOT / "recipes" / "pretrain_ldm.py"), "--config",
                        str(ROOT / "recipes/configs/pretrain_tiny_faces.yaml"), f"out_dir={work}", f"export_dir={export}",
                        "num_images=16", "vae_steps=2", "vae_batch=2", "unet_steps=2", "unet_batch=2", "checkpoint_every=1",
                        "vae_latent_channels=8", "vae_edge_weight=1.0", "num_threads=1"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    code = (f"import torch; from PIL import Image; from diffusers import StableDiffusionImg2ImgPipeline\n"
            f"pipe = StableDiffusionImg2ImgPipeline.from_pretrained({str(export)!r})\n"
            f"assert pipe.vae.config.latent_channels == 8 and pipe.unet.config.in_channels == 8\n"
            f"img = pipe('a face', image=Image.new('RGB', (64, 64), (200, 150, 120)), strength=0.5, num_inference_steps=4,\n"
            f"           generator=torch.Generator().manual_seed(0)).images[0]\n"
            f"print('size', img.size)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "size (64, 64)" in r.stdout, r.stderr[-3000:]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP], ids=["ctrl_c", "hang_up"])
def test_a_stop_during_pretraining_checkpoints_the_step_it_stopped_at(sig, tmp_path):
    """A real SIGINT (Ctrl-C) or SIGHUP (a closed terminal) in the UNet stage: the step finishes, a checkpoint is
    written there (not only at the last checkpoint_every), exit 128 + signal with no traceback, the stop is in
    pretrain.log as well as on stdout, and the same command resumes from it."""
    import time

    from conftest import signals_as_in_a_terminal
    work, export = tmp_path / "work", tmp_path / "export"
    base = [sys.executable, "-u", str(ROOT / "recipes" / "pretrain_ldm.py"), "--config",
            str(ROOT / "recipes/configs/pretrain_tiny_faces.yaml"), f"out_dir={work}", f"export_dir={export}",
            "num_images=16", "vae_steps=2", "vae_batch=2", "unet_batch=2", "checkpoint_every=100000", "num_threads=1"]
    p = subprocess.Popen(base + ["unet_steps=100000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=signals_as_in_a_terminal)
    seen = []
    for line in p.stdout:  # the UNet logs every 50 steps
        seen.append(line)
        if "UNet step 50/" in line:
            break
    assert p.poll() is None, "".join(seen) + p.stderr.read()
    time.sleep(0.5)
    p.send_signal(sig)
    rest, err = p.communicate(timeout=120)
    out = "".join(seen) + rest
    assert p.returncode == 128 + sig and "Traceback" not in err, err[-3000:]
    (ck,) = sorted((work / "unet_checkpoints").glob("checkpoint-*"))
    step = int(ck.name.split("-")[1])
    said = f"{sig.name}: stopped after UNet step {step} with a checkpoint in"
    assert step >= 50 and said in out, out[-2000:]
    assert said in (work / "pretrain.log").read_text()  # the record a closed terminal does not take with it
    assert not export.exists()
    r = subprocess.run(base + [f"unet_steps={step + 1}"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"UNet: resumed at step {step}" in r.stdout and (export / "model_index.json").is_file()
