"""Masked img2img (adapt.masking): the adapter-guided mask, latent blending, pixel paste-back, and `adapt sample --mask`."""

import numpy as np
import pytest
import torch
from PIL import Image

from adapt import imagefolder, lora, masking, model, sample, synth, synthbench
from adapt.facts import AdapterFacts
from conftest import diffusers_lora_with_text_encoder


@pytest.fixture(scope="module")
def pipe_with_adapter(tiny_base):
    pipe, _ = model.load_base(str(tiny_base))
    torch.manual_seed(0)  # peft draws lora_A from the global generator: without this the adapter (and its mask) depends
    lora.attach(pipe.unet, "cross_attn", rank=4, alpha=4, adapter_name="ad")  # on which tests ran before
    g = torch.Generator().manual_seed(0)
    for n, p in pipe.unet.named_parameters():
        if "lora_B" in n:
            p.data = torch.randn(p.shape, generator=g) * 0.5
    return pipe


def _faces(n=2):
    return [synth.make("faces", "eval", i)[0] for i in range(n)]


def test_auto_mask_is_binary_dilated_and_empty_for_a_no_op_adapter(pipe_with_adapter):
    imgs, prompts = _faces(), ["a face wearing sunglasses"] * 2
    m0 = masking.auto_mask(pipe_with_adapter, imgs, prompts, ["ad"], masking.MaskSettings(dilate=0))
    m1 = masking.auto_mask(pipe_with_adapter, imgs, prompts, ["ad"], masking.MaskSettings(dilate=1))
    h = 64 // pipe_with_adapter.vae_scale_factor
    assert m0.shape == (2, 1, h, h) and set(m0.unique().tolist()) <= {0.0, 1.0}
    assert 0 < m0.sum() < m0.numel() and m1.sum() > m0.sum() and bool((m1 >= m0).all())  # dilation only grows it
    again = masking.auto_mask(pipe_with_adapter, imgs, prompts, ["ad"], masking.MaskSettings(dilate=1))
    assert torch.equal(m1, again)  # seeded noise draws: deterministic
    saved = {n: p.detach().clone() for n, p in pipe_with_adapter.unet.named_parameters() if "lora_B" in n}
    for n, p in pipe_with_adapter.unet.named_parameters():
        if "lora_B" in n:
            p.data.zero_()  # the adapter now changes nothing
    try:
        none = masking.auto_mask(pipe_with_adapter, imgs, prompts, ["ad"], masking.MaskSettings())
    finally:
        for n, p in pipe_with_adapter.unet.named_parameters():
            if n in saved:
                p.data.copy_(saved[n])
    assert none.sum() == 0
    with lora.applied(pipe_with_adapter, ["ad"], [1.0], fuse=True):  # fused, the adapter cannot be switched off
        with pytest.raises(ValueError, match="fused"):
            masking.auto_mask(pipe_with_adapter, imgs, prompts, ["ad"], masking.MaskSettings())



def test_the_mask_compares_the_prompt_encoded_with_and_without_the_adapters_text_encoder_layers(tiny_base, tmp_path):
    """An adapter with text-encoder layers (kohya files, diffusers' --train_text_encoder) changes the prompt's encoding
    too: the adapter's prediction gets the prompt encoded with them, the base's the base encoding."""
    diffusers_lora_with_text_encoder(tiny_base, tmp_path, te_modules=("q_proj", "v_proj"), te_alpha=4)
    pipe, _ = model.load_base(str(tiny_base))
    prompts = ["a face wearing sunglasses"]
    base_emb = masking.unet_cond(pipe, prompts, (64, 64))["encoder_hidden_states"]
    name = lora.load_into(pipe, tmp_path, log=lambda m: None)
    with lora.applied(pipe, [name], [1.0], fuse=False):
        adapted_emb = masking.unet_cond(pipe, prompts, (64, 64))["encoder_hidden_states"]
    assert (adapted_emb - base_emb).abs().max() > 1e-2
    seen = []
    hook = pipe.unet.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["encoder_hidden_states"].clone()),
                                               with_kwargs=True)
    try:
        masking.auto_mask(pipe, _faces(1), prompts, [name], masking.MaskSettings(draws=1))
    finally:
        hook.remove()
    assert len(seen) == 2  # one draw: the adapter's prediction, then the base's
    assert torch.allclose(seen[0], adapted_emb, atol=1e-6) and torch.allclose(seen[1], base_emb, atol=1e-6)


def test_an_images_mask_does_not_depend_on_the_other_images_of_the_call(pipe_with_adapter):
    # img2img seeds image i with seed + i; the mask's noise draws follow it, so an output sampled in a batch is
    # reproduced by sampling its image alone with its own seed (the seed `adapt sample` records in the PNG).
    imgs, prompts = _faces(3), ["a face wearing sunglasses"] * 3
    s = masking.MaskSettings(dilate=0, threshold=0.3)
    batch = masking.auto_mask(pipe_with_adapter, imgs, prompts, ["ad"], s)
    for i in (1, 2):
        alone = masking.auto_mask(pipe_with_adapter, [imgs[i]], [prompts[i]], ["ad"], masking.MaskSettings(dilate=0, threshold=0.3, seed=i))
        assert torch.equal(batch[i], alone[0]), i
    other = masking.auto_mask(pipe_with_adapter, [imgs[1]], [prompts[1]], ["ad"], s)  # seed 0, not 1: other draws
    assert not torch.equal(batch[1], other[0])
    with pytest.raises(ValueError, match="2 seeds for 3 images"):
        masking.auto_mask(pipe_with_adapter, imgs, prompts, ["ad"], s, seeds=[0, 1])

def test_blending_keeps_the_source_outside_and_is_plain_img2img_with_a_full_mask(pipe_with_adapter):
    imgs, prompts = _faces(), ["a face wearing sunglasses"] * 2
    h = 64 // pipe_with_adapter.vae_scale_factor
    plain = sample.img2img(pipe_with_adapter, imgs, prompts, 0.6, 10, 1.0, seed=3)
    full = sample.img2img(pipe_with_adapter, imgs, prompts, 0.6, 10, 1.0, seed=3, mask=torch.ones(2, 1, h, h))
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(plain, full))
    half = torch.zeros(2, 1, h, h)
    half[..., :, h // 2:] = 1  # edit the right half only
    out = sample.img2img(pipe_with_adapter, imgs, prompts, 0.6, 10, 1.0, seed=3, mask=half)
    o, p = (np.stack([sample.to_array(i) for i in imgs_]) for imgs_ in (out, plain))
    assert np.abs(o - p).mean() > 0.01  # blending changed the result
    # In latent space the kept half is exactly the source latent after the last step.
    pipe = sample._variant(pipe_with_adapter, "img2img")
    blend = masking.Blend(pipe, imgs, half, seeds=[3, 4])
    lat = pipe(prompt=prompts, image=imgs, strength=0.6, num_inference_steps=10, guidance_scale=1.0,
               generator=sample.generators(3, 2), output_type="latent", callback_on_step_end=blend,
               callback_on_step_end_tensor_inputs=["latents"]).images
    keep = half.expand_as(lat) == 0
    assert torch.equal(lat[keep], blend.z0[keep]) and not torch.allclose(lat[~keep], blend.z0[~keep], atol=1e-2)


def test_paste_back_is_the_input_bit_for_bit_outside_the_mask(pipe_with_adapter):
    imgs, prompts = _faces(), ["a face wearing sunglasses"] * 2
    f = pipe_with_adapter.vae_scale_factor
    m = torch.zeros(2, 1, 64 // f, 64 // f)
    m[:, :, 20 // f:36 // f, 12 // f:52 // f] = 1  # pixels 20-35 x 12-51
    out = sample.img2img(pipe_with_adapter, imgs, prompts, 0.6, 10, 1.0, seed=3, mask=m, paste_blur=0.0)
    hard = masking.pixel_mask(m, (64, 64), 0)[:, 0].numpy() > 0.5
    for o, x, h in zip(out, imgs, hard):
        o, x = np.asarray(o), np.asarray(x)
        assert np.array_equal(o[~h], x[~h]) and not np.array_equal(o[h], x[h])
    soft = masking.pixel_mask(m, (64, 64), 1.0)
    assert soft.min() >= 0 and soft.max() <= 1 and 0 < soft[0, 0, 19, 30] < 1  # the row just above the edge is feathered


def test_mask_from_images_covers_what_was_painted():
    img = Image.new("L", (64, 64), 0)
    img.paste(255, (10, 20, 19, 25))  # x 10-18, y 20-24
    m = masking.mask_from_images([img], (64, 64), 4)
    assert m.shape == (1, 1, 16, 16)
    on = torch.nonzero(m[0, 0]).tolist()
    assert {r for r, _ in on} == {5, 6} and {c for _, c in on} == {2, 3, 4}


def test_settings_are_validated():
    with pytest.raises(ValueError, match="threshold"):
        masking.MaskSettings(threshold=1.5)
    with pytest.raises(ValueError, match="timestep"):
        masking.MaskSettings(timestep=1000)


def test_shape_check_passes_renders_and_fails_smudges():
    """Real target renders pass (>= 0.95 of 300 pairs at calibration; all of these 40); a face against itself
    fails; a blurred dark blob over the eye band (no bridge, no gap) fails, though the lens detector accepts it."""
    passed, smudge_pass, smudge_detected = [], [], []
    for i in range(40):
        a, _, f = synth.make("faces", "eval", i)
        b, _, _ = synth.make("sunglasses", "eval", i)
        A, B = sample.to_array(a), sample.to_array(b)
        sm = synth.skin_mask(f)
        passed.append(synthbench.shape(B, A, f, sm)["passed"])
        assert not synthbench.shape(A, A, f, sm)["passed"]
        lens = torch.from_numpy(synth.lens_mask(f)).float()[None, None]
        blob = np.clip(masking.pixel_mask(lens, (64, 64), 2.0)[0, 0].numpy() * 2.5, 0, 1)[..., None]  # blurred dark ovals
        S = A * (1 - 0.8 * blob)
        smudge_pass.append(synthbench.shape(S, A, f, sm)["passed"])
        smudge_detected.append(synthbench.lens_darkening(S, A, synth.lens_mask(f), sm) >= synthbench.SUNGLASSES_THRESHOLD)
    assert np.mean(passed) >= 0.95
    assert np.mean(smudge_detected) >= 0.9 and np.mean(smudge_pass) <= 0.1


def test_sample_cli_mask_auto_writes_masks_and_a_four_column_grid(tiny_base, pipe_with_adapter, tmp_path):
    from test_cli import adapt_cli
    ad = tmp_path / "ad"
    lora.save(ad, pipe_with_adapter.unet, AdapterFacts(base=str(tiny_base), strength=0.6, inference_steps=10, scheduler="ddim",
                                                       architecture="sd", rank=4, alpha=4), adapter_name="ad")
    synth.build_imagefolder("faces", tmp_path / "faces", 2, "eval")
    imgs = [tmp_path / "faces" / f"eval_00000{i}.png" for i in range(2)]
    # no closing or dilation: on the random tiny base's 8x8 latent they can grow a random adapter's mask to the whole
    # image; the thresholded min-max-normalised difference alone is always partial
    r = adapt_cli("sample", "--base", tiny_base, "--adapter", ad, "--image", *imgs, "--mask", "auto", "--out", tmp_path / "s",
                  "--prompt", "{caption} wearing sunglasses", "--grid", tmp_path / "grid.png", "--mask-close", 0, "--mask-dilate", 0)
    assert r.returncode == 0, r.stderr
    assert "edit masks adapter-guided" in r.stdout and "pasted back" in r.stdout
    m = np.asarray(Image.open(tmp_path / "s" / "mask_000.png"))
    assert m.shape == (64, 64) and 0 < (m > 127).mean() < 1
    assert Image.open(tmp_path / "grid.png").size[0] == 4 * 66 + 2  # input | base | adapter | masked
    r = adapt_cli("sample", "--base", tiny_base, "--adapter", ad, "--image", *imgs, "--mask", imgs[0], "--out", tmp_path / "t")
    assert r.returncode == 2 and "--mask: 'auto' or one mask image per --image (2), got 1" in r.stderr


# ---------------------------------------------------------------- masked loss (training)

def test_masked_loss_averages_under_the_mask_and_ignores_the_outside():
    from adapt import objective
    g = torch.Generator().manual_seed(0)
    pred, tgt = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    m = torch.zeros(2, 1, 8, 8)
    m[:, :, 2:4, 2:6] = 1
    inside = (pred - tgt).pow(2)[:, :, 2:4, 2:6].mean((1, 2, 3))
    torch.testing.assert_close(objective.loss(pred, tgt, spatial=m), inside)  # not shrunk by the mask's area
    moved = pred.clone()
    moved[:, :, 6:] += 5  # change the prediction only outside the mask
    torch.testing.assert_close(objective.loss(moved, tgt, spatial=m), inside)
    torch.testing.assert_close(objective.loss(pred, tgt, spatial=torch.ones(2, 1, 8, 8)), objective.loss(pred, tgt))


def test_load_masks_from_a_folder_and_from_alpha_and_missing_ones_are_named(tmp_path):
    from adapt import buckets, data, synth, trainstep
    folder = synth.build_imagefolder("sunglasses", tmp_path / "sg", n=3, split="train")
    sizing = buckets.Sizing(64, 16, buckets=False)
    sized, recs, report = data.load_sized(str(folder), sizing, masks="masks")
    assert len(recs) == 3  # masks/ is not read as training images, and the log says so
    assert len(report.notes["mask files (masks/, data.masks) not read as images of the set"]) == 3
    masks = torch.stack(imagefolder.load_masks(recs, "masks", sized.placements))
    faces = synthbench.faces_of(recs)
    assert masks.shape == (3, 1, 64, 64) and torch.equal(masks[:, 0] > 0.5, torch.from_numpy(np.stack([synth.eye_mask(f) for f in faces])))
    lat = torch.stack(trainstep.latent_loss_masks(list(masks), 4, 0.1))
    assert lat.shape == (3, 1, 16, 16) and lat.min() == pytest.approx(0.1) and lat.max() == pytest.approx(1.0)
    # alpha channel: an RGBA copy of the images whose alpha is the mask
    rgba = tmp_path / "rgba"
    rgba.mkdir()
    for r, m in zip(recs, masks):
        img = Image.open(r.path).convert("RGBA")
        img.putalpha(Image.fromarray((m[0].numpy() * 255).astype(np.uint8)))
        img.save(rgba / r.name)
    sized2, recs2, _ = data.load_sized(str(rgba), sizing)
    assert torch.equal(torch.stack(imagefolder.load_masks(recs2, "alpha", sized2.placements)), masks)
    # random crops of a wider image: each crop's mask is cut where its image was
    wide = tmp_path / "wide"
    wide.mkdir()
    img = Image.open(rgba / recs[0].name)
    Image.fromarray(np.concatenate([np.asarray(img)] * 2, 1)).save(wide / "w.png")  # 128x64, alpha = two eye masks
    sized3, recs3, _ = data.load_sized(str(wide), buckets.Sizing(64, 16, buckets=False, random_crop=True, crops=3))
    m3 = imagefolder.load_masks(recs3, "alpha", sized3.placements, crops=3)
    alpha = np.asarray(Image.open(wide / "w.png").getchannel("A"), dtype=np.float32) / 255
    for p, m in zip(sized3.placements, m3):
        top, left = p.crop_top_left
        assert np.array_equal(m[0].numpy(), alpha[top:top + 64, left:left + 64])
    assert len({p.crop_top_left for p in sized3.placements}) > 1
    (folder / "masks" / recs[1].name).unlink()
    with pytest.raises(data.DataError, match=r"1 of 3 images have no usable mask: train_000001.png \(no mask file"):
        imagefolder.load_masks(recs, "masks", sized.placements)
    with pytest.raises(data.DataError, match="no alpha channel"):
        imagefolder.load_masks(recs, "alpha", sized.placements)


def test_recipe_trains_with_masked_loss(tiny_base, tmp_path):
    from adapt import synth
    from conftest import read_log, recipe_args, run_recipe
    folder = synth.build_imagefolder("sunglasses", tmp_path / "sg", n=4, split="train")
    out = tmp_path / "run"
    r = run_recipe(recipe_args(tiny_base, folder, out, "data.masks=masks", "validation.steps=0"))
    assert r.returncode == 0, r.stderr[-3000:]
    log = (out / "train.log").read_text() if (out / "train.log").exists() else r.stdout + r.stderr
    assert "masked loss: 4 masks (masks)" in log and "rather than --mask auto" in log  # weight 0 outside: the advice
    plain = tmp_path / "plain"
    assert run_recipe(recipe_args(tiny_base, folder, plain, "validation.steps=0")).returncode == 0
    assert [row["loss"] for row in read_log(out)] != [row["loss"] for row in read_log(plain)]


def test_masked_img2img_runs_on_sdxl(tmp_path):
    """SDXL: the mask uses pooled text embeddings and time ids; blending and paste-back run in its img2img pipeline."""
    from diffusers import StableDiffusionXLPipeline

    from adapt.tiny import build_tiny_sdxl_components
    pipe = StableDiffusionXLPipeline(**build_tiny_sdxl_components())
    pipe.set_progress_bar_config(disable=True)
    lora.attach(pipe.unet, "cross_attn", rank=4, alpha=4, adapter_name="ad")
    for n, p in pipe.unet.named_parameters():
        if "lora_B" in n:
            p.data = torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.5
    imgs, prompts = _faces(), ["a face wearing sunglasses"] * 2
    m = masking.auto_mask(pipe, imgs, prompts, ["ad"], masking.MaskSettings(dilate=0))
    f = pipe.vae_scale_factor
    assert m.shape == (2, 1, 64 // f, 64 // f) and 0 < m.sum() < m.numel()
    out = sample.img2img(pipe, imgs, prompts, 0.6, 4, 1.0, seed=0, mask=m, paste_blur=0.0)
    hard = masking.pixel_mask(m, (64, 64), 0)[:, 0].numpy() > 0.5
    assert all(np.array_equal(np.asarray(o)[~h], np.asarray(x)[~h]) for o, x, h in zip(out, imgs, hard))


def test_closing_joins_two_lenses_and_keeps_the_rest():
    m = torch.zeros(1, 1, 8, 12)
    m[0, 0, 3:5, 1:4] = 1  # left lens
    m[0, 0, 3:5, 8:11] = 1  # right lens, 4 latent pixels away
    assert masking.morph(m, 0, 0).equal(m)
    assert masking.morph(m, 1, 0).equal(m)  # a 4-pixel gap needs radius 2
    closed = masking.morph(m, 2, 0)
    assert closed[0, 0, 3:5, 1:11].eq(1).all()  # the bridge is in
    assert closed.sum() == 2 * 10 and closed[0, 0, :3].eq(0).all() and closed[0, 0, 5:].eq(0).all()  # nothing else
    edge = torch.zeros(1, 1, 6, 6)
    edge[0, 0, :, :2] = 1  # touching the border: erosion must not eat it
    assert masking.morph(edge, 2, 0).equal(edge)
    assert masking.morph(m, 0, 1).sum() == 2 * 4 * 5  # dilation alone: each 2x3 lens grows to 4x5


def test_an_fp16_vae_that_asks_for_upcasting_encodes_the_mask_source_in_fp32(tiny_base):
    """SDXL's VAE overflows in fp16 (force_upcast in its config; `adapt sample --dtype auto` is fp16 on a GPU): the
    latents for the mask and for latent blending are encoded in fp32, as diffusers' img2img does, and come back in the
    UNet's dtype with the VAE left as it was."""
    pipe, _ = model.load_base(str(tiny_base), torch_dtype=torch.float16)
    pipe.vae.register_to_config(force_upcast=True)
    seen, encode = [], pipe.vae.encode
    pipe.vae.encode = lambda x, *a, **k: (seen.append((x.dtype, pipe.vae.dtype)), encode(x, *a, **k))[1]
    z = masking._encode(pipe, _faces(1))
    assert seen == [(torch.float32, torch.float32)] and z.dtype == torch.float16 and torch.isfinite(z).all()
    assert pipe.vae.dtype == torch.float16
    pipe.vae.register_to_config(force_upcast=False)  # a VAE that is fine in fp16 stays in fp16
    seen.clear()
    masking._encode(pipe, _faces(1))
    assert seen == [(torch.float16, torch.float16)]
