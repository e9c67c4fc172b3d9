"""peft's own save format: what `PeftModel.save_pretrained` (or `unet.save_pretrained` after `get_peft_model`) writes
for a UNet LoRA trained with peft directly, as custom scripts do.

A folder with `adapter_model.safetensors` (keys `base_model.model.<module>.lora_A.weight` / `.lora_B.weight`) and
`adapter_config.json` (r, lora_alpha, rank_pattern, alpha_pattern, target_modules, use_rslora, ...). diffusers'
`load_lora_weights` does not read it; adapt reads it as the diffusers-format adapter it is (`unet.<module>...` keys,
the config as peft metadata under `unet.`), so sampling, evaluation, inspection and export treat it like any other.
rsLoRA (scale alpha/sqrt(r), Kalajdzievski 2023) is written out as the plain alpha that gives the same scale
(alpha·sqrt(r)), per module, since kohya clients know only alpha/r.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

PREFIX = "base_model.model."
CONFIG = "adapter_config.json"
KEPT = ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "lora_dropout", "bias")


def is_peft(keys) -> bool:
    keys = list(keys)
    return bool(keys) and all(k.startswith(PREFIX) for k in keys)


def _pattern(pattern: dict, module: str, default):
    """peft's per-module value: the first pattern key that matches the module path's end (peft's get_pattern_key)."""
    return next((v for k, v in pattern.items() if re.match(rf"(.*\.)?({k})$", module)), default)


def convert(path: Path, tensors: dict) -> tuple[dict, dict]:
    """(tensors under diffusers' `unet.` names, peft metadata under `unet.`) for the peft file `path`, whose config
    must sit beside it. Anything but plain LoRA is refused by name."""
    from adapt.lora import AdapterError
    cfg_file = Path(path).parent / CONFIG
    if not cfg_file.is_file():
        raise AdapterError(f"{path}: peft's names (base_model.model.*) but no {CONFIG} beside it, so its rank and alpha "
                           "are unknown; keep the folder PeftModel.save_pretrained wrote whole")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"{cfg_file}: not readable JSON ({type(e).__name__}: {e})") from None
    if cfg.get("peft_type", "LORA") != "LORA" or cfg.get("use_dora"):
        kind = "DoRA" if cfg.get("use_dora") else cfg.get("peft_type")
        raise AdapterError(f"{path}: a {kind} adapter ({CONFIG}); adapt loads plain LoRA only")
    missing = [k for k in ("r", "lora_alpha") if cfg.get(k) is None]
    if missing:
        raise AdapterError(f"{cfg_file}: no {', '.join(missing)}: the adapter's scale is unknown")
    out = {"unet." + k[len(PREFIX):]: v for k, v in tensors.items()}
    meta = {"unet.rank_pattern": {}, "unet.alpha_pattern": {}}  # diffusers 0.35 (the floor) needs both present
    meta |= {f"unet.{k}": cfg[k] for k in KEPT if cfg.get(k) is not None}
    if cfg.get("use_rslora"):  # scale alpha / sqrt(r): the plain alpha with that scale is alpha * sqrt(r), per module
        modules = sorted({k[len(PREFIX):].rsplit(".lora_", 1)[0] for k in tensors if ".lora_A." in k})
        ranks = {m: _pattern(cfg.get("rank_pattern") or {}, m, cfg["r"]) for m in modules}
        alphas = {m: _pattern(cfg.get("alpha_pattern") or {}, m, cfg["lora_alpha"]) for m in modules}
        meta["unet.alpha_pattern"] = {re.escape(m): alphas[m] * math.sqrt(ranks[m]) for m in modules}
        meta["unet.lora_alpha"] = cfg["lora_alpha"] * math.sqrt(cfg["r"])
    return out, meta


def to_diffusers(adapter, target: Path) -> Path:
    """Write the peft folder `adapter` as a diffusers-format adapter file `target` (what `adapt export --format
    diffusers` writes, and what sampling loads)."""
    from adapt import atomic, lora
    tensors, header = lora.read(adapter)  # read converts peft's layout
    return atomic.write_safetensors(tensors, Path(target), {"format": "pt",
                                                          "lora_adapter_metadata": json.dumps(header["lora_adapter_metadata"])})
