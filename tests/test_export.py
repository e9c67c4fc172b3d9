"""kohya/WebUI format: export, diffusers' own kohya loader, and import give identical outputs."""

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open

from adapt.facts import AdapterFacts
from adapt import export, lora, model


def _out(unet):
    g = torch.Generator().manual_seed(0)
    x, e = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 32, 32, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([100, 700]), e).sample


@pytest.fixture(scope="module")
def trained(tiny_base, tmp_path_factory):
    out = tmp_path_factory.mktemp("ad")
    pipe, _ = model.load_base(str(tiny_base))
    lora.attach(pipe.unet, "cross_attn", rank=4, alpha=2)  # scale 0.5 must survive every hop
    g = torch.Generator().manual_seed(0)
    for n, p in pipe.unet.named_parameters():
        if "lora_" in n:
            p.data = torch.randn(p.shape, generator=g) * 0.3
    lora.save(out, pipe.unet, AdapterFacts(base=str(tiny_base), base_resolved=str(tiny_base), architecture="sd", strength=0.5))
    return out, _out(pipe.unet)


def test_kohya_keys_and_alpha(trained, tmp_path):
    ad, _ = trained
    f = export.to_kohya(ad, tmp_path / "k.safetensors")
    with safe_open(str(f), "pt") as h:
        keys = list(h.keys())
        alpha = h.get_tensor(next(k for k in keys if k.endswith(".alpha")))
    assert all(k.startswith("lora_unet_") for k in keys) and len(keys) == 16 * 3
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_out_0.lora_down.weight" in keys
    assert float(alpha) == 2.0


def test_roundtrip_through_diffusers_kohya_loader_is_exact(trained, tiny_base, tmp_path, monkeypatch):
    ad, want = trained
    f = export.to_kohya(ad, tmp_path / "k.safetensors")
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_base), safety_checker=None)
    assert (_out(pipe.unet) - want).abs().max() > 1e-2  # the base alone is far off: the test can fail
    pipe.load_lora_weights(str(f.parent), weight_name=f.name)  # diffusers' own kohya conversion path
    diff = float((_out(pipe.unet) - want).abs().max())
    print(f"kohya round trip max abs diff (diffusers loader): {diff:.2e}")
    assert diff <= 1e-5
    back = export.from_kohya(f, tmp_path / "imported")
    ours, _ = model.load_base(str(tiny_base))
    lora.load_into(ours, back.parent)
    assert (_out(ours.unet) - want).abs().max() <= 1e-5
    direct, _ = model.load_base(str(tiny_base))  # the kohya file itself, as `adapt sample --adapter k.safetensors` takes it
    read_from = []
    real_read = lora.read
    monkeypatch.setattr(lora, "read", lambda p: read_from.append(lora.weights_path(p)) or real_read(p))
    lora.load_into(direct, f)
    assert (_out(direct.unet) - want).abs().max() <= 1e-5
    assert read_from and f.resolve() not in [p.resolve() for p in read_from]  # its tensors are read once, by the import


def test_a_comfyui_saved_lora_loads_as_its_layers_say(trained, tiny_base, tmp_path):
    """ComfyUI's Save LoRA node (comfy_extras/nodes_lora_extract.py) writes dotted CompVis paths under
    'diffusion_model.', no alpha (alpha = rank), fp16, text encoders under 'text_encoders.', and '.diff' tensors for
    1-D weights: the LoRA layers load exactly (in fp16), the rest is named in the log, never applied silently."""
    from safetensors.torch import save_file
    from adapt import kohya
    ad, want = trained
    tensors, _ = lora.read(ad)
    cfg = dict(model.load_base(str(tiny_base))[0].unet.config)
    comfy = {}
    for k, v in tensors.items():
        if k.endswith(".lora.down.weight"):
            mod = k[len("unet."):-len(".lora.down.weight")]
            name = "diffusion_model." + kohya.compvis_path(mod, cfg)
            comfy[f"{name}.lora_down.weight"] = v.half()
            comfy[f"{name}.lora_up.weight"] = (tensors[f"unet.{mod}.lora.up.weight"] * 0.5).half()  # alpha/r folded in
            comfy[f"{name}.diff_b"] = torch.zeros(v.shape[1]).half()
    g = torch.Generator().manual_seed(0)
    te_up, te_down = torch.randn(32, 4, generator=g) * 0.1, torch.randn(4, 32, generator=g) * 0.1
    comfy["text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.lora_up.weight"] = te_up
    comfy["text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.lora_down.weight"] = te_down
    save_file(comfy, tmp_path / "ComfyUI_extracted_lora_00001_.safetensors")
    pipe, _ = model.load_base(str(tiny_base))
    said = []
    lora.load_into(pipe, tmp_path / "ComfyUI_extracted_lora_00001_.safetensors", log=said.append)
    diff = float((_out(pipe.unet) - want).abs().max())
    assert diff <= 2e-3, diff  # the file's fp16 weights
    assert any("16 full weight differences (.diff / .diff_b" in m for m in said), said
    assert any("1 text_encoder LoRA layers loaded" in m for m in said), said  # clip_l alone: SD 1.x's text encoder
    q = dict(pipe.text_encoder.named_modules())
    q = q.get("text_model.encoder.layers.0.self_attn.q_proj") or q["encoder.layers.0.self_attn.q_proj"]
    name = next(iter(q.lora_A))
    assert torch.allclose(q.get_delta_weight(name), te_up @ te_down, atol=1e-6)  # no alpha: alpha = rank


def test_sdxl_names_map_both_ways():
    from adapt import archs, kohya
    cfg = archs.unet_config("sdxl")
    table = kohya.kohya_names(cfg)
    for path in ["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q", "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_out.0",
                 "up_blocks.0.attentions.2.transformer_blocks.3.attn2.to_v", "mid_block.attentions.0.transformer_blocks.5.attn2.to_k"]:
        sgm = kohya.sdxl_to_sgm(path)
        assert sgm == kohya.compvis_path(path, cfg) and table["lora_unet_" + sgm.replace(".", "_")] == (path, "compvis")
    assert kohya.sdxl_to_sgm("down_blocks.1.attentions.0.x") == "input_blocks.4.1.x"
    assert kohya.sdxl_to_sgm("up_blocks.0.attentions.0.x") == "output_blocks.0.1.x"


def test_missing_alpha_is_refused(tiny_base, tmp_path):
    from safetensors.torch import save_file
    save_file({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q.lora.down.weight": torch.zeros(4, 32),
               "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q.lora.up.weight": torch.zeros(32, 4)},
              str(tmp_path / lora.WEIGHTS_NAME))
    with pytest.raises(lora.AdapterError, match="lora_alpha"):
        export.to_kohya(tmp_path, tmp_path / "k.safetensors")


def test_kohya_export_ships_the_tuned_decoder_as_a_webui_vae_file(trained, tiny_base, tmp_path, capsys):
    """An adapter with vae/ exports as a kohya LoRA plus <name>_vae.safetensors in the original VAE layout (WebUI's
    models/VAE, ComfyUI's models/vae); diffusers' own single-file converter reads it back tensor for tensor."""
    import shutil
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file
    from adapt import cli, decoder
    ad = tmp_path / "ad"
    shutil.copytree(trained[0], ad)
    vae = AutoencoderKL.from_pretrained(str(tiny_base), subfolder="vae")
    with torch.no_grad():
        vae.decoder.conv_out.weight.add_(0.05)  # a decoder that differs from the base's
    folder = decoder.save(vae, ad, "k", {})
    out = tmp_path / "exp" / "sg.safetensors"
    out.parent.mkdir()
    assert cli.main(["export", str(ad), "--format", "kohya", "--out", str(out)]) == 0
    vae_file = tmp_path / "exp" / "sg_vae.safetensors"
    sd = load_file(str(vae_file))
    # the names and shapes Stability's vae-ft-mse-840000 file uses: no prefix, 1x1-conv attention, reversed up blocks
    assert {"encoder.conv_in.weight", "decoder.mid.attn_1.q.weight", "decoder.up.0.block.0.conv1.weight",
            "encoder.down.0.downsample.conv.weight", "quant_conv.weight", "post_quant_conv.weight"} <= sd.keys()
    assert sd["decoder.mid.attn_1.q.weight"].ndim == 4 and not any(k.startswith("first_stage_model.") for k in sd)
    back = AutoencoderKL.from_single_file(str(vae_file), config=str(folder), local_files_only=True)
    ref = vae.state_dict()
    assert back.state_dict().keys() == ref.keys()
    assert all(torch.equal(back.state_dict()[k], v) for k, v in ref.items())
    # an existing VAE file is refused before anything is written
    out.unlink()
    capsys.readouterr()
    assert cli.main(["export", str(ad), "--format", "kohya", "--out", str(out)]) != 0
    assert "sg_vae.safetensors exists; pass --overwrite" in capsys.readouterr().err and not out.exists()
    assert cli.main(["export", str(ad), "--format", "kohya", "--out", str(out), "--overwrite"]) == 0
    # a torn vae/ is named in one error line, not a traceback
    (folder / decoder.WEIGHTS).write_bytes(b"\x00" * 10)
    assert cli.main(["export", str(ad), "--format", "kohya", "--out", str(out), "--overwrite"]) != 0
    assert "ad/vae: not a readable tuned-VAE folder" in capsys.readouterr().err
    # an adapter without vae/ exports the LoRA alone
    solo = tmp_path / "solo.safetensors"
    assert cli.main(["export", str(trained[0]), "--format", "kohya", "--out", str(solo)]) == 0
    assert solo.is_file() and not (tmp_path / "solo_vae.safetensors").exists()
