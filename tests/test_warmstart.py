"""lora.init_from: a run starts from an existing adapter (adapt's, kohya's, peft's) exactly where sampling with it is."""

import pytest
import torch

from adapt import kohya, lora, model, warmstart
from conftest import diffusers_lora_with_text_encoder, read_log, recipe_args, rewrite_safetensors, run_recipe


def _adapter(base, out, preset="cross_attn", rank=4, alpha=2.0, seed=0):
    """An adapt adapter with random non-zero up matrices, as a trained one has."""
    pipe, _ = model.load_base(str(base))
    lora.attach(pipe.unet, preset, rank=rank, alpha=alpha)
    g = torch.Generator().manual_seed(seed)
    for n, p in pipe.unet.named_parameters():
        if "lora_B" in n:
            p.data = torch.randn(p.shape, generator=g) * 0.3
    from adapt.facts import AdapterFacts
    lora.save(out, pipe.unet, AdapterFacts(architecture="sd", base=str(base), preset=preset, rank=rank, alpha=alpha))
    return out


def _unet_out(unet, seed=1):
    g = torch.Generator().manual_seed(seed)
    c = unet.config
    z = torch.randn(2, c.in_channels, 8, 8, generator=g)
    enc = torch.randn(2, 8, c.cross_attention_dim, generator=g)
    with torch.no_grad():
        return unet(z, torch.tensor([100, 500]), enc).sample


def _started(base, adapter, preset="cross_attn", rank=8, alpha=None):
    """A fresh base UNet with the recipe's LoRA attached from `adapter` (warmstart.read -> attach -> load)."""
    pipe, _ = model.load_base(str(base))
    init = warmstart.read(str(adapter), pipe.unet, preset, log=lambda *a: None)
    rp, ap = warmstart.patterns(init, rank, alpha or rank)
    lora.attach(pipe.unet, preset, rank=rank, alpha=alpha, rank_pattern=rp, alpha_pattern=ap)
    return pipe.unet, init, warmstart.load(pipe.unet, init)


def _sampled(base, adapter):
    """What sampling computes with `adapter` at scale 1 (diffusers' loader, through adapt's load_into)."""
    pipe, _ = model.load_base(str(base))
    lora.load_into(pipe, str(adapter), 1.0, log=lambda *a: None)
    return _unet_out(pipe.unet)


def test_start_equals_sampling_for_adapt_and_kohya_files_with_their_own_ranks_and_alphas(tiny_base, tmp_path):
    a = _adapter(tiny_base, tmp_path / "a")
    k = tmp_path / "k.safetensors"
    kohya.to_kohya(a, k)
    # per-layer alphas, as sd-scripts files often carry (the scale alpha/r differs by layer)
    def alphas(t):
        names = sorted(n for n in t if n.endswith(".alpha"))
        return {**t, **{n: torch.tensor(float(i % 3 + 1)) for i, n in enumerate(names)}}
    rewrite_safetensors(k, alphas)
    base_out = _unet_out(model.load_base(str(tiny_base))[0].unet)
    for src in (a, k):
        unet, init, fresh = _started(tiny_base, src)  # lora.rank 8 != the file's 4: the file's ranks win
        assert fresh == 0 and set(init.ranks.values()) == {4}
        want = _sampled(tiny_base, src)
        assert (want - base_out).abs().max() > 1e-2  # the adapter changes the output, so equality below means something
        torch.testing.assert_close(_unet_out(unet), want, rtol=0, atol=2e-5)
    # what the run saves (lora.rank 8 plus the kohya file's per-layer alphas in the patterns) loads back the same
    from adapt.facts import AdapterFacts
    saved = lora.save(tmp_path / "saved", unet, AdapterFacts(architecture="sd"))
    meta = lora.read(saved)[1]["lora_adapter_metadata"]
    assert meta["unet.r"] == 8 and len(meta["unet.rank_pattern"]) == len(init.down) and meta["unet.alpha_pattern"]
    torch.testing.assert_close(_sampled(tiny_base, saved), want, rtol=0, atol=2e-5)
    fresh_unet = model.load_base(str(tiny_base))[0].unet
    assert len(set(warmstart.read(str(k), fresh_unet, "cross_attn", log=lambda *x: None).alphas.values())) == 3


def test_preset_layers_the_adapter_lacks_start_at_zero_and_layers_outside_the_preset_are_refused(tiny_base, tmp_path):
    a = _adapter(tiny_base, tmp_path / "a")
    unet, init, fresh = _started(tiny_base, a, preset="cross_attn_conv")
    assert fresh == lora.audit(unet, "cross_attn_conv")["num_modules"] - len(init.down) > 0
    torch.testing.assert_close(_unet_out(unet), _sampled(tiny_base, a), rtol=0, atol=2e-5)  # new layers add nothing yet
    new = [m for n, m in unet.named_modules() if hasattr(m, "lora_B") and n not in init.down]
    assert all(float(m.lora_B["default"].weight.detach().abs().max()) == 0 for m in new)
    assert all(float(m.lora_A["default"].weight.detach().abs().max()) > 0 for m in new)  # gaussian init: they can learn

    wide = _adapter(tiny_base, tmp_path / "wide", preset="all_attn")
    with pytest.raises(lora.AdapterError, match=r"outside preset 'cross_attn' \(e\.g\. .*attn1.*lora\.preset=all_attn adapts them"):
        _started(tiny_base, wide)


def _te_out(pipe):
    ids = pipe.tokenizer(["a face wearing sunglasses"], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def test_text_encoder_layers_are_fused_for_the_captions_and_saved_unchanged(tiny_base, tmp_path):
    """sd-scripts trains the text encoder by default: such a file's text-encoder layers are not trained, but the
    captions are encoded through them and the saved adapter carries them, so it applies as the file did."""
    te = diffusers_lora_with_text_encoder(tiny_base, tmp_path / "te")
    ref, _ = model.load_base(str(tiny_base))
    lora.load_into(ref, str(te), 1.0, log=lambda *a: None)
    base = _te_out(model.load_base(str(tiny_base))[0])
    assert (_te_out(ref) - base).abs().max() > 1e-2

    pipe, _ = model.load_base(str(tiny_base))
    init = warmstart.read(str(te), pipe.unet, "cross_attn", log=lambda *a: None)
    assert init.text_encoders == {"text_encoder": 8}
    assert warmstart.fuse_text_encoders(pipe, init) == ["text_encoder"]
    assert not any(hasattr(m, "lora_A") for m in pipe.text_encoder.modules())  # fused, no layer left to train
    torch.testing.assert_close(_te_out(pipe), _te_out(ref), rtol=0, atol=2e-5)
    rp, ap = warmstart.patterns(init, 4, 4)
    lora.attach(pipe.unet, "cross_attn", rank=4, alpha=4, rank_pattern=rp, alpha_pattern=ap)
    warmstart.load(pipe.unet, init)
    torch.testing.assert_close(_unet_out(pipe.unet), _unet_out(ref.unet), rtol=0, atol=2e-5)

    from adapt.facts import AdapterFacts
    saved = lora.save(tmp_path / "saved", pipe.unet, AdapterFacts(architecture="sd"), te_tensors=init.te_tensors,
                      te_meta=init.te_meta)
    src, got = lora.read(te)[0], lora.read(saved)[0]
    assert all(torch.equal(got[k], v) for k, v in src.items() if k.startswith("text_encoder."))
    again, _ = model.load_base(str(tiny_base))
    lora.load_into(again, str(saved), 1.0, log=lambda *a: None)
    torch.testing.assert_close(_te_out(again), _te_out(ref), rtol=0, atol=2e-5)


def test_foreign_shapes_are_refused_by_name(tiny_base, tmp_path):
    a = _adapter(tiny_base, tmp_path / "a")
    f = a / lora.WEIGHTS_NAME
    key = sorted(k for k in lora.read(a)[0] if k.endswith(".lora.down.weight"))[0]
    rewrite_safetensors(f, lambda t: {**t, key: torch.zeros(4, t[key].shape[1] + 1)})
    layer = key[len("unet."):-len(".lora.down.weight")]
    with pytest.raises(lora.AdapterError, match=rf"layer {layer} has down \(4, \d+\) / up .* an adapter for another base"):
        _started(tiny_base, a)


@pytest.mark.integration  # three `accelerate launch` runs (~30 s): `make test-integration`
def test_recipe_starts_from_the_adapter_records_it_and_refuses_a_resume_after_it_changed(tiny_base, sg_folder, tmp_path):
    a = diffusers_lora_with_text_encoder(tiny_base, tmp_path / "a")  # UNet and text-encoder layers, as diffusers writes
    out = tmp_path / "run"
    # a rate too small to move the weights: the adapter written after 2 steps is the one the run started from
    r = run_recipe(recipe_args(tiny_base, sg_folder, out, f"lora.init_from={a}", "optim.lr=1e-9", "train.max_steps=2"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"started from {a / lora.WEIGHTS_NAME} (lora.init_from" in r.stdout and "own ranks [4] and alphas [4.0]" in r.stdout
    assert "text-encoder layers (text_encoder: 8) are fused into text_encoder for the captions" in r.stdout
    want, got = lora.read(a)[0], lora.read(out)[0]
    unet_keys = [k for k in got if k.startswith("unet.")]
    assert len(unet_keys) == 32 and all(k.startswith("text_encoder.") for k in set(got) - set(unet_keys))
    for k in set(got) - set(unet_keys):  # carried unchanged
        assert torch.equal(got[k], want[k])
    from diffusers.utils import convert_unet_state_dict_to_peft
    peft_want = convert_unet_state_dict_to_peft({k[5:]: v for k, v in want.items() if k.startswith("unet.")})
    peft_got = convert_unet_state_dict_to_peft({k[5:]: got[k] for k in unet_keys})
    assert peft_want.keys() == peft_got.keys()
    for k in peft_want:
        torch.testing.assert_close(peft_got[k], peft_want[k], rtol=0, atol=1e-6)
    f = lora.facts(out)
    assert f.init_from["sha256"] == lora.weights_sha256(a) and f.init_from["layers"] == 16
    assert f.init_from["text_encoder_layers_kept"] == {"text_encoder": 8}
    assert "| started from |" in (card := (out / "README.md").read_text()) and "its 8 text_encoder layers are kept unchanged" in card
    assert len(read_log(out)) == 2

    # the captions were encoded through those layers: without them (the same UNet layers alone) the first loss differs
    unet_only = tmp_path / "unet_only.safetensors"
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(a / lora.WEIGHTS_NAME), "pt") as h:
        meta = h.metadata()
        save_file({k: h.get_tensor(k) for k in h.keys() if k.startswith("unet.")}, str(unet_only), meta)
    r = run_recipe(recipe_args(tiny_base, sg_folder, tmp_path / "run2", f"lora.init_from={unet_only}", "optim.lr=1e-9",
                               "train.max_steps=1"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert abs(read_log(tmp_path / "run2")[0]["loss"] - read_log(out)[0]["loss"]) > 1e-4

    # the run *is* its starting point: other weights under the same path are refused on resume, by name
    rewrite_safetensors(a / lora.WEIGHTS_NAME, lambda t: {k: v * 2 for k, v in t.items()})
    r = run_recipe(recipe_args(tiny_base, sg_folder, out, f"lora.init_from={a}", "optim.lr=1e-9", "train.max_steps=3",
                               "train.resume_from_checkpoint=latest"))
    assert r.returncode != 0
    assert "the weights of the adapter it started from (lora.init_from) differ from the checkpoint's" in r.stdout + r.stderr


def test_an_adapter_trained_on_other_base_weights_is_named(tiny_base, tmp_path):
    from adapt.facts import AdapterFacts
    from adapt.tiny import save_tiny_pipeline
    other = save_tiny_pipeline(tmp_path / "other", seed=1)  # same shapes, other weights
    pipe, _ = model.load_base(str(other))
    lora.attach(pipe.unet, "cross_attn", rank=4, alpha=4)
    lora.save(tmp_path / "a", pipe.unet, AdapterFacts(architecture="sd", base="other", base_probe=lora.base_probe(pipe.unet)))
    said = []
    unet = model.load_base(str(tiny_base))[0].unet
    warmstart.read(str(tmp_path / "a"), unet, "cross_attn", log=said.append)
    assert len(said) == 1 and said[0].startswith(f"warning: lora.init_from {tmp_path / 'a'} was trained against other UNet weights (other:")
    said.clear()
    warmstart.read(str(tmp_path / "a"), model.load_base(str(other))[0].unet, "cross_attn", log=said.append)
    assert said == []


@pytest.mark.parametrize("arch", ["sd15", "sd21", "sdxl"])
def test_transformer_presets_are_the_layers_sd_scripts_adapts(arch):
    """The presets against sd-scripts' module selection as test_kohya enumerates it with diffusers alone (meta device:
    names only), with and without conv_dim."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from adapt import archs
    from test_kohya import _unet_modules
    cfg = archs.unet_config(arch)
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(cfg)
    assert set(lora.target_modules(unet, "transformer")) == {n for n, _ in _unet_modules(cfg)}
    assert set(lora.target_modules(unet, "transformer_conv")) == {n for n, _ in _unet_modules(cfg, locon=True)}


def test_an_sd_scripts_default_file_continues_under_the_transformer_preset(tiny_base, tmp_path):
    from test_kohya import sdscripts_file
    unet = model.load_base(str(tiny_base))[0].unet
    f = tmp_path / "sdscripts.safetensors"
    sdscripts_file(f, dict(unet.config), "diffusers", te_layers=0)  # per-layer ranks 1-4, alphas 0.5-8, fp16
    with pytest.raises(lora.AdapterError, match=r"outside preset 'cross_attn' .*; lora\.preset=transformer adapts them"):
        _started(tiny_base, f)
    started, init, fresh = _started(tiny_base, f, preset="transformer")
    assert fresh == 0 and set(init.ranks.values()) == {1, 2, 3, 4}
    want = _sampled(tiny_base, f)
    assert (want - _unet_out(model.load_base(str(tiny_base))[0].unet)).abs().max() > 1e-3
    torch.testing.assert_close(_unet_out(started), want, rtol=0, atol=2e-5)
