"""kohya / sd-scripts / WebUI / ComfyUI LoRA files: names, architecture detection, export and exact import.

A kohya file holds, per adapted module, `lora_unet_<path with '_'>.lora_down.weight` (r, in[, kh, kw]),
`.lora_up.weight` (out, r[, 1, 1]) and an optional scalar `.alpha` (default r); clients apply
W + alpha/r · up @ down. The module path comes in two namings: diffusers' (sd-scripts trains diffusers
UNets, so its SD 1.x/2.x files use these) and the original CompVis/SGM one (input_blocks / middle_block /
output_blocks; SDXL tools and some SD 1.x files). Rather than guessing names from underscores, both
namings are generated from the UNet's own module list (built on the meta device from its config), so a
name maps only if the layer exists, and its shape is checked against that layer.

Import converts to adapt's diffusers-format adapter with per-module rank and alpha in peft's
rank_pattern / alpha_pattern, which diffusers' `load_lora_weights` and peft apply exactly. (diffusers'
own kohya loader collapses per-module alphas in some files; the tests compare against the formula.)
Linear layers and Conv2d layers of any kernel (1x1 proj_in/proj_out in SD 1.x, 3x3 LoCon) import;
LoHa / LoKr / DoRA are refused by name.
Text-encoder layers (sd-scripts trains them unless --network_train_unet_only): `lora_te_text_model_encoder_layers_
<i>_self_attn_q_proj` etc. on SD 1.x/2.x, `lora_te1_` / `lora_te2_` for SDXL's two encoders, import as diffusers'
`text_encoder[_2].text_model.encoder.layers.<i>...` with their own rank and alpha, so an adapter scale moves both
parts together, as WebUI's `<lora:name:s>` does. A text-encoder layer outside CLIP's attention and MLP is named
in a warning and left out.
ComfyUI's Save LoRA node writes the same layers under dotted CompVis paths (`diffusion_model.input_blocks.1.1.
...attn2.to_k.lora_up.weight`; text encoders as `text_encoders.clip_l.transformer.text_model...`, clip_g for SDXL's
second), plus full differences of 1-D weights (`.diff`, `.diff_b`: biases and norms) that no LoRA layer can hold:
read as kohya names, the diffs counted, not applied.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from adapt import atomic, lora
from adapt.kohya_te import text_encoder_kohya, text_encoder_modules, text_encoder_tensors
from adapt.facts import AdapterFacts, FactsError

WIDTHS = {768: "sd15", 1024: "sd21", 2048: "sdxl"}  # cross-attention width of the published families
VERSIONS = {"sd15": "sd_v1", "sd21": "sd_v2", "sdxl": "sdxl_base_v1-0"}  # sd-scripts' ss_base_model_version
COMPVIS_PREFIXES = ("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_")
COMFY_UNET, COMFY_TE = "diffusion_model.", "text_encoders."  # ComfyUI's Save LoRA (comfy_extras/nodes_lora_extract.py)
_COMFY_PART = re.compile(r"^(.*?)(\.lora_(?:down|up)\.weight|\.alpha|\.diff|\.diff_b)$")


def is_kohya(keys) -> bool:
    """A kohya / WebUI file (lora_unet_*), or ComfyUI's Save LoRA layout of the same layers."""
    return any(k.startswith(("lora_unet_", COMFY_UNET)) for k in keys) and not any(k.startswith("unet.") for k in keys)


def from_comfy(tensors: dict) -> tuple[dict, list[str]]:
    """(tensors with ComfyUI's dotted names as kohya's, the .diff / .diff_b keys that no LoRA layer holds)."""
    out, diffs = {}, []
    # ComfyUI names its text encoders clip_l / clip_g / clip_h; with both clip_l and clip_g (SDXL) they are kohya's
    # lora_te1_ and lora_te2_, a single one is lora_te_ (as ComfyUI's own key map, comfy/lora.py, reads them)
    clips = {k[len(COMFY_TE):].split(".")[0] for k in tensors if k.startswith(COMFY_TE)}
    prefix = {"clip_l": "lora_te1_", "clip_g": "lora_te2_"} if {"clip_l", "clip_g"} <= clips else {}
    for k, v in tensors.items():
        m = _COMFY_PART.match(k) if k.startswith((COMFY_UNET, COMFY_TE)) else None
        if m is None:
            out[k] = v
        elif m.group(2) in (".diff", ".diff_b"):
            diffs.append(k)
        elif k.startswith(COMFY_UNET):
            out["lora_unet_" + m.group(1)[len(COMFY_UNET):].replace(".", "_") + m.group(2)] = v
        else:  # text_encoders.clip_l.transformer.text_model.encoder... -> lora_te[1]_text_model_encoder_...
            clip, _, rest = m.group(1)[len(COMFY_TE):].partition(".")
            rest = rest[len("transformer."):] if rest.startswith("transformer.") else rest
            out[prefix.get(clip, "lora_te_") + rest.replace(".", "_") + m.group(2)] = v
    return out, diffs


@dataclass(frozen=True)
class Layer:
    """A UNet layer a LoRA can sit on: Linear (kernel ()) or Conv2d (kernel (kh, kw))."""
    module: str  # diffusers module path, e.g. down_blocks.0.attentions.0.proj_in
    in_features: int
    out_features: int
    kernel: tuple

    def shapes(self, r: int) -> tuple[tuple, tuple]:
        """(down, up) weight shapes of a rank-r LoRA on this layer."""
        if self.kernel:
            return (r, self.in_features, *self.kernel), (self.out_features, r, 1, 1)
        return (r, self.in_features), (self.out_features, r)


def unet_layers(cfg: dict) -> dict[str, Layer]:
    """Every Linear and Conv2d of a UNet2DConditionModel config, built on the meta device (no weights, < 1 s)."""
    return dict(_layers(json.dumps(cfg, sort_keys=True)))


@lru_cache(maxsize=8)
def _layers(cfg_json: str) -> tuple:
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(json.loads(cfg_json))
    out = []
    for n, m in unet.named_modules():
        if isinstance(m, torch.nn.Linear):
            out.append((n, Layer(n, m.in_features, m.out_features, ())))
        elif isinstance(m, torch.nn.Conv2d):
            out.append((n, Layer(n, m.in_channels, m.out_channels, tuple(m.kernel_size))))
    return tuple(out)


def compvis_path(module: str, cfg: dict) -> str:
    """diffusers module path -> original CompVis/SGM path (down_blocks.1.attentions.0.x -> input_blocks.4.1.x)."""
    from adapt.singlefile import unet_to_original
    (key,) = unet_to_original({module + ".weight": None}, cfg)
    return key[len("model.diffusion_model."):-len(".weight")]


def kohya_names(cfg: dict) -> dict[str, tuple[str, str]]:
    """kohya name -> (diffusers module, naming) for every layer, in both namings."""
    out = {}
    for m in unet_layers(cfg):
        out["lora_unet_" + m.replace(".", "_")] = (m, "diffusers")
        out["lora_unet_" + compvis_path(m, cfg).replace(".", "_")] = (m, "compvis")
    return out


def published_config(arch: str) -> dict:
    from adapt import archs
    return archs.unet_config(arch)


def _metadata_arch(header: dict) -> str | None:
    """The family sd-scripts' metadata names, if any (ss_v2 wins over an sd_v1 version string)."""
    v, v2 = str(header.get("ss_base_model_version", "")), str(header.get("ss_v2", "")).lower() == "true"
    if v.startswith("sdxl"):
        return "sdxl"
    if v.startswith("sd_v2") or v2:
        return "sd21"
    return "sd15" if v.startswith("sd_v1") else None


def detect(path, names: list[str], tensors: dict, header: dict, base_cfg: dict | None = None,
           architecture: str = "auto") -> tuple[str, dict]:
    """(family, UNet config) from the file's cross-attention width, metadata and naming; conflicts are errors."""
    widths = [int(tensors[f"{n}.lora_down.weight"].shape[1]) for n in names
              if re.search(r"attn2_to_[kv]$", n) and f"{n}.lora_down.weight" in tensors]
    width = max(set(widths), key=widths.count) if widths else None  # a stray bad layer fails its own shape check
    by_shape, by_meta = WIDTHS.get(width), _metadata_arch(header)
    if base_cfg is not None:
        want = base_cfg["cross_attention_dim"]
        if width is not None and width != want:
            raise lora.AdapterError(f"{path}: its cross-attention layers take {width}-wide text features "
                                    f"({by_shape or 'an unpublished family'}), the given base's take {want}")
        return "base", base_cfg
    if architecture != "auto":
        if by_shape and by_shape != architecture:
            raise lora.AdapterError(f"{path}: --architecture {architecture} but the file's cross-attention width is "
                                    f"{width}, which is {by_shape}")
        return architecture, published_config(architecture)
    if by_shape and by_meta and by_shape != by_meta:
        raise lora.AdapterError(
            f"{path}: the tensors say {by_shape} (cross-attention width {width}) but the metadata says {by_meta} "
            f"(ss_base_model_version={header.get('ss_base_model_version')!r}, ss_v2={header.get('ss_v2')!r}); "
            f"pass --architecture {by_shape} if the metadata is wrong (adapt before 0.3 wrote sd_v1 for SD 2.x)")
    arch = by_shape or (by_meta if width is None else None)
    if arch is None:
        raise lora.AdapterError(
            f"{path}: cannot tell the base architecture: cross-attention width {width} is none of the published "
            f"families {WIDTHS} and the metadata names none; pass --base <the base it was trained on>")
    return arch, published_config(arch)


def _read(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open
    if path.suffix in lora.PICKLE_SUFFIXES:
        raise lora.AdapterError(f"{path}: {lora.refuse_pickle_reason()}")
    if not path.is_file():
        raise lora.AdapterError(f"kohya file not found: {path}")
    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:  # safetensors raises SafetensorError (not OSError) on truncated or foreign files
        raise lora.AdapterError(f"{path}: not a readable .safetensors file ({type(e).__name__}: {e})") from e


def from_kohya(kohya_file: str | Path, out_dir: str | Path, architecture: str = "auto", base_cfg: dict | None = None,
               log=print, te_shapes: dict | None = None) -> Path:
    """Import a kohya-format LoRA as a diffusers-format adapter that reproduces W + alpha/r · up @ down per layer.
    te_shapes (text_encoder_shapes of the pipeline it will load into), when given, checks the text-encoder layers'
    shapes here, so a mismatch is named by layer rather than by peft."""
    path = Path(kohya_file)
    tensors, header = _read(path)
    tensors, diffs = from_comfy(tensors)
    if diffs:
        log(f"warning: {len(diffs)} full weight differences (.diff / .diff_b, e.g. {diffs[0]}: biases and norms that "
            "ComfyUI's Save LoRA extracts) not imported: an adapter holds LoRA layers only, so outputs will differ "
            "slightly from the original file")
    unet_keys = [k for k in tensors if k.startswith("lora_unet_")]
    names = sorted({k.split(".")[0] for k in unet_keys})
    if not names:
        raise lora.AdapterError(f"{path}: no lora_unet_* keys; not a kohya-format UNet LoRA")
    te_keys = [k for k in tensors if k.startswith("lora_te")]
    other = [k for k in unet_keys + te_keys if not k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))]
    if other:  # LyCORIS LoHa (hada_*), LoKr (lokr_*), DoRA (dora_scale) carry other tensors than down/up/alpha
        kind = "DoRA" if any("dora_scale" in k for k in other) else "LoHa" if any(".hada_" in k for k in other) else \
            "LoKr" if any(".lokr_" in k for k in other) else "not plain LoRA"
        raise lora.AdapterError(f"{path}: a {kind} file ({len(other)} keys other than lora_down/lora_up/alpha, e.g. "
                                f"{other[:3]}); adapt imports plain LoRA (Linear and Conv2d) only")
    for n in names:
        for part in ("lora_down.weight", "lora_up.weight"):
            if f"{n}.{part}" not in tensors:
                raise lora.AdapterError(f"{path}: {n} has no {part} (the file is incomplete)")
    te_layers, dropped = text_encoder_modules(sorted({k.split(".")[0] for k in te_keys}))
    if dropped:
        log(f"warning: {len(dropped)} text-encoder LoRA layers name no layer of CLIP's attention or MLP and are not "
            f"imported, so outputs will differ from the original file (e.g. {', '.join(dropped[:2])})")
    te_out, te_meta = text_encoder_tensors(path, tensors, te_layers, te_shapes)
    try:  # a file adapt exported carries its record: keep it, and map against its own base when that is here
        prior = AdapterFacts.from_header(header.get(lora.FACTS_KEY), str(path))
    except FactsError as e:
        raise lora.AdapterError(str(e)) from e
    if base_cfg is None and architecture == "auto" and prior is not None and prior.base_resolved:
        from adapt import model
        try:
            base_cfg = model.unet_config(prior.base_resolved)
        except model.ModelError:
            pass  # not on this machine: fall back to the published families
    arch, cfg = detect(path, names, tensors, header, base_cfg, architecture)
    table, layers = kohya_names(cfg), unet_layers(cfg)
    naming = "compvis" if any(n.startswith(COMPVIS_PREFIXES) for n in names) else "diffusers"
    unmapped = [n for n in names if n not in table]
    if unmapped:
        raise lora.AdapterError(f"{path}: {len(unmapped)} of {len(names)} UNet layers name no layer of the {arch} UNet "
                                f"({naming} naming), e.g. {unmapped[:3]}")
    out, alphas, ranks = {}, {}, {}
    for n in names:
        mod = table[n][0]
        down, up = tensors[f"{n}.lora_down.weight"], tensors[f"{n}.lora_up.weight"]
        want = layers[mod].shapes(down.shape[0])
        if (tuple(down.shape), tuple(up.shape)) != want:
            raise lora.AdapterError(f"{path}: {n}: lora_down {tuple(down.shape)} / lora_up {tuple(up.shape)} do not fit "
                                    f"{mod} of the {arch} UNet, which needs {want[0]} / {want[1]}")
        out[f"unet.{mod}.lora.down.weight"] = down.float().contiguous()  # fp16 files: fp32 is exact
        out[f"unet.{mod}.lora.up.weight"] = up.float().contiguous()
        ranks[mod] = int(down.shape[0])
        alphas[mod] = float(tensors[f"{n}.alpha"]) if f"{n}.alpha" in tensors else float(down.shape[0])
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    base_alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    meta = {"unet.r": r, "unet.lora_alpha": base_alpha, "unet.peft_type": "LORA", "unet.target_modules": sorted(alphas),
            "unet.rank_pattern": {re.escape(m): v for m, v in ranks.items() if v != r},
            "unet.alpha_pattern": {re.escape(m): v for m, v in alphas.items() if v != base_alpha},
            "unet.init_lora_weights": True, "unet.lora_dropout": 0.0, "unet.bias": "none"}
    meta.update(te_meta)
    out.update(te_out)
    kohya_info = {"family": arch, "naming": naming, "text_encoder_layers": len(te_layers),
                  "dropped_text_encoder_layers": len(dropped),
                  "metadata": {k: v for k, v in header.items() if k.startswith("ss_") and len(v) < 2000}}
    facts = dataclasses.replace(prior or AdapterFacts(architecture="sd"), imported_from=str(path), kohya=kohya_info,
                                architecture="sdxl" if cfg.get("addition_embed_type") == "text_time" else "sd")
    log(f"imported {len(names)} UNet layers ({arch}, {naming} names; ranks {sorted(set(ranks.values()))}, "
        f"alphas {sorted(set(alphas.values()))})" + (f" and {len(te_layers)} text-encoder layers" if te_layers else ""))
    out_dir = Path(out_dir)
    target = out_dir / lora.WEIGHTS_NAME
    atomic.write_safetensors(out, target, {"format": "pt", "lora_adapter_metadata": json.dumps(meta),
                                         lora.FACTS_KEY: facts.to_header()})
    return target


def alphas_of(header: dict, modules: list[str], component: str = "unet") -> dict[str, float]:
    """Per-module alpha from peft metadata (lora_alpha, alpha_pattern), as trained, of the UNet or a text encoder."""
    raw = header.get("lora_adapter_metadata") or {}
    meta = {k.split("unet.", 1)[-1]: v for k, v in raw.items()} if component == "unet" else \
        {k[len(component) + 1:]: v for k, v in raw.items() if k.startswith(component + ".")}
    if "lora_alpha" not in meta:
        raise lora.AdapterError(f"adapter has no {component} lora_alpha metadata: its trained scale is unknown, refusing "
                                "to guess (re-save it with adapt, or pass the alpha explicitly)")
    pattern = meta.get("alpha_pattern") or {}
    return {m: float(next((v for k, v in pattern.items() if re.match(rf"(.*\.)?({k})$", m)), meta["lora_alpha"]))
            for m in modules}


def sdxl_to_sgm(path: str, layers_per_block: int = 2) -> str:
    """diffusers SDXL attention path -> SGM path when no UNet config is known (unpublished geometries)."""
    n = layers_per_block + 1
    for rx, fmt in ((r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", lambda i, j: f"input_blocks.{n * i + j + 1}.1."),
                    (r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", lambda i, j: f"output_blocks.{n * i + j}.1.")):
        m = re.match(rx, path)
        if m:
            return fmt(int(m[1]), int(m[2])) + m[3]
    if path.startswith("mid_block.attentions.0."):
        return "middle_block.1." + path[len("mid_block.attentions.0."):]
    raise lora.AdapterError(f"no SGM name for SDXL module {path!r} (only attention-block layers are mapped "
                            "without a published UNet config)")


DOWN, UP = ".lora.down.weight", ".lora.up.weight"


def to_kohya(adapter: str | Path, out_file: str | Path, layers_per_block: int = 2) -> Path:
    """Write a kohya-format .safetensors (lora_unet_* keys with .alpha and sd-scripts' ss_* metadata)."""
    tensors, header = lora.read(adapter)
    facts = header[lora.FACTS_KEY]
    # diffusers' converter names attention projections .lora.down/.lora.up but leaves other layers (LoCon convs)
    # in peft's .lora_A/.lora_B: both are this file's layers, and a key of neither kind is refused, never dropped
    te_tensors = {k: v for k, v in tensors.items() if k.startswith(lora.TEXT_ENCODERS)}
    tensors = {k: v for k, v in tensors.items() if not k.startswith(lora.TEXT_ENCODERS)}
    other = [k for k in tensors if not (k.startswith("unet.") and k.endswith((DOWN, UP, ".lora_A.weight", ".lora_B.weight")))]
    tensors = lora.one_naming(tensors)
    downs = {k[len("unet."):-len(DOWN)]: v for k, v in tensors.items() if k.startswith("unet.") and k.endswith(DOWN)}
    ups = {k[len("unet."):-len(UP)]: v for k, v in tensors.items() if k.startswith("unet.") and k.endswith(UP)}
    if other:
        raise lora.AdapterError(f"{adapter}: {len(other)} tensors are not UNet LoRA down/up weights (e.g. {other[:3]}); "
                                "the kohya format holds plain LoRA layers only")
    if not downs or downs.keys() != ups.keys():
        raise lora.AdapterError(f"{adapter}: expected paired unet.*.lora.down/up weights, found {len(downs)} down, {len(ups)} up"
                                + (f"; unpaired: {sorted(downs.keys() ^ ups.keys())[:3]}" if downs.keys() != ups.keys() else ""))
    alphas = alphas_of(header, list(downs))
    widths = {int(v.shape[1]) for m, v in downs.items() if re.search(r"attn2\.to_[kv]$", m)}
    family = WIDTHS.get(next(iter(widths))) if len(widths) == 1 else None
    sdxl = family == "sdxl" or (facts is not None and facts.architecture == "sdxl")
    cfg = published_config(family) if family else None
    te_out = text_encoder_kohya(te_tensors, header, sdxl or any(k.startswith("text_encoder_2.") for k in te_tensors))

    def name(m: str) -> str:
        if not sdxl:
            return m
        return compvis_path(m, cfg) if cfg else sdxl_to_sgm(m, layers_per_block)

    out = {}
    for m in sorted(downs):
        k = "lora_unet_" + name(m).replace(".", "_")
        out[f"{k}.lora_down.weight"] = downs[m].contiguous()
        out[f"{k}.lora_up.weight"] = ups[m].contiguous()
        out[f"{k}.alpha"] = torch.tensor(alphas[m], dtype=torch.float32)
    rank = max(v.shape[0] for v in downs.values())
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank),
            "ss_network_alpha": str(max(set(alphas.values()), key=list(alphas.values()).count)),
            "ss_base_model_version": VERSIONS.get(family) or ("sdxl_base_v1-0" if sdxl else "sd_v1"),
            "ss_v2": str(family == "sd21"),
            "ss_v_parameterization": str(facts is not None and facts.prediction_type == "v_prediction")}
    if facts is not None:
        meta[lora.FACTS_KEY] = facts.to_header()
        for key, src in (("ss_resolution", "resolution"), ("ss_max_train_steps", "steps_trained"), ("ss_sd_model_name", "base")):
            if getattr(facts, src) is not None:
                meta[key] = str(getattr(facts, src))
    convs = [m for m, v in downs.items() if v.ndim == 4]
    if convs:
        meta["ss_network_args"] = json.dumps({"conv_dim": str(max(downs[m].shape[0] for m in convs))})
    out.update(te_out)
    return atomic.write_safetensors(out, Path(out_file), meta)
