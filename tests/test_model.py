"""Base loading: the same path for the tiny model as for a real checkpoint; clear errors."""

import pytest

from adapt import model


def test_facts_of_tiny_pipeline(tiny_base, tiny_v_base):
    _, f = model.load_base(str(tiny_base))
    assert (f.architecture, f.prediction_type, f.vae_factor, f.latent_channels) == ("sd", "epsilon", 8, 4)
    assert f.scaling_factor == 0.5 and f.shift_factor == 0.0 and f.num_train_timesteps == 1000
    assert f.text_hidden_size == 32 and f.sample_size == 64
    _, fv = model.load_base(str(tiny_v_base))
    assert fv.prediction_type == "v_prediction"


def test_missing_path(tmp_path):
    with pytest.raises(model.ModelError, match="not found"):
        model.load_base(str(tmp_path / "nope" / "deeper"))


def test_folder_that_is_not_a_pipeline(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(model.ModelError, match="not a diffusers pipeline"):
        model.load_base(str(tmp_path))


def test_hub_id_offline_names_the_id():
    with pytest.raises(model.ModelError, match=r"stable-diffusion-v1-5/stable-diffusion-v1-5.*unreachable"):
        model.load_base("stable-diffusion-v1-5/stable-diffusion-v1-5")


def test_unknown_embedded_name():
    with pytest.raises(model.ModelError, match="no embedded model"):
        model.load_base("adapt:does-not-exist")


def test_pickle_single_file_refused(tmp_path):
    f = tmp_path / "model.ckpt"
    f.write_bytes(b"x")
    with pytest.raises(model.ModelError, match="pickle"):
        model.load_base(str(f))


def test_single_file_checkpoint_loads_and_trains(tmp_path):
    """An original-layout (WebUI) .safetensors goes through diffusers' single-file loader, exactly."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from adapt import synth
    from adapt.singlefile import save_sd1_checkpoint
    from adapt.tiny import build_tiny_components
    from conftest import ROOT, run_recipe
    c = build_tiny_components()
    torch.manual_seed(0)  # SD 1.x block layout (4 blocks, 2 layers each), tiny widths
    c["unet"] = UNet2DConditionModel(sample_size=8, layers_per_block=2, block_out_channels=(32, 32, 64, 64),
                                     down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                     up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                                     cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
    c["vae"] = AutoencoderKL(block_out_channels=(8, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
                             up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, norm_num_groups=4, sample_size=64)
    pipe = StableDiffusionPipeline(**c)
    pipe.save_pretrained(tmp_path / "folder")  # configs only are needed from here
    ckpt = save_sd1_checkpoint(pipe, tmp_path / "model.safetensors")
    loaded, facts = model.load_base(str(ckpt), config=str(tmp_path / "folder"))
    assert facts.resolved == str(ckpt) and facts.architecture == "sd"
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k].reshape(a[k].shape)) for k in a), name
    data = synth.build_imagefolder("sunglasses", tmp_path / "d", n=4, split="train")
    r = run_recipe(["--config", str(ROOT / "recipes/configs/tiny_test.yaml"), f"model.base={ckpt}",
                    f"model.config={tmp_path / 'folder'}", f"data.source={data}", f"out_dir={tmp_path / 'o'}",
                    "train.max_steps=2"], launcher="python")
    assert r.returncode == 0, r.stderr[-2000:]
