"""kohya files as other tools write them: import reproduces W + alpha/r · up @ down per layer, exactly.

Files are built here the way sd-scripts' `networks.lora` lays them out (module names from a diffusers
UNet, Transformer2DModel layers by default, ResnetBlock2D / samplers with conv_dim = LoCon), on the
published SD 1.5 / 2.1 / XL configs (meta device: names and shapes only) and on tiny real UNets (for the
numbers). Exactness is checked against the formula, never against diffusers' own kohya loader.
"""

import json
import re
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from adapt import archs, kohya, lora, model
from adapt.singlefile import unet_to_original


def _unet_modules(cfg, locon=False):
    """(diffusers path, module) pairs sd-scripts adapts: Linear/Conv2d inside Transformer2DModel; with locon, resnets
    and samplers too. Enumerated with diffusers directly, not with adapt's code."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(cfg)
    kinds = ("Transformer2DModel",) + (("ResnetBlock2D", "Downsample2D", "Upsample2D") if locon else ())
    out = []
    for name, block in unet.named_modules():
        if type(block).__name__ in kinds:
            for child, m in block.named_modules():
                if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and child:
                    out.append((f"{name}.{child}", m))
    return out


def sdscripts_file(path, cfg, naming="diffusers", locon=False, te_layers=2, metadata=None, seed=0, dtype=torch.float16):
    """A kohya file with per-module rank and alpha (ranks 1-4, alphas 0.5-8), fp16 tensors, 0-dim alphas."""
    g = torch.Generator().manual_seed(seed)
    tensors, truth = {}, {}
    for i, (path_, m) in enumerate(_unet_modules(cfg, locon)):
        r = 1 + i % 4
        alpha = [0.5, 1.0, 4.0, 8.0][(i * 7) % 4]
        if isinstance(m, torch.nn.Linear):
            down, up = torch.randn(r, m.in_features, generator=g), torch.randn(m.out_features, r, generator=g)
        else:
            down = torch.randn(r, m.in_channels, *m.kernel_size, generator=g)
            up = torch.randn(m.out_channels, r, 1, 1, generator=g)
        name = path_ if naming == "diffusers" else \
            next(iter(unet_to_original({path_ + ".weight": None}, cfg)))[len("model.diffusion_model."):-len(".weight")]
        key = "lora_unet_" + name.replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = (down * 0.1).to(dtype)
        tensors[f"{key}.lora_up.weight"] = (up * 0.1).to(dtype)
        tensors[f"{key}.alpha"] = torch.tensor(alpha, dtype=dtype)  # 0-dim, as sd-scripts writes it
        truth[path_] = (key, alpha / r)
    # text-encoder layers as sd-scripts names them: lora_te_ on SD 1.x/2.x, lora_te1_ / lora_te2_ on SDXL, whose CLIP-L
    # and OpenCLIP-G are 768 and 1280 wide (their 2048 concatenated is the UNet's cross-attention width)
    width = cfg["cross_attention_dim"]
    encoders = [("lora_te1_", "text_encoder", 768), ("lora_te2_", "text_encoder_2", 1280)] if width == 2048 else \
        [("lora_te_", "text_encoder", width)]
    for prefix, comp, w in encoders:
        for j in range(te_layers):
            k = f"{prefix}text_model_encoder_layers_{j}_self_attn_{'qv'[j % 2]}_proj"
            tensors.update({f"{k}.lora_down.weight": (torch.randn(2, w, generator=g) * 0.1).to(dtype),
                            f"{k}.lora_up.weight": (torch.randn(w, 2, generator=g) * 0.1).to(dtype),
                            f"{k}.alpha": torch.tensor(1.0 + j, dtype=dtype)})
            truth[f"{comp}:encoder.layers.{j}.self_attn.{'qv'[j % 2]}_proj"] = (k, (1.0 + j) / 2)
    save_file(tensors, str(path), metadata=metadata)
    return truth


def _formula(tensors, key, scale):
    down, up = tensors[f"{key}.lora_down.weight"].double(), tensors[f"{key}.lora_up.weight"].double()
    return scale * (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])


def _check_metadata_reproduces(imported, kohya_file, truth, every=1):
    """Every layer (every `every`-th for SDXL's 722: peft's pattern lookup is quadratic): the imported tensors equal
    the file's, and peft's pattern resolution gives the file's alpha/r."""
    from peft.utils.other import get_pattern_key
    tensors, header = lora.read(imported)
    with safe_open(str(kohya_file), "pt") as f:
        src = {k: f.get_tensor(k) for k in f.keys()}
    assert len([k for k in tensors if k.endswith(("down.weight", "lora_A.weight"))]) == len(truth)
    te = [m for m in truth if ":" in m]
    for mod, (key, scale) in list(truth.items())[::every] + [(m, truth[m]) for m in te]:
        comp, _, mod = mod.rpartition(":")  # text-encoder layers: "text_encoder:encoder.layers.0.self_attn.q_proj"
        comp = comp or "unet"
        meta = {k[len(comp) + 1:]: v for k, v in header["lora_adapter_metadata"].items() if k.startswith(comp + ".")}
        down, up = (tensors[f"unet.{mod}.lora.down.weight"], tensors[f"unet.{mod}.lora.up.weight"]) if comp == "unet" else \
            (tensors[f"{comp}.text_model.{mod}.lora_A.weight"], tensors[f"{comp}.text_model.{mod}.lora_B.weight"])
        assert torch.equal(down, src[f"{key}.lora_down.weight"].float()) and torch.equal(up, src[f"{key}.lora_up.weight"].float())
        r = meta["rank_pattern"].get(get_pattern_key(list(meta["rank_pattern"]), mod), meta["r"])
        a = meta["alpha_pattern"].get(get_pattern_key(list(meta["alpha_pattern"]), mod), meta["lora_alpha"])
        assert r == down.shape[0] and a / r == pytest.approx(scale, rel=1e-12), mod


SD_CASES = [  # (case, config, naming, metadata, family expected)
    ("sd15 sd-scripts default (1x1 conv proj_in/out, diffusers names)", "sd15", "diffusers", {"ss_base_model_version": "sd_v1"}, "sd15"),
    ("sd15 CompVis names, no metadata", "sd15", "compvis", None, "sd15"),
    ("sd21 linear proj, v2 metadata", "sd21", "diffusers", {"ss_base_model_version": "sd_v2", "ss_v2": "True"}, "sd21"),
    ("sdxl default (SGM names)", "sdxl", "compvis", {"ss_base_model_version": "sdxl_base_v1-0"}, "sdxl"),
    ("sdxl diffusers names, no metadata", "sdxl", "diffusers", None, "sdxl"),
]


@pytest.mark.parametrize("case,arch,naming,metadata,family", SD_CASES, ids=[c[0] for c in SD_CASES])
def test_published_architectures_import_every_layer(case, arch, naming, metadata, family, tmp_path):
    cfg = archs.unet_config(arch)
    f = tmp_path / "k.safetensors"
    truth = sdscripts_file(f, cfg, naming, metadata=metadata)
    said = []
    out = kohya.from_kohya(f, tmp_path / "imported", log=said.append)
    facts = lora.facts(out)
    assert facts.kohya["family"] == family and facts.kohya["naming"] == naming and facts.imported_from == str(f)
    assert facts.architecture == ("sdxl" if family == "sdxl" else "sd") and facts.kohya["dropped_text_encoder_layers"] == 0
    assert facts.kohya["text_encoder_layers"] == (4 if family == "sdxl" else 2) and not any("warning" in m for m in said)
    _check_metadata_reproduces(out, f, truth, every=9 if arch == "sdxl" else 1)
    print(f"{case}: {len(truth)} layers imported")


def test_locon_3x3_and_resnet_layers_import_on_sd15(tmp_path):
    cfg = archs.unet_config("sd15")
    f = tmp_path / "locon.safetensors"
    truth = sdscripts_file(f, cfg, "compvis", locon=True, te_layers=0)
    out = kohya.from_kohya(f, tmp_path / "imported", log=lambda m: None)
    _check_metadata_reproduces(out, f, truth)
    assert any(m.endswith("downsamplers.0.conv") for m in truth) and any(m.endswith("resnets.0.conv1") for m in truth)


def test_tiny_base_import_is_exact_per_layer_and_end_to_end(tiny_base, tmp_path):
    """Real numbers: every adapted layer's delta equals alpha/r · up @ down to fp32 rounding, and the whole UNet
    equals a copy of the base with those deltas merged by hand."""
    pipe, _ = model.load_base(str(tiny_base))
    cfg = dict(pipe.unet.config)
    f = tmp_path / "k.safetensors"
    truth = sdscripts_file(f, cfg, "diffusers", locon=True, dtype=torch.float16, te_layers=0)
    with safe_open(str(f), "pt") as h:
        src = {k: h.get_tensor(k) for k in h.keys()}
    out = kohya.from_kohya(f, tmp_path / "imported", base_cfg=cfg, log=lambda m: None)
    merged = {n: p.detach().double().clone() for n, p in pipe.unet.named_parameters()}
    for mod, (key, scale) in truth.items():
        merged[f"{mod}.weight"] += _formula(src, key, scale)
    lora.load_into(pipe, out, adapter_name="k")
    worst = 0.0
    mods = dict(pipe.unet.named_modules())
    for mod, (key, scale) in truth.items():
        got = mods[mod].get_delta_weight("k").detach().double()
        want = _formula(src, key, scale)
        worst = max(worst, float((got - want).abs().max() / want.abs().max()))
    print(f"tiny SD, {len(truth)} layers (Linear, 1x1 and 3x3 conv, stride-2 downsampler): max relative delta error {worst:.2e}")
    assert worst < 1e-6

    g = torch.Generator().manual_seed(0)
    x, e = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, cfg["cross_attention_dim"], generator=g)
    from diffusers import UNet2DConditionModel
    ref = UNet2DConditionModel.from_config(cfg)
    ref.load_state_dict({k: v.float() for k, v in merged.items()})
    with torch.no_grad():
        got, want = pipe.unet(x, torch.tensor([100, 700]), e).sample, ref(x, torch.tensor([100, 700]), e).sample
        pipe.unet.disable_adapters()
        base = pipe.unet(x, torch.tensor([100, 700]), e).sample
    assert (base - want).abs().max() > 1e-2  # the adapter matters, so a dropped load fails
    assert (got - want).abs().max() < 1e-5


def test_text_encoder_layers_load_and_follow_the_adapter_scale(tiny_base, tmp_path):
    """sd-scripts trains the text encoder too unless told not to: a kohya file's lora_te_* layers load into CLIP
    exactly (W + s · alpha/r · up @ down), fused or not, with the UNet's part at the same scale s, as WebUI applies
    <lora:name:s>; at s = 0, and after the block, the text encoder is the base's bit for bit."""
    pipe, _ = model.load_base(str(tiny_base))
    f = tmp_path / "k.safetensors"
    truth = sdscripts_file(f, dict(pipe.unet.config), "diffusers", te_layers=2, dtype=torch.float32)
    with safe_open(str(f), "pt") as h:
        src = {k: h.get_tensor(k) for k in h.keys()}
    ids = pipe.tokenizer(["a face wearing sunglasses"], padding="max_length", return_tensors="pt").input_ids
    te = pipe.text_encoder
    with torch.no_grad():
        base = te(ids)[0]
        linears = dict(te.named_modules())
        prefix = "text_model." if hasattr(te, "text_model") else ""  # transformers 5 flattened CLIPTextModel
        originals = {m: linears[prefix + m.split(":")[1]].weight.detach().clone() for m in truth if ":" in m}

        def reference(s):  # the base text encoder with s x the file's deltas merged by hand
            for m, w in originals.items():
                linears[prefix + m.split(":")[1]].weight.copy_(w + _formula(src, truth[m][0], s * truth[m][1]).float())
            try:
                return te(ids)[0]
            finally:
                for m, w in originals.items():
                    linears[prefix + m.split(":")[1]].weight.copy_(w)
        want = {s: reference(s) for s in (0.5, 1.0)}
    said = []
    name = lora.load_into(pipe, f, adapter_name="k", log=said.append)
    assert any("and 2 text-encoder layers" in m for m in said) and any("2 text_encoder LoRA layers loaded" in m for m in said)
    with torch.no_grad():
        for s in (0.5, 1.0):
            for fuse in (False, True):
                with lora.applied(pipe, [name], [s], fuse=fuse):
                    got = te(ids)[0]
                assert (got - want[s]).abs().max() < 1e-5, (s, fuse)
        assert (want[1.0] - base).abs().max() > 1e-2  # the layers matter, so a dropped load fails
        with lora.applied(pipe, [name], [0.0]):
            assert torch.equal(te(ids)[0], base)
    # a text-encoder layer that does not fit this pipeline's CLIP is named before peft sees it
    bad = {**src, "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.randn(2, 40)}
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(lora.AdapterError, match=r"lora_te_text_model_encoder_layers_0_self_attn_q_proj: lora_down \(2, 40\)"):
        lora.load_into(model.load_base(str(tiny_base))[0], tmp_path / "bad.safetensors", log=lambda m: None)
    # one outside CLIP's attention and MLP is named in a warning and left out
    odd = {**src, "lora_te_text_model_final_layer_norm.lora_down.weight": torch.randn(2, 32),
           "lora_te_text_model_final_layer_norm.lora_up.weight": torch.randn(32, 2)}
    save_file(odd, str(tmp_path / "odd.safetensors"))
    said = []
    kohya.from_kohya(tmp_path / "odd.safetensors", tmp_path / "odd", base_cfg=dict(pipe.unet.config), log=said.append)
    assert any("1 text-encoder LoRA layers name no layer" in m and "final_layer_norm" in m for m in said), said


def test_sdxl_files_load_both_text_encoders(tmp_path):
    """SDXL's lora_te1_ / lora_te2_ layers land in CLIP-L and OpenCLIP-G (text_encoder / text_encoder_2), each at the
    adapter scale, fused or not."""
    from adapt import tiny
    pipe, _ = model.load_base(str(tiny.save_tiny_sdxl_pipeline(tmp_path / "sdxl")))
    g = torch.Generator().manual_seed(0)
    t = {}
    for prefix, te in (("lora_te1_", pipe.text_encoder), ("lora_te2_", pipe.text_encoder_2)):
        k, h = f"{prefix}text_model_encoder_layers_0_self_attn_q_proj", te.config.hidden_size
        t.update({f"{k}.lora_down.weight": torch.randn(2, h, generator=g), f"{k}.lora_up.weight": torch.randn(h, 2, generator=g),
                  f"{k}.alpha": torch.tensor(1.0)})
    m, mod = next((n, x) for n, x in pipe.unet.named_modules() if n.endswith("attn2.to_k"))
    k = "lora_unet_" + m.replace(".", "_")
    t.update({f"{k}.lora_down.weight": torch.randn(2, mod.in_features, generator=g),
              f"{k}.lora_up.weight": torch.randn(mod.out_features, 2, generator=g)})
    save_file(t, str(tmp_path / "k.safetensors"))
    ids = [tok(["a face"], padding="max_length", return_tensors="pt").input_ids for tok in (pipe.tokenizer, pipe.tokenizer_2)]
    encode = lambda: [te(i)[0] for te, i in zip((pipe.text_encoder, pipe.text_encoder_2), ids)]
    with torch.no_grad():
        base = encode()
        name = lora.load_into(pipe, tmp_path / "k.safetensors", log=lambda m: None)
        out = {}
        for fuse in (False, True):
            with lora.applied(pipe, [name], [0.5], fuse=fuse):
                out[fuse] = encode()
        with lora.applied(pipe, [name], [0.0]):
            assert all(torch.equal(a, b) for a, b in zip(encode(), base))
    for i in (0, 1):
        assert (out[True][i] - out[False][i]).abs().max() < 1e-5 and (out[False][i] - base[i]).abs().max() > 1e-2


def test_comfyui_text_encoder_names_read_as_sd_scripts_names():
    """ComfyUI keys its encoders clip_l / clip_g / clip_h (comfy/lora.py): with clip_l and clip_g together (SDXL) they
    are lora_te1_ / lora_te2_, alone (SD 1.x's clip_l, SD 2.x's clip_h) lora_te_."""
    t = torch.zeros(1)
    layer = "transformer.text_model.encoder.layers.3.self_attn.q_proj.lora_down.weight"
    xl, _ = kohya.from_comfy({f"text_encoders.clip_l.{layer}": t, f"text_encoders.clip_g.{layer}": t})
    assert sorted(xl) == ["lora_te1_text_model_encoder_layers_3_self_attn_q_proj.lora_down.weight",
                          "lora_te2_text_model_encoder_layers_3_self_attn_q_proj.lora_down.weight"]
    for clip in ("clip_l", "clip_h"):
        one, _ = kohya.from_comfy({f"text_encoders.{clip}.{layer}": t})
        assert list(one) == ["lora_te_text_model_encoder_layers_3_self_attn_q_proj.lora_down.weight"]
    mapped, unmapped = kohya.text_encoder_modules(["lora_te2_text_model_encoder_layers_3_mlp_fc2",
                                                   "lora_te_text_model_encoder_layers_0_self_attn_out_proj",
                                                   "lora_te1_text_projection"])
    assert mapped == {"lora_te2_text_model_encoder_layers_3_mlp_fc2": ("text_encoder_2", "encoder.layers.3.mlp.fc2"),
                      "lora_te_text_model_encoder_layers_0_self_attn_out_proj": ("text_encoder",
                                                                                 "encoder.layers.0.self_attn.out_proj")}
    assert unmapped == ["lora_te1_text_projection"]


def test_metadata_and_shapes_conflicts_are_named(tmp_path):
    cfg = archs.unet_config("sd21")
    f = tmp_path / "k.safetensors"
    sdscripts_file(f, cfg, metadata={"ss_base_model_version": "sd_v1"}, te_layers=0)
    with pytest.raises(lora.AdapterError, match=r"tensors say sd21 \(cross-attention width 1024\).*metadata says sd15"):
        kohya.from_kohya(f, tmp_path / "x", log=lambda m: None)
    out = kohya.from_kohya(f, tmp_path / "y", architecture="sd21", log=lambda m: None)  # the user overrides the metadata
    assert lora.facts(out).kohya["family"] == "sd21"
    with pytest.raises(lora.AdapterError, match="--architecture sdxl but the file's cross-attention width is 1024"):
        kohya.from_kohya(f, tmp_path / "z", architecture="sdxl", log=lambda m: None)


def test_bad_files_are_refused_by_name(tmp_path):
    cfg = archs.unet_config("sd15")
    f = tmp_path / "k.safetensors"
    sdscripts_file(f, cfg, te_layers=0)
    with safe_open(str(f), "pt") as h:
        src = {k: h.get_tensor(k) for k in h.keys()}
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    cases = {
        "swapped": ({**src, f"{name}.lora_down.weight": src[f"{name}.lora_up.weight"].T.contiguous(),
                     f"{name}.lora_up.weight": src[f"{name}.lora_down.weight"].T.contiguous()}, "do not fit"),
        "missing_up": ({k: v for k, v in src.items() if k != f"{name}.lora_up.weight"}, f"{name} has no lora_up.weight"),
        "dora": ({**src, f"{name}.dora_scale": torch.ones(1, 320)}, "a DoRA file"),
        "loha": ({**src, f"{name}.hada_w1_a": torch.ones(1, 320)}, "a LoHa file"),
        "unknown_layer": ({**src, "lora_unet_foo_bar.lora_down.weight": torch.ones(1, 4),
                           "lora_unet_foo_bar.lora_up.weight": torch.ones(4, 1)}, "name no layer of the sd15 UNet"),
        "text_only": ({"lora_te_x.lora_down.weight": torch.ones(1, 4)}, "no lora_unet_"),
    }
    for case, (tensors, msg) in cases.items():
        p = tmp_path / f"{case}.safetensors"
        save_file(tensors, str(p))
        with pytest.raises(lora.AdapterError, match=re.escape(msg)):
            kohya.from_kohya(p, tmp_path / case, log=lambda m: None)
    (tmp_path / "trunc.safetensors").write_bytes(f.read_bytes()[:1000])
    with pytest.raises(lora.AdapterError, match="not a readable .safetensors file"):
        kohya.from_kohya(tmp_path / "trunc.safetensors", tmp_path / "t", log=lambda m: None)


def _adapter_file(tmp_path, cross_dim, facts, out_dim=320):
    """A minimal adapt adapter whose attn2.to_k takes `cross_dim`-wide text features."""
    m = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k" if cross_dim == 2048 else \
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    meta = {"unet.r": 4, "unet.lora_alpha": 2.0, "unet.target_modules": [m]}
    save_file({f"unet.{m}.lora.down.weight": torch.randn(4, cross_dim), f"unet.{m}.lora.up.weight": torch.randn(out_dim, 4)},
              str(tmp_path / lora.WEIGHTS_NAME), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta),
                                                         lora.FACTS_KEY: json.dumps(facts)})
    return tmp_path


@pytest.mark.parametrize("width,facts,want", [
    (768, {"architecture": "sd", "prediction_type": "epsilon"}, {"ss_base_model_version": "sd_v1", "ss_v2": "False", "ss_v_parameterization": "False"}),
    (1024, {"architecture": "sd", "prediction_type": "v_prediction"}, {"ss_base_model_version": "sd_v2", "ss_v2": "True", "ss_v_parameterization": "True"}),
    (2048, {"architecture": "sdxl", "prediction_type": "epsilon"}, {"ss_base_model_version": "sdxl_base_v1-0", "ss_v2": "False"}),
])
def test_export_writes_the_metadata_clients_filter_on(width, facts, want, tmp_path):
    (tmp_path / "ad").mkdir()
    ad = _adapter_file(tmp_path / "ad", width, facts, out_dim=640 if width == 2048 else 320)
    f = kohya.to_kohya(ad, tmp_path / "k.safetensors")
    with safe_open(str(f), "pt") as h:
        meta, keys = h.metadata(), list(h.keys())
    assert {k: meta[k] for k in want} == want and meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"
    if width == 2048:
        assert keys[0].startswith("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k")
    back = kohya.from_kohya(f, tmp_path / "back", log=lambda m: None)  # and our own files import back, family intact
    assert lora.facts(back).kohya["family"] == {768: "sd15", 1024: "sd21", 2048: "sdxl"}[width]


@pytest.mark.parametrize("extra", ["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_magnitude_vector",
                                   "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_magnitude_vector"])
def test_export_refuses_tensors_it_cannot_carry(extra, tmp_path):
    """A DoRA magnitude (UNet or text encoder) has no place in a plain LoRA kohya file: named, never dropped."""
    ad = _adapter_file(tmp_path, 768, {"architecture": "sd"})
    with safe_open(str(ad / lora.WEIGHTS_NAME), "pt") as h:
        tensors, meta = {k: h.get_tensor(k) for k in h.keys()}, h.metadata()
    save_file({**tensors, extra: torch.ones(4)}, str(ad / lora.WEIGHTS_NAME), metadata=meta)
    with pytest.raises(lora.AdapterError, match=re.escape(extra)):
        kohya.to_kohya(ad, tmp_path / "k.safetensors")
    assert not (tmp_path / "k.safetensors").exists()


@pytest.mark.parametrize("arch", ["sd15", "sdxl"])
def test_text_encoder_layers_export_under_sd_scripts_names(arch, tmp_path):
    """An adapter with text-encoder layers (imported from sd-scripts, or diffusers' --train_text_encoder) exports them
    back under sd-scripts' own names (lora_te_, or lora_te1_ / lora_te2_ on SDXL) with their alphas: kohya -> adapt ->
    kohya gives the original file's tensors, key for key."""
    cfg = archs.unet_config(arch)
    f = tmp_path / "k.safetensors"
    sdscripts_file(f, cfg, te_layers=2, dtype=torch.float32, metadata={"ss_base_model_version": kohya.VERSIONS[arch]})
    back = kohya.to_kohya(kohya.from_kohya(f, tmp_path / "imported", log=lambda m: None), tmp_path / "back.safetensors")
    with safe_open(str(f), "pt") as a, safe_open(str(back), "pt") as b:
        te = sorted(k for k in a.keys() if k.startswith("lora_te"))
        assert te == sorted(k for k in b.keys() if k.startswith("lora_te")) and len(te) == (12 if arch == "sdxl" else 6)
        for k in te:
            assert torch.equal(a.get_tensor(k).float(), b.get_tensor(k).float()), k


@pytest.mark.integration  # subprocess-heavy: `make test-integration`
def test_cli_import_and_never_overwriting_the_input(tmp_path):
    ad = _adapter_file(tmp_path, 768, {"architecture": "sd"})
    run = lambda *a: subprocess.run([sys.executable, "-m", "adapt.cli", "export", *map(str, a)], capture_output=True, text=True)
    r = run(ad / lora.WEIGHTS_NAME, "--format", "kohya", "--out", ad / lora.WEIGHTS_NAME)
    assert r.returncode == 2 and "is the input" in r.stderr and "Traceback" not in r.stderr
    before = (ad / lora.WEIGHTS_NAME).read_bytes()
    assert run(ad, "--format", "kohya", "--out", tmp_path / "k.safetensors").returncode == 0
    r = run(ad, "--format", "kohya", "--out", tmp_path / "k.safetensors")
    assert r.returncode == 2 and "exists; pass --overwrite" in r.stderr
    r = run(tmp_path / "k.safetensors", "--format", "diffusers", "--out", tmp_path / "imp")
    assert r.returncode == 0, r.stderr
    assert (ad / lora.WEIGHTS_NAME).read_bytes() == before
    for f in (tmp_path / "k.safetensors", tmp_path / "imp" / lora.WEIGHTS_NAME):
        assert f.stat().st_mode & 0o777 == 0o644
