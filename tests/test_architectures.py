"""Real SD 1.5 / 2.1 / SDXL UNet architectures from their published configs (tests/fixtures), random weights."""

import json
import time
from pathlib import Path

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import UNet2DConditionModel

from adapt.facts import AdapterFacts
from adapt import buckets, export, lora, objective, trainstep
from conftest import run_recipe, ROOT

FIX = Path(__file__).resolve().parents[1] / "adapt" / "archs"
EXPECTED = {  # (modules, trainable params at rank 4) for cross_attn; published counts for SD1.5 and SDXL
    "sd15": (64, 397_824), "sd21": (64, 430_592), "sdxl": (280, 3_143_680)}


def _cfg(name):
    return json.loads((FIX / f"{name}_unet.json").read_text())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_cross_attn_counts_on_real_configs(name):
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(_cfg(name))
        a = lora.attach(unet, "cross_attn", rank=4)
    assert (a["num_modules"], a["trainable_params"]) == EXPECTED[name]
    assert a["self_attention_modules"] == [] and all(".attn2." in m for m in a["modules"])


OTHER_PRESETS = {  # (modules, params at rank 4): k/v only halves the layers; all_attn adds self-attention (attn1)
    ("sd15", "cross_attn_kv"): (32, 198_144), ("sd15", "all_attn"): (128, 797_184),
    ("sd21", "cross_attn_kv"): (32, 230_912), ("sd21", "all_attn"): (128, 829_952),
    ("sdxl", "cross_attn_kv"): (140, 1_812_480), ("sdxl", "all_attn"): (560, 5_806_080)}


@pytest.mark.parametrize("name,preset", sorted(OTHER_PRESETS))
def test_other_presets_on_real_configs(name, preset):
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(_cfg(name))
        a = lora.attach(unet, preset, rank=4)
    assert (a["num_modules"], a["trainable_params"]) == OTHER_PRESETS[(name, preset)]
    if preset == "cross_attn_kv":
        assert all(m.endswith(("attn2.to_k", "attn2.to_v")) for m in a["modules"])
    else:
        assert len(a["self_attention_modules"]) == a["num_modules"] // 2


def _step(unet, cross_dim, sdxl=False, prediction_type="epsilon"):
    """One real training step (fwd + bwd + AdamW) at an 8x8 latent; returns (loss, seconds)."""
    from diffusers import DDPMScheduler
    lora.attach(unet, "cross_attn", rank=4)
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    td = trainstep.TrainData(captions=["x", "x"], caption_index=torch.zeros(2, dtype=torch.long), emb=torch.randn(2, 77, cross_dim),
                             window=objective.window_timesteps(sched, 50, 0.5, "img2img_exact"), alphas_cumprod=sched.alphas_cumprod,
                             scaling_factor=0.18215, shift_factor=0.0, prediction_type=prediction_type,
                             sampler=buckets.BucketSampler([(64, 64)] * 2, batch_size=1),
                             post={"mean": list(torch.randn(2, 4, 8, 8)), "std": list(torch.full((2, 4, 8, 8), 0.01))},
                             pooled=torch.randn(2, 1280) if sdxl else None,
                             time_ids=torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2) if sdxl else None,
                             time_ids_flip=torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2) if sdxl else None)
    t0 = time.time()
    batch = trainstep.draw(td, 1, torch.Generator().manual_seed(0))
    loss = trainstep.forward_loss(unet, batch, td).mean()
    loss.backward()
    opt.step()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
    return float(loss), time.time() - t0


def _randomize_lora_b(unet, std: float) -> torch.Generator:
    """Non-zero LoRA up weights (a trained adapter); returns the generator for the inputs."""
    g = torch.Generator().manual_seed(1)
    for n, p in unet.named_parameters():
        if "lora_B" in n:
            p.data = torch.randn(p.shape, generator=g) * std
    return g


def _kohya_roundtrip(unet, cross_dim, tmp_path, sdxl=False, prediction_type="epsilon", b_scale=0.05) -> float:
    """Random non-zero LoRA -> kohya file -> diffusers' own kohya loader into a fresh pipeline; max abs diff of the UNet."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from adapt.tiny import build_tiny_components, build_tiny_sdxl_components
    g = _randomize_lora_b(unet, b_scale)
    x, e = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, cross_dim, generator=g)
    kw = {"added_cond_kwargs": {"text_embeds": torch.randn(1, 1280, generator=g),
                                "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}} if sdxl else {}
    run = lambda u: u(x, torch.tensor([500]), e, **kw).sample
    with torch.no_grad():
        want = run(unet)
    arch = "sdxl" if sdxl else "sd"
    lora.save(tmp_path / "ad", unet, AdapterFacts(architecture=arch))
    kohya = export.to_kohya(tmp_path / "ad", tmp_path / "k.safetensors")  # SDXL: SGM names (input_blocks / output_blocks)
    if sdxl:
        from safetensors import safe_open
        with safe_open(str(kohya), "pt") as f:
            assert any("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_q" in k for k in f.keys())
    unet.delete_adapters("default")
    with torch.no_grad():  # the adapter must matter, or a dropped load would pass
        assert (run(unet) - want).abs().max() > 1e-3
    c = build_tiny_sdxl_components() if sdxl else build_tiny_components(prediction_type=prediction_type)
    c["unet"] = unet
    pipe = (StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline)(**c)
    pipe.load_lora_weights(str(kohya.parent), weight_name=kohya.name)  # diffusers' own kohya conversion (SD 1.x/2.x: diffusers module paths)
    with torch.no_grad():
        diff = float((run(pipe.unet) - want).abs().max())
    print(f"kohya round trip max abs diff: {diff:.2e}")  # reported in the closing note (pytest -s)
    return diff


@pytest.mark.slow
def test_sd15_step_and_kohya_roundtrip_at_8x8(tmp_path):
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(_cfg("sd15"))
    loss, _ = _step(unet, 768)
    assert torch.isfinite(torch.tensor(loss))
    assert _kohya_roundtrip(unet, 768, tmp_path) <= 1e-5


@pytest.mark.slow
def test_sdxl_step_and_kohya_roundtrip_at_8x8(tmp_path):
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(_cfg("sdxl"))
    loss, _ = _step(unet, 2048, sdxl=True)
    assert torch.isfinite(torch.tensor(loss))
    assert _kohya_roundtrip(unet, 2048, tmp_path, sdxl=True, b_scale=0.02) <= 1e-5


@pytest.mark.slow
def test_sd_vae_decoder_finetunes_saves_and_loads(tmp_path):
    """The SD 1.x/2.x/XL VAE layout (84M parameters) through adapt.decoder: two steps at 64 px with gradient
    checkpointing, the encoder untouched, the vae/ folder loaded back against the base."""
    from diffusers import AutoencoderKL
    from adapt import decoder
    torch.manual_seed(0)
    kw = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, sample_size=512)
    vae, base = AutoencoderKL(**kw), AutoencoderKL(**kw)
    base.load_state_dict(vae.state_dict())
    px = [torch.rand(3, 64, 64) * 2 - 1 for _ in range(2)]
    t0 = time.time()
    figs = decoder.finetune(vae, px, steps=2, lr=1e-4, batch_size=1, seed=0, gradient_checkpointing=True, log=print)
    print(f"SD VAE decoder: 2 steps at 64 px in {time.time() - t0:.1f}s")
    assert figs["steps"] == 2 and all(torch.equal(a, b) for a, b in zip(vae.encoder.parameters(), base.encoder.parameters()))
    (tmp_path / "ad").mkdir()
    decoder.save(vae, tmp_path / "ad", "k", figs)
    loaded = decoder.load(tmp_path / "ad", base)
    assert all(torch.equal(a, b) for a, b in zip(loaded.decoder.parameters(), vae.decoder.parameters()))
    # as WebUI / ComfyUI take it: one file named as Stability's vae-ft-mse-840000 (248 tensors), read back by diffusers
    f = decoder.to_single_file(tmp_path / "ad" / "vae", tmp_path / "vae.safetensors")
    from safetensors.torch import load_file
    sd = load_file(str(f))
    assert len(sd) == 248 and sd["encoder.mid.attn_1.proj_out.weight"].shape == (512, 512, 1, 1)
    assert {"decoder.up.3.block.2.conv2.weight", "decoder.up.1.upsample.conv.weight", "encoder.down.2.downsample.conv.weight",
            "encoder.down.1.block.0.nin_shortcut.weight", "decoder.norm_out.weight"} <= sd.keys()
    assert "decoder.up.0.upsample.conv.weight" not in sd  # the original numbers up levels by resolution: up.0 is the full one
    back = AutoencoderKL.from_single_file(str(f), config=str(tmp_path / "ad" / "vae"), local_files_only=True)
    assert all(torch.equal(back.state_dict()[k], v) for k, v in vae.state_dict().items())


@pytest.mark.slow
def test_sd21_v_prediction_step_and_kohya_roundtrip_at_8x8(tmp_path):
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(_cfg("sd21"))
    loss, _ = _step(unet, 1024, prediction_type="v_prediction")
    assert torch.isfinite(torch.tensor(loss))
    assert _kohya_roundtrip(unet, 1024, tmp_path, prediction_type="v_prediction") <= 1e-5


def test_v_prediction_tiny_pipeline_trains_and_samples(tiny_v_base, tmp_path):
    from adapt import synth
    data = synth.build_imagefolder("sunglasses", tmp_path / "d", n=4, split="train")
    r = run_recipe(["--config", str(ROOT / "recipes/configs/tiny_test.yaml"), f"model.base={tiny_v_base}",
                    f"data.source={data}", f"out_dir={tmp_path / 'o'}", "train.max_steps=2"], launcher="python")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "v_prediction" in r.stdout and lora.facts(tmp_path / "o").prediction_type == "v_prediction"
    from adapt import model, sample
    pipe, _ = model.load_base(str(tiny_v_base))
    lora.load_into(pipe, tmp_path / "o")
    from PIL import Image
    out = sample.img2img(pipe, [Image.open(data / "train_000000.png")], "a face", 0.6, 10, 1.0)
    assert out[0].size == (64, 64)


def test_tiny_sdxl_pipeline_trains_and_samples(tmp_path):
    from adapt import model, sample, synth
    from adapt.tiny import save_tiny_sdxl_pipeline
    base = save_tiny_sdxl_pipeline(tmp_path / "xl")
    data = synth.build_imagefolder("sunglasses", tmp_path / "d", n=4, split="train")
    r = run_recipe(["--config", str(ROOT / "recipes/configs/tiny_test.yaml"), f"model.base={base}", f"data.source={data}",
                    f"out_dir={tmp_path / 'o'}", "train.max_steps=2", "objective.scheduler=euler"], launcher="python")
    assert r.returncode == 0, r.stderr[-2000:]
    assert lora.facts(tmp_path / "o").architecture == "sdxl"
    pipe, _ = model.load_base(str(base))
    lora.load_into(pipe, tmp_path / "o")
    from PIL import Image
    assert sample.img2img(pipe, [Image.open(data / "train_000000.png")], "a face", 0.5, 6, 1.0, scheduler="euler")[0].size == (64, 64)
    from test_cli import adapt_cli  # the user-facing command: both text encoders, pooled embeddings, time ids
    r = adapt_cli("sample", "--base", base, "--adapter", tmp_path / "o", "--image", data / "train_000000.png",
                  "--steps", 4, "--out", tmp_path / "s")
    assert r.returncode == 0, r.stderr[-2000:]
    r = adapt_cli("sample", "--base", base, "--prompt", "a face", "--steps", 3, "--out", tmp_path / "t")
    assert r.returncode == 0, r.stderr[-2000:]
    assert Image.open(tmp_path / "s" / "img2img_000.png").size == Image.open(tmp_path / "t" / "txt2img_000.png").size == (64, 64)
    # an SDXL adapter refuses an SD base, with a message instead of a partial load
    from adapt.tiny import save_tiny_pipeline
    sd_pipe, _ = model.load_base(str(save_tiny_pipeline(tmp_path / "sd")))
    with pytest.raises(lora.AdapterError, match="sdxl base.*this pipeline is sd"):
        lora.load_into(sd_pipe, tmp_path / "o")


@pytest.mark.integration  # subprocess-heavy: `make test-integration`
@pytest.mark.parametrize("name", ["sd15", "sd21", "sdxl"])
def test_gpu_configs_run_with_their_precision_on_tiny_bases(name, tiny_base, tiny_v_base, tmp_path):
    """The shipped GPU configs, unchanged but for base, data and size: bf16 weights under bf16 autocast,
    gradient checkpointing, checkpoints and validation all run (on CPU here)."""
    import yaml
    from adapt import synth
    from adapt.tiny import save_tiny_sdxl_pipeline
    base = {"sd15": tiny_base, "sd21": tiny_v_base, "sdxl": None}[name] or save_tiny_sdxl_pipeline(tmp_path / "xl")
    data = synth.build_imagefolder("sunglasses", tmp_path / "d", n=4, split="train")
    val = synth.build_imagefolder("faces", tmp_path / "v", n=2, split="val")
    r = run_recipe(["--config", str(ROOT / f"recipes/configs/{name}_sunglasses.yaml"), f"model.base={base}", f"data.source={data}",
                    "data.resolution=64", "train.max_steps=3", "train.checkpointing_steps=1", f"validation.source={val}",
                    "validation.steps=2", "validation.num_images=2", f"out_dir={tmp_path / 'o'}",
                    # with a decoder the grids' base column is drawn before the LoRA exists; without, at step 2 beside
                    # the fp32 LoRA (which a pipeline cast once turned bf16, and the optimizer step then failed)
                    f"decoder.steps={2 if name == 'sd15' else 0}"],
                   launcher="python")
    assert r.returncode == 0, r.stderr[-2000:]
    if name == "sd15":
        assert (tmp_path / "o" / "vae" / "config.json").is_file()  # the decoder trains in fp32 beside bf16 weights
        from adapt import decoder, model
        fp32_vae = model.load_base(str(base))[0].vae  # sampled in fp32: the saved encoder is the base's rounded to bf16
        assert decoder.load(tmp_path / "o", fp32_vae) is not None
    assert (tmp_path / "o" / "validation" / "step_000002.png").is_file()
    assert "precision: bf16; this CPU's bf16 matmul runs" in r.stdout
    used = yaml.safe_load((tmp_path / "o" / "config.yaml").read_text())
    assert (used["model"]["dtype"], used["train"]["mixed_precision"], used["train"]["gradient_checkpointing"]) == ("bfloat16", "bf16", True)
    fx = lora.facts(tmp_path / "o")
    assert fx.prediction_type == ("v_prediction" if name == "sd21" else "epsilon")
    assert fx.architecture == ("sdxl" if name == "sdxl" else "sd")


def test_sdxl_time_ids_carry_each_images_original_size_crop_and_bucket(tmp_path):
    """SDXL micro-conditioning per entry: original (h, w), crop (top, left) in resized pixels, target = the bucket
    (h, w); a flipped crop's left offset counts from the other edge."""
    from PIL import Image
    from diffusers import StableDiffusionXLPipeline
    from adapt import data
    from adapt.tiny import build_tiny_sdxl_components
    (tmp_path / "d").mkdir()
    for name, size in (("wide.png", (96, 48)), ("tall.png", (40, 80)), ("square.png", (64, 64))):  # PIL sizes are (w, h)
        Image.new("RGB", size, (120, 80, 60)).save(tmp_path / "d" / name)
    # budget 32², step 16: buckets 32x32, 48x16 (aspect 3 > 2.5: no), so square; with step 8: 40x24, 24x40, 48x16 ...
    sizing = buckets.Sizing(32, 8, random_crop=True, crops=2, seed=0)
    sized, records, _ = data.load_sized(str(tmp_path / "d"), sizing, default_caption="a face")
    by_name = {r.name: sized.placements[2 * i:2 * i + 2] for i, r in enumerate(records)}
    assert {p.bucket for p in by_name["wide.png"]} == {(40, 24)} and {p.bucket for p in by_name["tall.png"]} == {(24, 40)}
    for name, (w, h) in (("wide.png", (96, 48)), ("tall.png", (40, 80)), ("square.png", (64, 64))):
        for p in by_name[name]:
            (rh, rw), (top, left), (bw, bh) = p.resized_size, p.crop_top_left, p.bucket
            assert p.time_ids() == [h, w, top, left, bh, bw] and 0 <= left <= rw - bw and 0 <= top <= rh - bh
            assert p.time_ids(flipped=True)[3] == rw - bw - left
    pipe = StableDiffusionXLPipeline(**build_tiny_sdxl_components())
    td = trainstep.build(pipe, _facts(pipe), [r.caption for r in records], torch.tensor([500]), None, sized, 1)
    seen = set()
    for at in range(40):
        g = torch.Generator().manual_seed(at)
        batch = trainstep.draw(td, 1, g, flip=True, pipe=pipe, at=at)
        _, idx = td.sampler.batch(at)
        g = torch.Generator().manual_seed(at)
        crop, flip = int(torch.randint(0, 2, (1,), generator=g)), bool(torch.rand(1, generator=g) < 0.5)  # draw's order
        p = sized.placements[2 * int(idx) + crop]
        assert batch["time_ids"][0].tolist() == p.time_ids(flip)
        assert batch["z0"].shape[-2:] == (p.bucket[1] // 8, p.bucket[0] // 8)
        seen.add((int(idx), crop, flip))
    assert len(seen) > 6  # crops, flips and images all vary


def _facts(pipe):
    from adapt import model
    return model.facts_of(pipe, "tiny-xl", "tiny-xl")
