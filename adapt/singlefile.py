"""Write an SD 1.x / 2.x / SDXL pipeline as one original-layout (CompVis/SGM/WebUI) .safetensors checkpoint.

diffusers reads such files (`from_single_file`) but ships no writer. adapt needs one to prove its
single-file loading path offline: the tests write small checkpoints with each family's key layout and
load them back through diffusers' own single-file converter. `adapt export --format kohya` also uses the VAE part
to write a tuned decoder as the standalone VAE file WebUI and ComfyUI select. Key names follow the original code:
- UNet `model.diffusion_model.*` (SDXL's `add_embedding` is `label_emb.0`), VAE `first_stage_model.*`;
- SD 1.x text encoder: OpenAI CLIP in HF layout under `cond_stage_model.transformer.*`;
- SD 2.x text encoder: OpenCLIP layout under `cond_stage_model.model.*` (fused q/k/v `in_proj_*`);
- SDXL: `conditioner.embedders.0.transformer.*` (CLIP-L, HF layout) and `conditioner.embedders.1.model.*`
  (OpenCLIP bigG layout, with `text_projection` stored transposed, as `x @ P`).
The block numbering is derived from the model configs, so any geometry of these families works.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

_UNET_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
               "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
               "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
           ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]


def unet_prefixes(cfg) -> list[tuple[str, str]]:
    """(diffusers prefix, original prefix) for every block of a UNet2DConditionModel config."""
    L, n = cfg["layers_per_block"], len(cfg["down_block_types"])
    out = []
    for i, kind in enumerate(cfg["down_block_types"]):
        for j in range(L):
            out.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{(L + 1) * i + j + 1}.0."))
            if "CrossAttn" in kind:
                out.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{(L + 1) * i + j + 1}.1."))
        if i < n - 1:
            out.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(L + 1) * (i + 1)}.0.op."))
    for i, kind in enumerate(cfg["up_block_types"]):
        attn = "CrossAttn" in kind
        for j in range(L + 1):
            out.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{(L + 1) * i + j}.0."))
            if attn:
                out.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{(L + 1) * i + j}.1."))
        if i < n - 1:
            out.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{(L + 1) * i + L}.{2 if attn else 1}."))
    out += [("mid_block.resnets.0.", "middle_block.0."), ("mid_block.attentions.0.", "middle_block.1."),
            ("mid_block.resnets.1.", "middle_block.2.")]
    return out


def unet_to_original(sd: dict, cfg) -> dict:
    prefixes = unet_prefixes(cfg)
    out = {}
    for k, v in sd.items():
        name = k
        for hf, orig in _UNET_FIXED.items():
            if name.startswith(hf + "."):
                name = orig + name[len(hf):]
        for hf, orig in prefixes:
            if name.startswith(hf):
                rest = name[len(hf):]
                if ".resnets." in hf:
                    for a, b in _RESNET:
                        rest = rest.replace(a + ".", b + ".", 1) if rest.startswith(a + ".") else rest
                name = orig + rest
                break
        out["model.diffusion_model." + name] = v
    return out


def vae_to_original(sd: dict, cfg, prefix: str = "first_stage_model.") -> dict:
    """A diffusers AutoencoderKL state dict in the original (CompVis) layout. prefix "" gives a standalone VAE file,
    the layout WebUI (models/VAE) and ComfyUI (models/vae) load, as Stability's vae-ft-mse-840000 ships."""
    n, L = len(cfg["block_out_channels"]), cfg["layers_per_block"]
    pairs = [("conv_shortcut", "nin_shortcut"), ("conv_norm_out", "norm_out"), ("mid_block.attentions.0.", "mid.attn_1."),
             ("mid_block.resnets.0.", "mid.block_1."), ("mid_block.resnets.1.", "mid.block_2.")]
    for i in range(n):
        pairs += [(f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.") for j in range(L)]
        pairs += [(f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{n - 1 - i}.block.{j}.") for j in range(L + 1)]
        if i < n - 1:
            pairs += [(f"down_blocks.{i}.downsamplers.0.", f"down.{i}.downsample."),
                      (f"up_blocks.{i}.upsamplers.0.", f"up.{n - 1 - i}.upsample.")]
    attn = [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out.")]
    out = {}
    for k, v in sd.items():
        name = k
        for a, b in pairs:
            name = name.replace(a, b)
        if ".attn_1." in name:
            for a, b in attn:
                name = name.replace(".attn_1." + a, ".attn_1." + b)
            if v.ndim == 2:  # linear -> 1x1 conv, as the original VAE stores them
                v = v.reshape(*v.shape, 1, 1)
        out[prefix + name] = v
    return out


def clip_to_original(sd: dict, prefix: str) -> dict:
    """HF CLIPTextModel keys -> the HF-layout keys the original checkpoints keep (always under text_model.)."""
    # transformers >= 5.6 flattens CLIPTextModel; the original files keep the text_model. level.
    return {prefix + (k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v for k, v in sd.items()}


_OPENCLIP = [("self_attn.out_proj.", "attn.out_proj."), ("layer_norm1.", "ln_1."), ("layer_norm2.", "ln_2."),
             ("mlp.fc1.", "mlp.c_fc."), ("mlp.fc2.", "mlp.c_proj.")]


def openclip_to_original(sd: dict, prefix: str) -> dict:
    """HF CLIPTextModel(WithProjection) keys -> OpenCLIP's: fused in_proj, resblocks, ln_final, x @ P projection."""
    sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    out = {prefix + "token_embedding.weight": sd.pop("embeddings.token_embedding.weight"),
           prefix + "positional_embedding": sd.pop("embeddings.position_embedding.weight"),
           prefix + "ln_final.weight": sd.pop("final_layer_norm.weight"),
           prefix + "ln_final.bias": sd.pop("final_layer_norm.bias")}
    if "text_projection.weight" in sd:  # nn.Linear stores (out, in); OpenCLIP multiplies x @ P, P: (in, out)
        out[prefix + "text_projection"] = sd.pop("text_projection.weight").T
    layers = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.layers.")})
    for i in layers:
        src, dst = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):  # OpenCLIP's nn.MultiheadAttention packs q, k, v in one (3d, d) matrix
            out[dst + f"attn.in_proj_{kind}"] = torch.cat([sd.pop(f"{src}self_attn.{p}_proj.{kind}") for p in "qkv"])
        for k in [k for k in sd if k.startswith(src)]:
            rest = k[len(src):]
            for a, b in _OPENCLIP:
                if rest.startswith(a):
                    rest = b + rest[len(a):]
            out[dst + rest] = sd.pop(k)
    if sd:
        raise ValueError(f"text encoder keys with no OpenCLIP name: {sorted(sd)[:5]}")
    return out


def save_checkpoint(pipe, path: str | Path, text_layout: str | None = None) -> Path:
    """Write `pipe` as one original-layout .safetensors file (SD 1.x, SD 2.x or SDXL key names).

    `text_layout` ("clip" or "openclip") picks the SD text encoder's layout; by default SD 1.x-style
    CLIP unless the text encoder has a 1024-wide hidden state (SD 2.x's OpenCLIP ViT-H).
    """
    sd = {}
    sd.update(unet_to_original(pipe.unet.state_dict(), pipe.unet.config))
    sd.update(vae_to_original(pipe.vae.state_dict(), pipe.vae.config))
    if getattr(pipe, "text_encoder_2", None) is not None:
        sd.update(clip_to_original(pipe.text_encoder.state_dict(), "conditioner.embedders.0.transformer."))
        sd.update(openclip_to_original(pipe.text_encoder_2.state_dict(), "conditioner.embedders.1.model."))
    else:
        if text_layout is None:
            text_layout = "openclip" if pipe.text_encoder.config.hidden_size == 1024 else "clip"
        if text_layout not in ("clip", "openclip"):
            raise ValueError(f"text_layout={text_layout!r}; expected 'clip' (SD 1.x) or 'openclip' (SD 2.x)")
        te = pipe.text_encoder.state_dict()
        sd.update(clip_to_original(te, "cond_stage_model.transformer.") if text_layout == "clip"
                  else openclip_to_original(te, "cond_stage_model.model."))
    path = Path(path)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path
