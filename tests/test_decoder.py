"""The target-domain decoder (adapt.decoder): fine-tuning, the vae/ folder plain diffusers loads, the guards,
and the recipe, CLI and eval paths that ship and use it."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from adapt import decoder, facts, lora, synth
from conftest import recipe_args, run_recipe


def _vae(tiny_base):
    from diffusers import AutoencoderKL
    return AutoencoderKL.from_pretrained(str(tiny_base), subfolder="vae")


def _pixels(n=6):
    return [torch.from_numpy(np.asarray(synth.make("sunglasses", "train", i)[0], np.float32) / 127.5 - 1).permute(2, 0, 1)
            for i in range(n)]


def test_finetune_moves_only_the_decoder_and_is_deterministic(tiny_base, tmp_path):
    px = _pixels()
    base, a, b = _vae(tiny_base), _vae(tiny_base), _vae(tiny_base)
    fa = decoder.finetune(a, px, steps=12, lr=1e-3, batch_size=4, seed=0, log=lambda m: None)
    fb = decoder.finetune(b, px, steps=12, lr=1e-3, batch_size=4, seed=0, log=lambda m: None)
    assert fa["loss_last"] < fa["loss_first"], fa
    sa, sb, s0 = a.state_dict(), b.state_dict(), base.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # same seed, same decoder
    enc = [k for k in sa if k.startswith(("encoder.", "quant_conv."))]
    dec = [k for k in sa if k.startswith(("decoder.", "post_quant_conv."))]
    assert enc and all(torch.equal(sa[k], s0[k]) for k in enc)
    assert any(not torch.equal(sa[k], s0[k]) for k in dec)
    # a stop request ends it before the next step: None, nothing to save
    assert decoder.finetune(_vae(tiny_base), px, 5, 1e-3, 4, 0, stop=lambda: 2, log=lambda m: None) is None


def test_saved_folder_loads_in_plain_diffusers_and_is_guarded(tiny_base, tmp_path):
    from diffusers import AutoencoderKL
    vae = _vae(tiny_base)
    figs = decoder.finetune(vae, _pixels(4), 4, 1e-3, 2, 0, log=lambda m: None)
    folder = decoder.save(vae, tmp_path / "ad", "k1", figs)
    assert decoder.saved(tmp_path / "ad") == ("k1", figs)
    plain = AutoencoderKL.from_pretrained(str(folder))  # what the model card tells a diffusers user to run
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in vae.state_dict().items())
    (tmp_path / "ad" / lora.WEIGHTS_NAME).write_bytes(b"")  # found from the folder and from its weights file
    assert decoder.find(tmp_path / "ad") == folder == decoder.find(tmp_path / "ad" / lora.WEIGHTS_NAME)
    assert decoder.find(tmp_path) is None and decoder.load(tmp_path, _vae(tiny_base)) is None
    loaded = decoder.load(tmp_path / "ad", _vae(tiny_base))
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in vae.state_dict().items())

    # a VAE whose encoder differs (another base) is refused, naming the folder and the first differing weight
    other = _vae(tiny_base)
    with torch.no_grad():
        other.encoder.conv_in.weight.add_(0.1)
    with pytest.raises(decoder.DecoderError, match=r"ad/vae: its encoder differs .*encoder\.conv_in\.weight"):
        decoder.load(tmp_path / "ad", other)
    # and so is one of another architecture
    cfg = json.loads((folder / "config.json").read_text())
    cfg["scaling_factor"] = 0.25
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(decoder.DecoderError, match=r"scaling_factor \(0\.25 vs 0\.5\)"):
        decoder.load(tmp_path / "ad", _vae(tiny_base))
    # a torn weights file is not reused
    (folder / decoder.WEIGHTS).write_bytes(b"\x00" * 10)
    assert decoder.saved(tmp_path / "ad") == (None, {})


def test_decoder_tuned_beside_a_bf16_base_loads_against_the_fp32_base(tiny_base, tmp_path):
    """model.dtype=bfloat16 (the SD configs): the saved encoder is the base's rounded to bf16. Sampling in fp32 takes
    it (compared at bf16) and encodes with the fp32 base's own encoder; another encoder is still refused."""
    bf = _vae(tiny_base).to(torch.bfloat16)
    figs = decoder.finetune(bf, _pixels(4), 3, 1e-3, 2, 0, log=lambda m: None)  # trains in fp32, as the recipe
    decoder.save(bf, tmp_path / "ad", "k", figs, base_dtype=torch.bfloat16)
    fp32 = _vae(tiny_base)
    loaded = decoder.load(tmp_path / "ad", fp32)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in fp32.state_dict().items() if k.startswith("encoder."))
    assert torch.equal(loaded.decoder.conv_out.weight, bf.decoder.conv_out.weight)  # the tuned decoder, as trained
    half = _vae(tiny_base).to(torch.float16)  # `adapt sample --dtype auto` on a GPU: rounded again, to fp16
    assert decoder.load(tmp_path / "ad", half).encoder.conv_in.weight.dtype == torch.float16
    other = _vae(tiny_base)
    with torch.no_grad():
        other.encoder.conv_in.weight.mul_(1.1)  # beyond bf16 rounding
    with pytest.raises(decoder.DecoderError, match=r"first at encoder\.conv_in\.weight"):
        decoder.load(tmp_path / "ad", other)


def test_resume_of_a_checkpoint_older_than_the_decoder_keys():
    # checkpoints written before the decoder section ran without one: that is decoder.steps=0, not a change
    saved = {"data.source": "d", "optim.lr": 1e-3}
    changes, refused = facts.resume_changes(saved, {**saved, "decoder.steps": 0, "decoder.lr": 1e-4,
                                                    "decoder.batch_size": 8}, [])
    assert changes == {} and refused == []
    changes, refused = facts.resume_changes(saved, {**saved, "decoder.steps": 50}, [])
    assert refused == ["decoder.steps"] and changes["decoder.steps"] == [0, 50]


@pytest.mark.integration  # two `accelerate launch` runs (38 s): `make test-integration`
def test_recipe_ships_the_decoder_and_every_loader_uses_it(tiny_base, sg_folder, tmp_path, capsys):
    """accelerate launch with decoder.steps: vae/ beside the adapter, recorded in the facts and the model card, reused
    by a resume, loaded by `adapt sample` (and dropped by --base-decoder), and by plain diffusers as the card says."""
    out = tmp_path / "run"
    val = [f"validation.source={sg_folder}", "validation.num_images=2", "validation.steps=0"]
    args = recipe_args(tiny_base, sg_folder, out, "decoder.steps=6", "decoder.lr=1e-2", "decoder.batch_size=4",
                       "train.max_steps=4", "train.checkpointing_steps=2")
    r = run_recipe(args + val)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "decoder: fine-tuning the VAE decoder on 8 images, 6 steps" in r.stdout
    assert (out / "vae" / "config.json").is_file() and (out / "vae" / decoder.WEIGHTS).is_file()
    f = lora.facts(out)
    assert f.decoder["folder"] == "vae" and f.decoder["steps"] == 6 and f.decoder["loss_last"] > 0
    card = (out / "README.md").read_text()
    assert f'pipe.vae = AutoencoderKL.from_pretrained("{out / "vae"}")' in card and "| VAE decoder |" in card

    grid = np.asarray(Image.open(out / "validation" / "step_000004.png"), float)

    # a resume from checkpoint-2 reuses the saved decoder instead of training it again
    r = run_recipe(args + ["train.max_steps=6", "train.resume_from_checkpoint=latest"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "decoder: reusing" in r.stdout and "fine-tuning the VAE decoder" not in r.stdout

    # adapt sample decodes with it; --base-decoder with the base's
    from adapt import cli
    src = sg_folder / "train_000000.png"
    common = ["sample", "--base", str(tiny_base), "--adapter", str(out), "--image", str(src), "--strength", "0.6",
              "--steps", "10", "--overwrite"]
    assert cli.main(common + ["--out", str(tmp_path / "tuned")]) == 0
    assert cli.main(common + ["--out", str(tmp_path / "based"), "--base-decoder"]) == 0
    tuned = np.asarray(Image.open(tmp_path / "tuned" / "img2img_000.png"), float)
    based = np.asarray(Image.open(tmp_path / "based" / "img2img_000.png"), float)
    assert np.abs(tuned - based).max() > 0
    # a checkpoint samples as the adapter of its step, decoded with its run's decoder (tuned before any LoRA step)
    capsys.readouterr()
    ck = ["sample", "--base", str(tiny_base), "--adapter", str(out / "checkpoint-4"), "--image", str(src), "--strength",
          "0.6", "--steps", "10", "--out", str(tmp_path / "ck4")]
    assert cli.main(ck) == 0
    assert f"decoder: {out / 'vae'} (tuned" in capsys.readouterr().out
    assert np.abs(np.asarray(Image.open(tmp_path / "ck4" / "img2img_000.png"), float) - tuned).max() > 0  # step 4, not 6

    # plain diffusers, as the model card says, gives adapt's image
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionImg2ImgPipeline
    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(str(tiny_base), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(str(out), weight_name="pytorch_lora_weights.safetensors")  # as the model card
    pipe.vae = AutoencoderKL.from_pretrained(str(out / "vae"))
    img = pipe("", image=Image.open(src), strength=0.6, num_inference_steps=10, guidance_scale=7.5,
               generator=torch.Generator("cpu").manual_seed(0)).images[0]
    assert np.abs(np.asarray(img, float) - tuned).max() <= 1

    # a new run without the decoder does not ship the old one
    r = run_recipe(recipe_args(tiny_base, sg_folder, out, "train.overwrite=true", *val))
    assert r.returncode == 0, r.stderr[-3000:]
    assert not (out / "vae").exists() and lora.facts(out).decoder == {}
    # the validation grid's base column (input | base | adapter) is the base's, decoder included, in both runs
    plain = np.asarray(Image.open(out / "validation" / "step_000004.png"), float)
    col = lambda g: g[:, 66:132]  # 64 px tiles, 2 px padding
    assert np.array_equal(col(grid), col(plain)) and not np.array_equal(grid[:, 132:], plain[:, 132:])


def test_a_tuned_decoder_missing_a_weight_is_refused(tiny_base, tmp_path):
    """diffusers would draw the missing decoder weight at random (the encoder check above never sees the decoder)."""
    from conftest import rewrite_safetensors
    vae = _vae(tiny_base)
    folder = decoder.save(vae, tmp_path / "ad", "k1", decoder.finetune(vae, _pixels(4), 4, 1e-3, 1, 0, log=lambda m: None))
    rewrite_safetensors(folder / decoder.WEIGHTS, lambda t: {k: v for k, v in t.items() if k != "decoder.conv_out.bias"})
    with pytest.raises(decoder.DecoderError, match=r"ad/vae: 1 of AutoencoderKL's .* \(decoder\.conv_out\.bias\)"):
        decoder.load(tmp_path / "ad", _vae(tiny_base))
