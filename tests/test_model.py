"""Base loading: the same path for the tiny model as for a real checkpoint; clear errors."""

import os
from pathlib import Path

import pytest
from conftest import rewrite_safetensors

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
    from adapt.singlefile import save_checkpoint
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
    ckpt = save_checkpoint(pipe, tmp_path / "model.safetensors")
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
    # the model card's plain-diffusers block, pasted offline, loads this file with the configs it trained with
    import re
    import subprocess
    import sys
    from PIL import Image
    (py,) = re.findall(r"```python\n(.*?)```", (tmp_path / "o" / "README.md").read_text(), flags=re.S)
    assert f'from_single_file("{ckpt}", config="{tmp_path / "folder"}")' in py
    Image.new("RGB", (64, 64), (120, 100, 90)).save(tmp_path / "source.png")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", py], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert Image.open(tmp_path / "adapted.png").size == (64, 64)


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_single_file_sd2_openclip_and_sdxl_load_exactly(tmp_path, family):
    """SD 2.x (OpenCLIP text encoder, v-prediction) and SDXL (two encoders, label_emb) single files."""
    import torch
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from safetensors import safe_open
    from adapt.singlefile import save_checkpoint
    from adapt.tiny import build_tiny_components, build_tiny_sdxl_components
    if family == "sdxl":
        pipe, kw, probe = StableDiffusionXLPipeline(**build_tiny_sdxl_components()), {"architecture": "sdxl"}, \
            ["conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight",
             "conditioner.embedders.1.model.text_projection", "model.diffusion_model.label_emb.0.0.weight",
             "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight"]
    else:
        pipe, kw, probe = StableDiffusionPipeline(**build_tiny_components(prediction_type="v_prediction")), {}, \
            ["cond_stage_model.model.transformer.resblocks.1.attn.in_proj_bias", "cond_stage_model.model.ln_final.weight"]
    pipe.save_pretrained(tmp_path / "folder")
    ckpt = save_checkpoint(pipe, tmp_path / "model.safetensors", text_layout=None if family == "sdxl" else "openclip")
    with safe_open(str(ckpt), "pt") as f:
        keys = set(f.keys())
    assert set(probe) <= keys
    assert model.single_file_architecture(str(ckpt)) == ("sdxl" if family == "sdxl" else "sd")
    loaded, facts = model.load_base(str(ckpt), config=str(tmp_path / "folder"), **kw)
    assert facts.architecture == ("sdxl" if family == "sdxl" else "sd")
    assert facts.prediction_type == ("epsilon" if family == "sdxl" else "v_prediction")
    names = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if family == "sdxl" else [])
    for name in names:
        a, b = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k].reshape(a[k].shape)) for k in a), name
    if family == "sdxl":  # the recipe trains on it; SDXL is told from the key names
        from adapt import lora, synth
        from conftest import ROOT, run_recipe
        data = synth.build_imagefolder("sunglasses", tmp_path / "d", n=4, split="train")
        r = run_recipe(["--config", str(ROOT / "recipes/configs/tiny_test.yaml"), f"model.base={ckpt}",
                        f"model.config={tmp_path / 'folder'}", f"data.source={data}",
                        f"out_dir={tmp_path / 'o'}", "train.max_steps=2", "objective.scheduler=euler"], launcher="python")
        assert r.returncode == 0, r.stderr[-2000:]
        assert lora.facts(tmp_path / "o").architecture == "sdxl"


@pytest.mark.parametrize("arch", ["sd15", "sd21", "sdxl"])
def test_single_file_unet_names_on_real_configs(arch):
    """The writer's UNet names for the published geometries go back through diffusers' converter key for key."""
    import json
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    from adapt.singlefile import unet_to_original
    cfg = json.loads((Path(model.__file__).parent / "archs" / f"{arch}_unet.json").read_text())
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(cfg)
    sd = unet.state_dict()
    orig = unet_to_original(sd, unet.config)
    assert set(convert_ldm_unet_checkpoint(orig, dict(unet.config))) == set(sd)
    known = {  # key names as they appear in the published original checkpoints
        "sd15": ["input_blocks.3.0.op.weight", "output_blocks.2.1.conv.weight", "middle_block.1.proj_in.weight",
                 "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"],
        "sd21": ["output_blocks.2.1.conv.weight", "input_blocks.1.1.proj_in.weight"],
        "sdxl": ["label_emb.0.0.weight", "output_blocks.2.2.conv.weight",
                 "input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight",
                 "middle_block.1.transformer_blocks.9.attn2.to_out.0.weight"]}[arch]
    assert {"model.diffusion_model." + k for k in known} <= set(orig)
    assert len(orig) == {"sd15": 686, "sd21": 686, "sdxl": 1680}[arch]


def test_single_file_without_sd_keys_is_named(tmp_path):
    import torch
    from safetensors.torch import save_file
    f = tmp_path / "lora.safetensors"  # e.g. a LoRA file passed as the base by mistake
    save_file({"lora_unet_x.alpha": torch.tensor(1.0)}, str(f))
    with pytest.raises(model.ModelError, match="lora.safetensors: no Stable Diffusion keys"):
        model.load_base(str(f))


def test_hub_id_loads_through_the_hub_cache(tmp_path):
    """A hub id goes through huggingface_hub's resolution (refs -> snapshot), as after a real download."""
    import shutil
    from adapt import lora, synth
    from adapt.tiny import save_tiny_pipeline
    from conftest import ROOT, run_recipe
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--adapt-test--tiny-sd"  # the layout huggingface_hub writes when downloading
    shutil.copytree(save_tiny_pipeline(tmp_path / "src"), repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    data = synth.build_imagefolder("sunglasses", tmp_path / "d", n=4, split="train")
    args = ["--config", str(ROOT / "recipes/configs/tiny_test.yaml"), "model.base=adapt-test/tiny-sd",
            f"data.source={data}", "train.max_steps=1"]
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    r = run_recipe(args + [f"model.revision={commit}", f"out_dir={tmp_path / 'o'}"], launcher="python", env_extra=env)
    assert r.returncode == 0, r.stderr[-2000:]
    fx = lora.facts(tmp_path / "o")  # the adapter records the commit it was trained on
    assert (fx.base, fx.base_revision, fx.base_resolved) == ("adapt-test/tiny-sd", commit, f"adapt-test/tiny-sd@{commit}")
    assert f'from_pretrained("adapt-test/tiny-sd", revision="{commit}")' in (tmp_path / "o" / "README.md").read_text()
    r = run_recipe(args + ["model.revision=v9", f"out_dir={tmp_path / 'o2'}"], launcher="python", env_extra=env)
    assert r.returncode == 2 and "hub id 'adapt-test/tiny-sd'" in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize("encoder", ["sdxl_bigG", "sd2_vitH"])
def test_single_file_openclip_names_on_real_configs(encoder):
    """OpenCLIP ViT-bigG (SDXL) and ViT-H (SD 2.x) text encoders at full size: names and shapes survive diffusers' converter."""
    from accelerate import init_empty_weights
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    from adapt.singlefile import openclip_to_original
    cls, kw, prefix, layers = {
        "sdxl_bigG": (CLIPTextModelWithProjection, dict(hidden_size=1280, intermediate_size=5120, num_attention_heads=20,
                                                        projection_dim=1280), "conditioner.embedders.1.model.", 32),
        "sd2_vitH": (CLIPTextModel, dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16), "cond_stage_model.model.", 23),
    }[encoder]
    with init_empty_weights():
        te = cls(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, num_hidden_layers=layers, hidden_act="gelu", **kw))
    sd = te.state_dict()
    orig = openclip_to_original(sd, prefix)
    width = kw["hidden_size"]
    assert orig[f"{prefix}transformer.resblocks.{layers - 1}.attn.in_proj_weight"].shape == (3 * width, width)
    assert len(orig) == 12 * layers + 4 + (encoder == "sdxl_bigG")  # per block 12 tensors; embeddings, ln_final, projection
    back = convert_open_clip_checkpoint(te, orig, prefix=prefix)
    back = back if hasattr(te, "text_model") else {k.removeprefix("text_model."): v for k, v in back.items()}
    assert back.keys() == sd.keys() and all(back[k].shape == sd[k].shape for k in sd)


def test_img2img_keeps_each_module_and_parameter_dtype(tiny_base):
    """diffusers' from_pipe casts the modules it shares to float32 unless told a dtype (huggingface/diffusers#12754):
    img2img from a bf16 pipeline (the recipe's validation, adapt sample --dtype) must leave every module in bf16,
    and a mixed one as it was."""
    import numpy as np
    import torch
    from PIL import Image
    from adapt import sample
    from adapt import lora
    pipe, _ = model.load_base(str(tiny_base), torch_dtype="bfloat16")
    lora.attach(pipe.unet, "cross_attn", rank=4)  # the recipe's fp32 LoRA beside bf16 weights: neither may be cast
    img = Image.fromarray(np.full((64, 64, 3), 128, np.uint8))
    sample.img2img(pipe, [img], "a face", 0.5, 4, 1.0)
    assert {n: m.dtype for n, m in pipe.components.items() if isinstance(m, torch.nn.Module)} == \
        {"unet": torch.bfloat16, "vae": torch.bfloat16, "text_encoder": torch.bfloat16}
    assert {p.dtype for n, p in pipe.unet.named_parameters() if "lora_" in n} == {torch.float32}
    pipe.vae.to(torch.float32)  # mixed: each module keeps its own
    i2i = sample._variant(sample._variant(pipe, "img2img"), "txt2img")
    assert (i2i.unet, i2i.vae) == (pipe.unet, pipe.vae)  # shared, not copied
    assert (pipe.unet.dtype, pipe.vae.dtype) == (torch.bfloat16, torch.float32)


def test_dtype_reaches_diffusers_under_the_name_its_version_reads(monkeypatch):
    """diffusers before 0.40 ignores an unknown dtype= silently (the base loads fp32); it reads torch_dtype=."""
    import diffusers
    import torch
    monkeypatch.setattr(diffusers, "__version__", "0.35.0")
    assert model.dtype_kw(torch.bfloat16) == {"torch_dtype": torch.bfloat16}
    monkeypatch.setattr(diffusers, "__version__", "0.40.0.dev0")
    assert model.dtype_kw(torch.float16) == {"dtype": torch.float16}
    monkeypatch.setattr(diffusers, "__version__", "1.2.0")
    assert model.dtype_kw(torch.float16) == {"dtype": torch.float16}


@pytest.mark.parametrize("folder", ["embedded", "tiny"])
def test_pipelines_load_the_same_in_transformers_4_and_5(folder, tmp_path):
    """transformers 4.x builds CLIPTokenizer from vocab.json + merges.txt only (transformers 5 saves tokenizer.json
    alone), and needs the text encoder's `text_model.` names: the embedded base and every pipeline adapt saves
    carry both; the files tokenize as tokenizer.json does. `make test-floors` runs this on transformers 4.56."""
    import shutil
    from transformers import CLIPTokenizer
    from adapt.tiny import save_tiny_pipeline
    src = (Path(model.resolve("tiny-faces")[1]) if folder == "embedded" else save_tiny_pipeline(tmp_path / "p")) / "tokenizer"
    slow = tmp_path / "slow"
    slow.mkdir()
    for f in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(src / f, slow / f)
    a, b = CLIPTokenizer.from_pretrained(src), CLIPTokenizer.from_pretrained(slow)
    for text in ["a photo of a face with curly blond hair, wearing sunglasses", "zebra 123 ümlaut!", ""]:
        assert a(text).input_ids == b(text).input_ids
    assert model.write_portable(src.parent) == []  # already there: nothing rewritten
    # every text-encoder weight is found by name (transformers 4.x reports unprefixed ones missing and draws them at random)
    from transformers import CLIPTextModel
    _, info = CLIPTextModel.from_pretrained(src.parent / "text_encoder", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info


@pytest.mark.parametrize("component,key", [("unet", "conv_norm_out.weight"),
                                           ("text_encoder", "text_model.encoder.layers.0.layer_norm1.weight"),
                                           ("vae", "decoder.conv_out.bias")])
def test_a_weight_missing_from_the_checkpoint_is_refused_not_drawn_at_random(tiny_base, tmp_path, component, key):
    """diffusers and transformers fill a weight the file lacks with random values and only warn (adapt.quiet()
    silences the warning): the base would train and sample as a model nobody trained."""
    import shutil
    folder = shutil.copytree(tiny_base, tmp_path / "base")
    f = next((folder / component).glob("*.safetensors"))
    rewrite_safetensors(f, lambda t: {k: v for k, v in t.items() if k != key})
    with pytest.raises(model.ModelError, match=rf"{component}: 1 of .* weights were not loaded from {f.name} and hold "
                                               rf"random values \((text_model\.)?{key.removeprefix('text_model.')}\): "
                                               "the checkpoint lacks them"):
        model.load_base(str(folder))


def test_a_replacement_vae_missing_a_weight_is_refused(tiny_base, tmp_path):
    import shutil
    vae = shutil.copytree(tiny_base / "vae", tmp_path / "vae")
    rewrite_safetensors(vae / "diffusion_pytorch_model.safetensors", lambda t: {k: v for k, v in t.items() if k != "encoder.conv_in.weight"})
    with pytest.raises(model.ModelError, match="vae: 1 of AutoencoderKL's .* \\(encoder.conv_in.weight\\)"):
        model.load_base(str(tiny_base), vae=str(vae))


def test_renamed_and_recast_weights_are_not_false_alarms(tiny_base, tmp_path):
    """What the loaders map on purpose passes: a VAE saved before diffusers 0.14 (attention as query/key/value/
    proj_attn), an fp16 variant read into fp32 and bf16, a text encoder with or without the `text_model.` prefix
    (transformers 5 reads both)."""
    import shutil
    import torch
    import transformers
    folder = shutil.copytree(tiny_base, tmp_path / "base")
    old = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}

    def deprecated(t):
        out = {}
        for k, v in t.items():
            for new, was in old.items():
                k = k.replace(new, was) if "mid_block.attentions" in k else k
            out[k] = v
        return out
    rewrite_safetensors(folder / "vae" / "diffusion_pytorch_model.safetensors", deprecated)
    for comp in ("unet", "vae", "text_encoder"):
        for f in (folder / comp).glob("*.safetensors"):
            shutil.copy(f, f.with_name(f.name.replace(".safetensors", ".fp16.safetensors")))
            rewrite_safetensors(f.with_name(f.name.replace(".safetensors", ".fp16.safetensors")),
                     lambda t: {k: v.half() for k, v in t.items()})
    ref, _ = model.load_base(str(tiny_base))
    pipe, _ = model.load_base(str(folder))  # the renamed VAE: its attention loads as the original's
    assert torch.equal(pipe.vae.decoder.mid_block.attentions[0].to_q.weight, ref.vae.decoder.mid_block.attentions[0].to_q.weight)
    for dtype in (torch.float32, torch.bfloat16):
        p16, _ = model.load_base(str(folder), variant="fp16", torch_dtype=dtype)
        w = p16.unet.conv_in.weight
        assert w.dtype == dtype and torch.equal(w, ref.unet.conv_in.weight.half().to(dtype))
    rewrite_safetensors(folder / "text_encoder" / "model.safetensors", lambda t: {k.removeprefix("text_model."): v for k, v in t.items()})
    if int(transformers.__version__.split(".")[0]) >= 5:
        pipe, _ = model.load_base(str(folder), variant=None)
        assert all(torch.equal(a, b) for a, b in zip(pipe.text_encoder.parameters(), ref.text_encoder.parameters()))
    else:  # transformers 4.x draws every unprefixed weight at random: refused, with the way out
        with pytest.raises(model.ModelError, match=r"lack the `text_model\.` prefix \(saved by transformers >= 5\).*"
                                                   r"write_portable"):
            model.load_base(str(folder))
        assert model.write_portable(folder) == ["text_encoder: text_model. prefix"]
        pipe, _ = model.load_base(str(folder))
        assert all(torch.equal(a, b) for a, b in zip(pipe.text_encoder.parameters(), ref.text_encoder.parameters()))


@pytest.mark.parametrize("key,says", [
    ("cond_stage_model.transformer.text_model.final_layer_norm.weight",
     r"holds no value for 1 of text_encoder's weights \((text_model\.)?final_layer_norm.weight\)"),
    ("model.diffusion_model.out.0.weight", r"a weight the model needs is missing from the file")])
def test_a_single_file_missing_a_weight_is_refused_at_load(tmp_path, key, says):
    """diffusers' single-file loader leaves a text-encoder weight the file lacks on the meta device, so the load
    'succeeds' and the first prompt fails deep inside CLIP; a UNet weight fails with 'Cannot copy out of meta tensor'."""
    from diffusers import StableDiffusionPipeline
    from adapt.singlefile import save_checkpoint
    from adapt.tiny import build_tiny_components
    pipe = StableDiffusionPipeline(**build_tiny_components())
    pipe.save_pretrained(tmp_path / "folder")
    ckpt = save_checkpoint(pipe, tmp_path / "model.safetensors")
    rewrite_safetensors(ckpt, lambda t: {k: v for k, v in t.items() if k != key})
    with pytest.raises(model.ModelError, match=rf"model.safetensors: .*{says}"):
        model.load_base(str(ckpt), config=str(tmp_path / "folder"))
