"""Write an SD 1.x pipeline as one original-layout (CompVis/WebUI) .safetensors checkpoint.

diffusers reads such files (`from_single_file`) but ships no writer. adapt needs one to prove its
single-file loading path offline: the tests write a small checkpoint with SD 1.x's block layout and
load it back through diffusers' own single-file converter. Key names follow the original LDM code:
`model.diffusion_model.*` (UNet), `first_stage_model.*` (VAE), `cond_stage_model.transformer.*` (CLIP).
The block numbering is derived from the model configs, so any SD 1.x-shaped geometry works.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import save_file

_UNET_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
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


def vae_to_original(sd: dict, cfg) -> dict:
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
        out["first_stage_model." + name] = v
    return out


def save_sd1_checkpoint(pipe, path: str | Path) -> Path:
    """Write `pipe` (an SD 1.x-shaped StableDiffusionPipeline) as one original-layout .safetensors file."""
    sd = {}
    sd.update(unet_to_original(pipe.unet.state_dict(), pipe.unet.config))
    sd.update(vae_to_original(pipe.vae.state_dict(), pipe.vae.config))
    te = pipe.text_encoder.state_dict()  # transformers >= 5.6 flattens CLIPTextModel; the original keeps text_model.
    sd.update({"cond_stage_model.transformer." + (k if k.startswith("text_model.") else "text_model." + k): v for k, v in te.items()})
    path = Path(path)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path
