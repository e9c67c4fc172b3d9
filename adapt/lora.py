"""LoRA adapters on the UNet (Hu et al. 2021), through peft, saved in the formats people load.

Presets select layers by full-match regex over UNet module names. In diffusers' UNets `attn1`
is self-attention and `attn2` is cross-attention (queries from image features, keys/values from
the text encoder), so `cross_attn` adapts exactly how text steers the image.

Files: `pytorch_lora_weights.safetensors` in diffusers format with peft's adapter metadata (so
alpha survives a plain `pipe.load_lora_weights`) plus adapt's own facts under the safetensors
metadata key "adapt" (base, preset, rank, alpha, strength, window, scheduler, steps, data hash).
"""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open

from adapt import atomic
# where an adapter's file is (folders, files, hub ids), re-exported: lora.locate, lora.weights_path, ... stay its API
from adapt.adapterfile import (HUB_ID, PICKLE_SUFFIXES, WEIGHTS_NAME, AdapterError, _keys, hub_id, locate,  # noqa: F401
                               refuse_pickle_reason, weights_path, weights_sha256)
from adapt.facts import AdapterFacts, FactsError

FACTS_KEY = "adapt"
_TRANSFORMER = r".*attentions\.\d+\.(proj_in|proj_out|transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)))$"
PRESETS = {
    "cross_attn": r".*attn2\.(to_q|to_k|to_v|to_out\.0)$",
    "cross_attn_kv": r".*attn2\.(to_k|to_v)$",  # Custom Diffusion (Kumari et al. 2023) trains only these
    "all_attn": r".*attn[12]\.(to_q|to_k|to_v|to_out\.0)$",
    # LoCon (kohya's conv_dim): cross-attention plus every resnet's 3x3 convs. In SD-style UNets cross-attention
    # runs only at the coarser levels, so attn2 alone cannot place detail finer than its grid (the tiny base's
    # 8x8 of a 16x16 latent); the convs reach every level, the full-resolution one included.
    "cross_attn_conv": r".*(attn2\.(to_q|to_k|to_v|to_out\.0)|resnets\.\d+\.conv[12])$",
    # sd-scripts' default network (networks.lora on Transformer2DModel): every Linear and 1x1 conv of the transformer
    # blocks, so a kohya file trained with its defaults can be continued (lora.init_from) layer for layer.
    "transformer": _TRANSFORMER,
    # ... plus what its conv_dim adds (LoCon on ResnetBlock2D, Downsample2D, Upsample2D: their convs, and the resnets'
    # 1x1 shortcut and time-embedding projection, which it adapts at the linear rank).
    "transformer_conv": rf"{_TRANSFORMER[:-1]}|.*(resnets\.\d+\.(conv1|conv2|conv_shortcut|time_emb_proj)|(down|up)samplers\.0\.conv)$",
}
ADAPTABLE = (torch.nn.Linear, torch.nn.Conv2d)
TEXT_ENCODERS = ("text_encoder.", "text_encoder_2.")  # key prefixes of text-encoder LoRA layers in diffusers' format


def target_modules(unet: torch.nn.Module, preset: str) -> list[str]:
    """Names of the Linear and Conv2d layers a preset selects (before any adapter is attached)."""
    if preset not in PRESETS:
        raise AdapterError(f"unknown LoRA preset {preset!r}; presets: {sorted(PRESETS)}")
    rx = re.compile(PRESETS[preset])
    return [n for n, m in unet.named_modules() if rx.fullmatch(n) and isinstance(m, ADAPTABLE)]


def _width(m: torch.nn.Module) -> int:
    """The largest rank that adds capacity to a layer: min(in, out) features or channels."""
    return min(m.in_features, m.out_features) if isinstance(m, torch.nn.Linear) else min(m.in_channels, m.out_channels)


def attach(unet, preset: str = "cross_attn", rank: int = 8, alpha: float | None = None, dropout: float = 0.0,
           init: str = "gaussian", adapter_name: str = "default", rank_pattern: dict | None = None,
           alpha_pattern: dict | None = None) -> dict:
    """Freeze `unet` and add a peft LoRA adapter on the preset's layers; return the audit. rank_pattern /
    alpha_pattern (peft's: regex -> value) give some layers their own rank and alpha (adapt.warmstart)."""
    from peft import LoraConfig
    names = target_modules(unet, preset)
    if not names:
        raise AdapterError(f"LoRA preset {preset!r} (regex {PRESETS[preset]}) matches no Linear or Conv2d layer of this UNet")
    patterned = {n for n in names if any(re.fullmatch(k, n) for k in rank_pattern or {})}
    widths = {n: _width(m) for n, m in unet.named_modules() if n in set(names) - patterned}
    narrow = min(widths, key=widths.get) if widths else None  # (None: every layer has its rank from rank_pattern)
    if narrow is not None and rank > widths[narrow]:
        raise AdapterError(f"lora.rank {rank} exceeds the narrowest adapted layer ({narrow}: min(in, out) = "
                           f"{widths[narrow]}); a higher rank adds parameters but no capacity. Use lora.rank <= {widths[narrow]}")
    unet.requires_grad_(False)
    cfg = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, lora_dropout=dropout,
                     init_lora_weights=True if init == "default" else init, target_modules=PRESETS[preset],
                     rank_pattern=dict(rank_pattern or {}), alpha_pattern=dict(alpha_pattern or {}))
    unet.add_adapter(cfg, adapter_name=adapter_name)
    for n, p in unet.named_parameters():  # LoRA weights train in fp32 whatever the base dtype
        if "lora_" in n:
            p.data = p.data.float()
            p.requires_grad_(True)
    return audit(unet, preset)


def audit(unet, preset: str) -> dict:
    """Which modules carry adapters and how many parameters train."""
    lora_params = {n: p for n, p in unet.named_parameters() if "lora_" in n}
    modules = sorted({n.split(".lora_")[0].replace(".base_layer", "") for n in lora_params})
    trainable = sum(p.numel() for p in unet.parameters() if p.requires_grad)
    total = sum(p.numel() for p in unet.parameters())
    return {"preset": preset, "regex": PRESETS[preset], "modules": modules, "num_modules": len(modules),
            "self_attention_modules": [m for m in modules if ".attn1." in m],
            "trainable_params": trainable, "total_params": total, "trainable_fraction": trainable / total}


def state_dict(unet, adapter_name: str = "default") -> dict:
    """The adapter's weights with diffusers key names (`<module>.lora.down/up.weight`), without the 'unet.' prefix.

    diffusers' converter renames only attention projections and leaves every other layer (LoCon convs) in peft's
    `lora_A/lora_B`; its loader then guesses one format for the whole file from the first key, so a file whose
    first key is a conv loses every attention layer (a RuntimeWarning, nothing more). One naming for all layers.
    """
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict
    return one_naming(convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name=adapter_name)))


def one_naming(tensors: dict) -> dict:
    """UNet keys in peft's `.lora_A/.lora_B.weight` renamed to diffusers' `.lora.down/.lora.up.weight`; other keys
    unchanged (diffusers' text-encoder loader reads peft's names, not `.lora.down`)."""
    return {re.sub(r"\.lora_A\.weight$", ".lora.down.weight", re.sub(r"\.lora_B\.weight$", ".lora.up.weight", k))
            if not k.startswith(TEXT_ENCODERS) else k: v for k, v in tensors.items()}


def save(out_dir: str | Path, unet, facts: AdapterFacts, adapter_name: str = "default", te_tensors: dict | None = None,
         te_meta: dict | None = None) -> Path:
    """Write `pytorch_lora_weights.safetensors` atomically: diffusers' layout (what `save_lora_weights` writes:
    'unet.'-prefixed keys, peft's LoraConfig under 'lora_adapter_metadata') plus adapt's facts under 'adapt'.
    te_tensors / te_meta: text-encoder layers ('text_encoder[_2].' keys) and their metadata, written unchanged.
    """
    layers = {f"unet.{k}": v.detach().float().cpu().contiguous() for k, v in state_dict(unet, adapter_name).items()}
    layers.update({k: v.contiguous() for k, v in (te_tensors or {}).items()})
    meta = {f"unet.{k}": sorted(v) if isinstance(v, set) else v for k, v in unet.peft_config[adapter_name].to_dict().items()}
    meta.update(te_meta or {})
    header = {"format": "pt", "lora_adapter_metadata": json.dumps(meta, indent=2, sort_keys=True),
              FACTS_KEY: facts.to_header()}
    return atomic.write_safetensors(layers, Path(out_dir) / WEIGHTS_NAME, header)


def read(adapter: str | Path) -> tuple[dict, dict]:
    """(tensors, header) of an adapter; header['adapt'] is an AdapterFacts (or None), header['lora_adapter_metadata']
    a dict. A truncated or foreign file is an AdapterError naming it (safetensors raises its own error type)."""
    path = weights_path(adapter)
    try:
        with safe_open(str(path), "pt") as f:
            header = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise AdapterError(f"{path}: not a readable .safetensors file ({type(e).__name__}: {e})") from e
    from adapt import peftfile
    if peftfile.is_peft(tensors):  # PeftModel.save_pretrained's folder: read as the diffusers adapter it is
        tensors, meta = peftfile.convert(path, tensors)
        header["lora_adapter_metadata"] = json.dumps(meta)
    try:
        if "lora_adapter_metadata" in header:
            header["lora_adapter_metadata"] = json.loads(header["lora_adapter_metadata"])
        header[FACTS_KEY] = AdapterFacts.from_header(header.get(FACTS_KEY), str(path))
    except (ValueError, FactsError) as e:
        raise AdapterError(f"{path}: unreadable header: {e}") from e
    return tensors, header


def facts(adapter: str | Path) -> AdapterFacts | None:
    """adapt's record stored with the adapter (None for adapters trained elsewhere)."""
    return read(adapter)[1][FACTS_KEY]


def _base_weights(unet) -> dict:
    """The UNet's base weights by name: LoRA layers excluded, peft's `.base_layer` dropped (the same names with or
    without an adapter attached)."""
    return {k.replace(".base_layer", ""): v for k, v in unet.state_dict().items() if "lora_" not in k and k.endswith(".weight")}


def base_probe(unet, tensors: int = 8, values: int = 8) -> list:
    """[[name, first `values` values as floats], ...] for `tensors` base weights spread over the UNet's sorted
    weight names. Stored with an adapter, it tells a changed base under an unchanged name or path; compared within
    bf16's precision, so the dtype a pipeline is loaded in does not matter."""
    sd = _base_weights(unet)
    names = sorted(sd)
    pick = sorted({names[round(i * (len(names) - 1) / max(tensors - 1, 1))] for i in range(tensors)})
    return [[n, sd[n].detach().flatten()[:values].float().cpu().tolist()] for n in pick]


def probe_mismatch(unet, probe: list) -> str | None:
    """The first probed weight that `unet` lacks or holds other values in (beyond bf16 rounding), or None."""
    sd = _base_weights(unet)
    for name, vals in probe:
        if name not in sd:
            return f"{name} is missing"
        now = sd[name].detach().flatten()[:len(vals)].float().cpu()
        if not torch.allclose(now, torch.tensor(vals), rtol=1e-2, atol=1e-4):
            return f"{name} starts {[round(x, 4) for x in now[:3].tolist()]}, trained against {[round(x, 4) for x in vals[:3]]}"
    return None


def load_into(pipe, adapter: str | Path, scale: float = 1.0, adapter_name: str | None = None, check: bool = True,
              base_resolved: str | None = None, log=print) -> str:
    """Load an adapter into a diffusers pipeline with diffusers' own loader, then audit the load.

    Checks: every key maps to a UNet module (else lists the unmatched ones), the stored alpha
    survived (effective scale alpha/rank as trained), and the architecture matches. With `base_resolved`
    (what the pipeline was loaded from), an adapter recorded on another base is a warning: same shapes
    load fine, but the adapter learned a correction to different weights.
    """
    path = weights_path(adapter)
    keys = _keys(path)  # the header alone: a kohya file's tensors are read once, by the import
    from adapt import kohya, kohya_te
    if kohya.is_kohya(keys):
        # A kohya / WebUI / ComfyUI file (what civitai serves): imported against this pipeline's own UNet config, exactly as
        # `adapt export --format diffusers --base` would write it, then loaded like any adapter.
        import tempfile
        with tempfile.TemporaryDirectory() as tmp:
            kohya.from_kohya(path, tmp, base_cfg=dict(pipe.unet.config), log=log, te_shapes=kohya_te.text_encoder_shapes(pipe))
            return load_into(pipe, tmp, scale, adapter_name, check, base_resolved, log)
    from adapt import peftfile
    if peftfile.is_peft(keys):  # peft's save_pretrained folder: loaded as the diffusers-format adapter `read` makes of it
        import tempfile
        with tempfile.TemporaryDirectory() as tmp:
            peftfile.to_diffusers(path, Path(tmp) / WEIGHTS_NAME)
            return load_into(pipe, tmp, scale, adapter_name, check, base_resolved, log)
    tensors, header = read(path)
    name = adapter_name or f"adapter_{len(pipe.get_list_adapters().get('unet', [])) if hasattr(pipe, 'get_list_adapters') else 0}"
    f = header[FACTS_KEY]
    arch = "sdxl" if getattr(pipe, "text_encoder_2", None) is not None else "sd"
    if f is not None and f.architecture != arch:
        raise AdapterError(f"{path}: adapter was trained on a {f.architecture} base ({f.base}), "
                           f"this pipeline is {arch}; load it into a matching base")
    if f is not None and base_resolved and f.base_resolved and not _same_base(f.base_resolved, base_resolved):
        log(f"warning: {path} was trained on {f.base_resolved}, this pipeline is {base_resolved}; the shapes match, "
            "but the adapter learned a correction to other weights, so outputs may not be what it was trained for")
    elif f is not None and f.base_probe and (why := probe_mismatch(pipe.unet, f.base_probe)):
        log(f"warning: {path} was trained against other UNet weights than this pipeline's "
            f"({base_resolved or 'this base'}, the same name or path: {why}); the adapter learned a correction to "
            "those weights, so outputs may not be what it was trained for")
    if check:
        check_keys(pipe.unet, tensors, path)
        ups = [v for k, v in tensors.items() if k.endswith((".lora.up.weight", ".lora_B.weight"))]
        if ups and all(float(v.abs().max()) == 0 for v in ups):
            raise AdapterError(f"{path}: every LoRA up/B matrix is zero, so this adapter changes nothing at any scale "
                               "(saved before training, or training diverged to zero)")
    file_modules = {k[len("unet."):].rsplit(".lora", 1)[0] for k in tensors if k.startswith("unet.") and ".lora" in k}
    unet_keys = [k for k in tensors if k.startswith("unet.")]
    if any(k.endswith(".lora.down.weight") for k in unet_keys) and any(k.endswith(".lora_A.weight") for k in unet_keys):
        # both namings in one file (diffusers' converter writes them so for LoCon convs): its loader would keep only
        # the layers named like the first key, so load a copy with one naming, header (alpha) included
        import tempfile
        with tempfile.TemporaryDirectory() as tmp:
            with safe_open(str(path), "pt") as f:
                raw = dict(f.metadata() or {})
            copy = atomic.write_safetensors(one_naming(tensors), Path(tmp) / WEIGHTS_NAME, raw)
            pipe.load_lora_weights(tmp, weight_name=copy.name, adapter_name=name)
    else:
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name)
    loaded = {n for n, m in pipe.unet.named_modules() if name in getattr(m, "lora_A", {})}
    if check and file_modules - loaded:
        missing = sorted(file_modules - loaded)
        raise AdapterError(f"{path}: diffusers loaded {len(file_modules & loaded)} of the file's {len(file_modules)} UNet "
                           f"LoRA layers; not loaded: {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    te_file = {k.split(".")[0]: set() for k in tensors if k.startswith(TEXT_ENCODERS)}
    for k in tensors:
        if k.startswith(TEXT_ENCODERS) and ".lora" in k:
            te_file[k.split(".")[0]].add(k.split(".", 1)[1].rsplit(".lora", 1)[0].removeprefix("text_model."))
    for comp, mods in te_file.items():  # diffusers warns and goes on when text-encoder keys load nowhere
        te = getattr(pipe, comp, None)
        got = {n.removeprefix("text_model.") for n, m in te.named_modules() if name in getattr(m, "lora_A", {})} \
            if te is not None else set()
        if check and mods - got:
            missing = sorted(mods - got)
            raise AdapterError(f"{path}: diffusers loaded {len(mods & got)} of the file's {len(mods)} {comp} LoRA layers; "
                               f"not loaded: {missing[:3]}{' ...' if len(missing) > 3 else ''}")
        log(f"{len(got)} {comp} LoRA layers loaded (the adapter scale applies to them as to the UNet's)")
    pipe.set_adapters([name], [scale])
    if check and "lora_adapter_metadata" in header:
        want = header["lora_adapter_metadata"]
        meta = {k.split("unet.", 1)[-1]: v for k, v in want.items()} if isinstance(want, dict) else {}
        got = pipe.unet.peft_config[name]
        if "lora_alpha" in meta and float(got.lora_alpha) != float(meta["lora_alpha"]):
            raise AdapterError(f"{path}: alpha {meta['lora_alpha']} was stored but {got.lora_alpha} was loaded")
    return name


def _same_base(a: str, b: str) -> bool:
    """Whether two resolved base locations name the same model. A folder that does not exist here (an adapter
    trained on another machine) is compared by its name; hub ids by id and commit."""
    if a == b:
        return True
    pa, pb = Path(a), Path(b)
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    if "@" in a and "@" in b:
        return False
    return pa.name.split("@")[0] == pb.name.split("@")[0]


def adapted_text_encoders(pipe, names: list[str]) -> list[str]:
    """The pipeline's text encoders ('text_encoder', 'text_encoder_2') that hold LoRA layers of adapters `names`."""
    return [c for c in ("text_encoder", "text_encoder_2") if getattr(pipe, c, None) is not None
            and any(n in getattr(m, "lora_A", {}) for m in getattr(pipe, c).modules() for n in names)]


@contextmanager
def applied(pipe, names: list[str], scales: list[float], fuse: bool = True):
    """Adapters `names` active at `scales` for the duration of the block.

    fuse=True folds scale·(alpha/r)·B·A into the base weights (diffusers' fuse_lora), which removes the
    per-layer LoRA matmuls from every denoising step; it is undone on exit. All-zero scales run the
    base exactly (adapters present but weighted 0, nothing fused).
    Unfusing subtracts in the weights' dtype, so the base would drift (fp16: 2e-3 after 36 fuse/unfuse
    cycles of an eval sweep; fp32: 3e-7): the touched base weights are copied to CPU first and put back.
    """
    if not fuse or all(s == 0 for s in scales):
        pipe.set_adapters(names, scales)
        yield
        return
    # the text encoders too, when an adapter has layers there (kohya files, diffusers' --train_text_encoder): else they
    # would run at the set_adapters weight 1 while the UNet's part is fused at the scale
    parts = ["unet"] + adapted_text_encoders(pipe, names)
    targets = [m for c in parts for m in getattr(pipe, c).modules()
               if hasattr(m, "base_layer") and any(n in getattr(m, "lora_A", {}) for n in names)]
    saved = [m.base_layer.weight.detach().to("cpu", copy=True) for m in targets]
    pipe.set_adapters(names, [1.0] * len(names))
    if len(set(scales)) != 1:  # one scale per adapter: fuse each at its own scale
        for n, s in zip(names, scales):
            pipe.fuse_lora(components=parts, lora_scale=s, adapter_names=[n])
    else:
        pipe.fuse_lora(components=parts, lora_scale=scales[0], adapter_names=names)
    try:
        yield
    finally:
        pipe.unfuse_lora(components=parts)
        with torch.no_grad():
            for m, w in zip(targets, saved):
                m.base_layer.weight.copy_(w)


def check_keys(unet, tensors: dict, path) -> None:
    """Every adapter key must name a Linear or Conv2d of the UNet; adapters of another architecture fail here."""
    modules = {n for n, m in unet.named_modules() if isinstance(m, ADAPTABLE) or hasattr(m, "base_layer")}
    unmatched = []
    for k, v in tensors.items():
        if not k.startswith("unet."):
            continue  # text-encoder keys are diffusers' own business
        mod = re.sub(r"\.lora(_[AB]|\.(down|up))(\.[^.]+)?\.weight$|\.alpha$", "", k[len("unet."):])
        mod = re.sub(r"\.lora_magnitude_vector.*$", "", mod)
        if mod not in modules:
            unmatched.append(k)
    if unmatched:
        shown = unmatched[:8] + (["..."] if len(unmatched) > 8 else [])
        raise AdapterError(f"{path}: {len(unmatched)} of {len(tensors)} keys map to no module of this UNet "
                           f"(adapter for another architecture or a renamed layer?): {shown}")
    if not any(k.startswith("unet.") for k in tensors):
        raise AdapterError(f"{path}: no 'unet.' keys (diffusers format) and no 'lora_unet_' keys (kohya format): "
                           "it holds no UNet LoRA")
