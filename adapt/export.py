"""kohya / WebUI / ComfyUI LoRA format: export from and import into adapt's diffusers-format adapters.

kohya keys: `lora_unet_<module path with '_'>.lora_down.weight` (r, in), `.lora_up.weight` (out, r) and a
scalar `.alpha`; the WebUI and ComfyUI apply up @ down * alpha / r. For SD 1.x/2.x the module path is
diffusers' own (sd-scripts trains diffusers UNets); for SDXL it is the original SGM layout
(input_blocks / middle_block / output_blocks), which is what SDXL tools expect. Import maps the names
back by the same rules; the tests check both directions against diffusers' own kohya converter (the code
`pipe.load_lora_weights(kohya_file)` runs). Import keeps UNet LoRA only and says what it leaves out
(text-encoder keys) or cannot take (LoHa/LoKr/DoRA/convolution LoRA).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from adapt import lora


def _alphas(header: dict, modules: list[str], ranks: dict[str, int]) -> dict[str, float]:
    """Per-module alpha from peft metadata (lora_alpha, alpha_pattern), as trained."""
    meta = {k.split("unet.", 1)[-1]: v for k, v in (header.get("lora_adapter_metadata") or {}).items()}
    if "lora_alpha" not in meta:
        raise lora.AdapterError("adapter has no lora_alpha metadata: its trained scale is unknown, refusing to guess "
                                "(re-save it with adapt, or pass the alpha explicitly)")
    pattern = meta.get("alpha_pattern") or {}
    out = {}
    for m in modules:
        a = next((v for k, v in pattern.items() if re.search(k, m)), meta["lora_alpha"])
        out[m] = float(a)
    return out


def sdxl_to_sgm(path: str, layers_per_block: int = 2) -> str:
    """diffusers SDXL UNet module path -> SGM path (down_blocks.1.attentions.0 -> input_blocks.4.1).

    SGM numbers every resnet(+attention) layer and downsampler in one list: down block i, layer j is
    input_blocks[(L+1)·i + j + 1] (L = layers_per_block); up blocks have L+1 layers: output_blocks[(L+1)·i + j].
    """
    n = layers_per_block + 1
    m = re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", path)
    if m:
        i, j, rest = int(m[1]), int(m[2]), m[3]
        return f"input_blocks.{n * i + j + 1}.1.{rest}"
    m = re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", path)
    if m:
        i, j, rest = int(m[1]), int(m[2]), m[3]
        return f"output_blocks.{n * i + j}.1.{rest}"
    m = re.match(r"mid_block\.attentions\.0\.(.*)", path)
    if m:
        return f"middle_block.1.{m[1]}"
    raise lora.AdapterError(f"no SGM name for SDXL module {path!r} (only attention-block layers are mapped)")


def to_kohya(adapter: str | Path, out_file: str | Path, layers_per_block: int = 2) -> Path:
    """Write a kohya-format .safetensors (lora_unet_* keys with .alpha) from an adapt/diffusers adapter."""
    tensors, header = lora.read(adapter)
    facts = header.get(lora.FACTS_KEY, {})
    sdxl = facts.get("architecture") == "sdxl"
    downs = {k[len("unet."):-len(".lora.down.weight")]: v for k, v in tensors.items() if k.endswith(".lora.down.weight")}
    ups = {k[len("unet."):-len(".lora.up.weight")]: v for k, v in tensors.items() if k.endswith(".lora.up.weight")}
    if not downs or downs.keys() != ups.keys():
        raise lora.AdapterError(f"{adapter}: expected paired unet.*.lora.down/up weights, found {len(downs)} down, {len(ups)} up")
    alphas = _alphas(header, list(downs), {m: v.shape[0] for m, v in downs.items()})
    out = {}
    for m in sorted(downs):
        name = "lora_unet_" + (sdxl_to_sgm(m, layers_per_block) if sdxl else m).replace(".", "_")
        out[f"{name}.lora_down.weight"] = downs[m].contiguous()
        out[f"{name}.lora_up.weight"] = ups[m].contiguous()
        out[f"{name}.alpha"] = torch.tensor(alphas[m], dtype=torch.float32)
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(next(iter(downs.values())).shape[0]),
            "ss_network_alpha": str(next(iter(alphas.values()))), "ss_base_model_version": "sdxl_base_v1-0" if sdxl else "sd_v1",
            lora.FACTS_KEY: json.dumps(facts, sort_keys=True)}
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_suffix(".tmp")
    save_file(out, str(tmp), metadata=meta)
    tmp.replace(out_file)
    return out_file


_COMPOUND = ["down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out",
             "proj_in", "proj_out", "input_blocks", "output_blocks", "middle_block", "time_emb_proj", "conv_shortcut"]


def kohya_to_module(name: str, architecture: str) -> str:
    """'lora_unet_down_blocks_0_..._attn2_to_out_0' -> 'down_blocks.0....attn2.to_out.0' (SGM names mapped back for SDXL)."""
    s = name[len("lora_unet_"):]
    for c in _COMPOUND:
        s = s.replace(c, c.replace("_", "§"))
    path = s.replace("_", ".").replace("§", "_")
    if architecture == "sdxl":
        m = re.match(r"input_blocks\.(\d+)\.1\.(.*)", path)
        if m:
            k = int(m[1]) - 1
            return f"down_blocks.{k // 3}.attentions.{k % 3}.{m[2]}"
        m = re.match(r"output_blocks\.(\d+)\.1\.(.*)", path)
        if m:
            return f"up_blocks.{int(m[1]) // 3}.attentions.{int(m[1]) % 3}.{m[2]}"
        m = re.match(r"middle_block\.1\.(.*)", path)
        if m:
            return f"mid_block.attentions.0.{m[1]}"
    return path


def kohya_architecture(names: list[str], header: dict) -> str:
    """'sdxl' when the keys use SGM block names (or sd-scripts says SDXL), else 'sd'."""
    if any(n.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_")) for n in names):
        return "sdxl"
    return "sdxl" if "sdxl" in str(header.get("ss_base_model_version", "")) else "sd"


def from_kohya(kohya_file: str | Path, out_dir: str | Path, architecture: str = "auto", log=print) -> Path:
    """Import a kohya-format file as a diffusers-format adapter with the same per-module alpha/rank."""
    from safetensors import safe_open
    path = Path(kohya_file)
    if path.suffix in lora.PICKLE_SUFFIXES:
        raise lora.AdapterError(f"{path}: {lora.refuse_pickle_reason()}")
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        header = dict(f.metadata() or {})
    unet_keys = [k for k in tensors if k.startswith("lora_unet_")]
    names = sorted({k.split(".")[0] for k in unet_keys})
    if not names:
        raise lora.AdapterError(f"{path}: no lora_unet_* keys; not a kohya-format UNet LoRA")
    other = [k for k in unet_keys if not k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))]
    if other:  # LyCORIS LoHa (hada_*), LoKr (lokr_*), DoRA (dora_scale) carry other tensors than down/up/alpha
        raise lora.AdapterError(f"{path}: {len(other)} keys of a format adapt cannot import (only plain LoRA down/up/alpha), "
                                f"e.g. {other[:3]}")
    conv = [n for n in names if tensors[f"{n}.lora_down.weight"].ndim != 2]
    if conv:
        raise lora.AdapterError(f"{path}: {len(conv)} convolution LoRA layers (LoCon), e.g. {conv[:2]}; adapt adapts "
                                "attention Linear layers only (load the file with diffusers' pipe.load_lora_weights instead)")
    dropped = sorted({k.split(".")[0] for k in tensors if k.startswith("lora_te")})
    if dropped:
        log(f"warning: {len(dropped)} text-encoder LoRA layers (lora_te*) not imported: adapt adapters change the UNet "
            f"only, so outputs will differ from the original file (e.g. {dropped[0]})")
    architecture = kohya_architecture(names, header) if architecture == "auto" else architecture
    out, alphas, ranks = {}, {}, {}
    for n in names:
        mod = kohya_to_module(n, architecture)
        down, up = tensors[f"{n}.lora_down.weight"], tensors[f"{n}.lora_up.weight"]
        out[f"unet.{mod}.lora.down.weight"] = down.contiguous()
        out[f"unet.{mod}.lora.up.weight"] = up.contiguous()
        ranks[mod] = down.shape[0]
        alphas[mod] = float(tensors[f"{n}.alpha"]) if f"{n}.alpha" in tensors else float(down.shape[0])
    r = max(ranks.values())
    base_alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    meta = {"unet.r": r, "unet.lora_alpha": base_alpha, "unet.peft_type": "LORA", "unet.target_modules": sorted(alphas),
            "unet.rank_pattern": {re.escape(m) + "$": v for m, v in ranks.items() if v != r},
            "unet.alpha_pattern": {re.escape(m) + "$": v for m, v in alphas.items() if v != base_alpha},
            "unet.init_lora_weights": True, "unet.lora_dropout": 0.0, "unet.bias": "none"}
    facts = json.loads(header.get(lora.FACTS_KEY, "{}"))
    facts.update(architecture=architecture, imported_from=str(path), dropped_text_encoder_layers=len(dropped))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(out, str(out_dir / lora.WEIGHTS_NAME),
              metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta), lora.FACTS_KEY: json.dumps(facts, sort_keys=True)})
    return out_dir / lora.WEIGHTS_NAME


def add_parser(sub):
    p = sub.add_parser("export", help="convert an adapter: --format kohya (WebUI/ComfyUI) or diffusers (import kohya)")
    p.add_argument("adapter", help="adapter folder or .safetensors file")
    p.add_argument("--format", choices=["kohya", "diffusers"], required=True)
    p.add_argument("--out", default=None, help="output file (kohya) or folder (diffusers)")
    p.add_argument("--architecture", choices=["auto", "sd", "sdxl"], default="auto",
                   help="for kohya import: the base's architecture (auto: SGM block names mean SDXL)")
    p.set_defaults(func=cmd_export)


def cmd_export(a) -> int:
    if a.format == "kohya":
        out = a.out or str(Path(a.adapter if Path(a.adapter).is_dir() else Path(a.adapter).parent) / "kohya_lora.safetensors")
        path = to_kohya(a.adapter, out)
    else:
        path = from_kohya(a.adapter, a.out or str(Path(a.adapter).with_suffix("")) + "_diffusers", a.architecture)
    print(f"wrote {path}")
    return 0
