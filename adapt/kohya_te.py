"""Text-encoder LoRA layers in kohya files: sd-scripts' names <-> diffusers' format, both ways (adapt.kohya uses it).

sd-scripts (networks/lora.py) adapts the Linears of CLIP's attention and MLP blocks and names them
`lora_te_text_model_encoder_layers_<i>_self_attn_q_proj` (SD 1.x/2.x) or `lora_te1_` / `lora_te2_` (SDXL's CLIP-L and
OpenCLIP-G). diffusers names the same layers `text_encoder[_2].text_model.encoder.layers.<i>.self_attn.q_proj` and
reads them with peft's lora_A / lora_B names, rank and alpha from the `<component>.` entries of its adapter metadata.
transformers 5 flattened CLIPTextModel (no `text_model.`): diffusers strips the prefix when the model lacks it, and
module paths here leave it out, which peft's suffix matching accepts in either layout.
"""

from __future__ import annotations

import re

import torch

from adapt import lora

# sd-scripts adapts the Linears of CLIP's attention and MLP blocks; lora_te1_ / lora_te2_ are SDXL's CLIP-L / OpenCLIP-G
_TE = re.compile(r"^lora_te([12]?)_text_model_encoder_layers_(\d+)_(self_attn_(?:q|k|v|out)_proj|mlp_fc[12])$")
TE_COMPONENTS = {"": "text_encoder", "1": "text_encoder", "2": "text_encoder_2"}


def text_encoder_modules(names: list[str]) -> tuple[dict[str, tuple[str, str]], list[str]]:
    """kohya text-encoder layer name -> (pipeline component, module path below CLIP's text_model), and the names that
    map to none. Paths leave out `text_model.`, which transformers 5 flattened away; peft matches them by suffix."""
    mapped, unmapped = {}, []
    for n in names:
        m = _TE.match(n)
        if m is None:
            unmapped.append(n)
            continue
        block = m[3].replace("self_attn_", "self_attn.", 1).replace("mlp_", "mlp.", 1)
        mapped[n] = (TE_COMPONENTS[m[1]], f"encoder.layers.{m[2]}.{block}")
    return mapped, unmapped


def text_encoder_shapes(pipe) -> dict[str, dict[str, tuple[int, int]]]:
    """component -> module path (as text_encoder_modules names it) -> (in, out) features, for a loaded pipeline."""
    out = {}
    for comp in TE_COMPONENTS.values():
        te = getattr(pipe, comp, None)
        if te is None:
            continue
        out[comp] = {}
        for n, m in te.named_modules():
            layer = getattr(m, "base_layer", m)  # an adapter already loaded wraps the Linear
            if isinstance(layer, torch.nn.Linear) and ".lora_" not in n and not n.endswith(".base_layer"):
                out[comp][n.removeprefix("text_model.")] = (layer.in_features, layer.out_features)
    return out


def text_encoder_tensors(path, tensors: dict, layers: dict, shapes: dict | None) -> tuple[dict, dict]:
    """diffusers-format tensors (peft's lora_A / lora_B names, which diffusers' text-encoder loader reads) and peft
    metadata (per-module rank and alpha, keyed by component) for the mapped text-encoder layers."""
    out, meta, by_comp = {}, {}, {}
    for n, (comp, mod) in layers.items():
        if f"{n}.lora_down.weight" not in tensors or f"{n}.lora_up.weight" not in tensors:
            raise lora.AdapterError(f"{path}: {n} lacks lora_down or lora_up (the file is incomplete)")
        down, up = tensors[f"{n}.lora_down.weight"], tensors[f"{n}.lora_up.weight"]
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            raise lora.AdapterError(f"{path}: {n}: lora_down {tuple(down.shape)} / lora_up {tuple(up.shape)} are not a "
                                    "rank-r pair of a Linear layer")
        if shapes is not None:
            have = shapes.get(comp, {}).get(mod)
            if have is None:
                raise lora.AdapterError(f"{path}: {n} names {comp}.{mod}, which this pipeline's text encoders lack "
                                        f"({len(shapes.get(comp, {}))} Linear layers in {comp})")
            if (down.shape[1], up.shape[0]) != have:
                raise lora.AdapterError(f"{path}: {n}: lora_down {tuple(down.shape)} / lora_up {tuple(up.shape)} do not "
                                        f"fit {comp}.{mod}, which maps {have[0]} -> {have[1]} features")
        out[f"{comp}.text_model.{mod}.lora_A.weight"] = down.float().contiguous()
        out[f"{comp}.text_model.{mod}.lora_B.weight"] = up.float().contiguous()
        alpha = float(tensors[f"{n}.alpha"]) if f"{n}.alpha" in tensors else float(down.shape[0])
        by_comp.setdefault(comp, {})[mod] = (int(down.shape[0]), alpha)
    for comp, mods in by_comp.items():
        r = max({v[0] for v in mods.values()}, key=[v[0] for v in mods.values()].count)
        a = max({v[1] for v in mods.values()}, key=[v[1] for v in mods.values()].count)
        meta.update({f"{comp}.r": r, f"{comp}.lora_alpha": a, f"{comp}.peft_type": "LORA",
                     f"{comp}.target_modules": sorted(mods), f"{comp}.init_lora_weights": True,
                     f"{comp}.lora_dropout": 0.0, f"{comp}.bias": "none",
                     f"{comp}.rank_pattern": {re.escape(m): v[0] for m, v in mods.items() if v[0] != r},
                     f"{comp}.alpha_pattern": {re.escape(m): v[1] for m, v in mods.items() if v[1] != a}})
    return out, meta


_TE_PART = re.compile(r"^(text_encoder(?:_2)?)\.(?:text_model\.)?(.+?)\.(lora_A|lora_B|lora\.down|lora\.up|"
                      r"lora_linear_layer\.down|lora_linear_layer\.up)\.weight$")


def text_encoder_kohya(tensors: dict, header: dict, sdxl: bool) -> dict:
    """A diffusers adapter's text-encoder layers under sd-scripts' names (lora_te_, or lora_te1_ / lora_te2_ on SDXL),
    with their alphas; any other text-encoder tensor is refused."""
    parts, bad = {}, []
    for k, v in tensors.items():
        if k.startswith(lora.TEXT_ENCODERS):
            m = _TE_PART.match(k)
            if m is None:
                bad.append(k)
                continue
            side = "down" if m[3].endswith(("A", "down")) else "up"
            parts.setdefault((m[1], m[2]), {})[side] = v
    if bad:
        raise lora.AdapterError(f"{len(bad)} text-encoder tensors are not LoRA down/up weights (e.g. {bad[:3]}); "
                                "the kohya format holds plain LoRA layers only")
    out = {}
    for comp in ("text_encoder", "text_encoder_2"):
        mods = {mod: p for (c, mod), p in parts.items() if c == comp}
        if not mods:
            continue
        unpaired = [m for m, p in mods.items() if len(p) != 2]
        if unpaired:
            raise lora.AdapterError(f"{comp}: LoRA layers without both down and up weights: {unpaired[:3]}")
        from adapt.kohya import alphas_of  # kohya imports this module
        alphas = alphas_of(header, list(mods), comp)
        prefix = ("lora_te2_" if comp == "text_encoder_2" else "lora_te1_") if sdxl else "lora_te_"
        for mod, p in sorted(mods.items()):
            k = prefix + "text_model_" + mod.replace(".", "_")
            out[f"{k}.lora_down.weight"] = p["down"].contiguous()
            out[f"{k}.lora_up.weight"] = p["up"].contiguous()
            out[f"{k}.alpha"] = torch.tensor(alphas[mod], dtype=torch.float32)
    return out
