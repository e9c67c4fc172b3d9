"""Start a LoRA run from an existing adapter's weights instead of zero (`lora.init_from`; sd-scripts' --network_weights).

The adapter may be anything `adapt sample --adapter` takes: an adapt / diffusers adapter (folder or file), a kohya /
WebUI / ComfyUI `.safetensors`, a folder `PeftModel.save_pretrained` wrote, or a hub id. Each of its UNet layers keeps
its own rank and alpha (peft's rank_pattern / alpha_pattern), so at step 0 the UNet computes exactly what sampling
with that adapter at scale 1 computes; the preset's layers it lacks start at zero with `lora.rank` / `lora.alpha`.

Text-encoder layers (sd-scripts trains them unless --network_train_unet_only) are not trained, but neither dropped:
they are fused into the pipeline's text encoder(s) before the captions are encoded (`fuse_text_encoders`), so the
UNet layers train under the conditioning sampling will give them, and they are written unchanged into every adapter
the run saves (`InitAdapter.te_tensors`), so the result applies as the file did.

Refused, by name: layers outside the preset (the hint names a preset that covers them) and shapes that do not fit
this UNet.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from adapt import atomic, lora

_PEFT_KEY = re.compile(r"(.+)\.lora_([AB])\.weight$")


@dataclass
class InitAdapter:
    """An existing adapter's UNet layers in peft naming, as the run starts from them."""
    source: str  # as the user gave it
    resolved: str  # the file read, or org/name@commit for a hub adapter
    sha256: str  # of the file read: part of what a resumed run must match
    down: dict  # module -> lora_A weight (r, in[, k, k]), fp32
    up: dict  # module -> lora_B weight (out, r[, 1, 1]), fp32
    alphas: dict  # module -> alpha as the adapter applies it
    alpha_assumed: bool  # no peft metadata: alpha = rank, as diffusers' loader applies such a file
    te_tensors: dict  # text-encoder LoRA tensors, diffusers' keys ("text_encoder[_2]..."): frozen, saved unchanged
    te_meta: dict  # their peft metadata ("text_encoder[_2].r", ".lora_alpha", ...), saved with them

    @property
    def ranks(self) -> dict:
        return {m: int(w.shape[0]) for m, w in self.down.items()}

    @property
    def text_encoders(self) -> dict:
        """{'text_encoder': number of LoRA layers, ...} of the layers carried through unchanged."""
        out: dict = {}
        for k in self.te_tensors:
            if k.endswith(("lora_A.weight", "down.weight")):
                out[k.split(".")[0]] = out.get(k.split(".")[0], 0) + 1
        return out

    def to_record(self) -> dict:
        """What the adapter's facts and model card say the run started from."""
        return {"adapter": self.source, "resolved": self.resolved, "sha256": self.sha256, "layers": len(self.down),
                "ranks": sorted(set(self.ranks.values())), "alpha_assumed": self.alpha_assumed,
                "text_encoder_layers_kept": self.text_encoders}


def read(spec: str, unet, preset: str, log=print) -> InitAdapter:
    """Read the adapter `spec` names, as diffusers-format tensors, and check it fits `preset` on this `unet`."""
    from adapt import kohya, peftfile
    local = lora.locate(spec)
    path = lora.weights_path(local)
    resolved = lora.hub_id(local) or str(path)
    keys = lora._keys(path)
    with tempfile.TemporaryDirectory() as tmp:
        if kohya.is_kohya(keys):  # imported against this UNet, as `adapt export --format diffusers --base` does
            tensors, header = lora.read(kohya.from_kohya(path, tmp, base_cfg=dict(unet.config), log=log))
        elif peftfile.is_peft(keys):
            tensors, header = lora.read(peftfile.to_diffusers(path, Path(tmp) / lora.WEIGHTS_NAME))
        else:
            tensors, header = lora.read(path)
    te_tensors = {k: v for k, v in tensors.items() if k.startswith(lora.TEXT_ENCODERS)}
    te_meta = {k: v for k, v in (header.get("lora_adapter_metadata") or {}).items() if k.startswith(lora.TEXT_ENCODERS)}
    lora.check_keys(unet, tensors, path)
    from diffusers.utils import convert_unet_state_dict_to_peft
    peft_sd = convert_unet_state_dict_to_peft({k[len("unet."):]: v for k, v in tensors.items() if k.startswith("unet.")})
    down, up, other = {}, {}, []
    for k, v in peft_sd.items():
        m = _PEFT_KEY.fullmatch(k)
        if m is None:
            other.append(k)
        else:
            (down if m[2] == "A" else up)[m[1]] = v.float()
    if other or set(down) != set(up):
        odd = other + sorted(set(down) ^ set(up))
        raise lora.AdapterError(f"lora.init_from {path}: {len(odd)} keys are not LoRA down/up pairs: {odd[:3]}")
    _check_fits(spec, unet, preset, down, up)
    meta = header.get("lora_adapter_metadata")
    if meta:
        alphas, assumed = kohya.alphas_of(header, sorted(down)), False
    else:  # diffusers' scripts before 0.32 stored no LoraConfig; its loader then applies alpha = rank
        alphas, assumed = {m: float(w.shape[0]) for m, w in down.items()}, True
        log(f"lora.init_from {spec}: no stored alpha; using alpha = rank per layer, as diffusers' loader applies the file")
    f = header[lora.FACTS_KEY]
    if f is not None and f.base_probe and (why := lora.probe_mismatch(unet, f.base_probe)):
        log(f"warning: lora.init_from {spec} was trained against other UNet weights ({f.base}: {why}); it starts this "
            "run from a correction to those weights")
    return InitAdapter(spec, resolved, lora.weights_sha256(local), down, up, alphas, assumed, te_tensors, te_meta)


def _check_fits(spec: str, unet, preset: str, down: dict, up: dict) -> None:
    targets = set(lora.target_modules(unet, preset))
    outside = sorted(set(down) - targets)
    if outside:
        cover = [p for p in lora.PRESETS if set(down) <= set(lora.target_modules(unet, p))]
        hint = f"lora.preset={cover[0]} adapts them" if cover else "no preset adapts all of them"
        raise lora.AdapterError(f"lora.init_from {spec}: {len(outside)} of its {len(down)} layers lie outside preset "
                                f"{preset!r} (e.g. {outside[0]}); {hint}")
    mods = dict(unet.named_modules())
    for m in sorted(down):
        layer = mods[m]
        r = down[m].shape[0]
        if isinstance(layer, torch.nn.Linear):
            want_down, want_up = (r, layer.in_features), (layer.out_features, r)
        else:  # Conv2d: down carries the kernel, up is 1x1 (kohya's LoCon, peft's conv LoRA)
            want_down, want_up = (r, layer.in_channels, *layer.kernel_size), (layer.out_channels, r, 1, 1)
        if tuple(down[m].shape) != want_down or tuple(up[m].shape) != want_up:
            raise lora.AdapterError(f"lora.init_from {spec}: layer {m} has down {tuple(down[m].shape)} / up "
                                    f"{tuple(up[m].shape)}, this UNet needs {want_down} / {want_up} (rank {r}): an "
                                    "adapter for another base")


def fuse_text_encoders(pipe, init: InitAdapter) -> list[str]:
    """Fold the adapter's text-encoder layers into the pipeline's text encoder(s) at scale 1 (diffusers' loader, then
    fuse_lora and unload: the weights keep W + alpha/r · up @ down, no LoRA layer stays). Returns the components."""
    if not init.te_tensors:
        return []
    with tempfile.TemporaryDirectory() as tmp:
        header = {"format": "pt"}
        if init.te_meta:
            header["lora_adapter_metadata"] = json.dumps(init.te_meta)
        f = atomic.write_safetensors({k: v.contiguous() for k, v in init.te_tensors.items()}, Path(tmp) / lora.WEIGHTS_NAME, header)
        try:
            pipe.load_lora_weights(tmp, weight_name=f.name, adapter_name="init_from")
        except (RuntimeError, ValueError, KeyError) as e:  # peft's size mismatch names tensors, not the file
            raise lora.AdapterError(f"lora.init_from {init.source}: its text-encoder layers do not fit this pipeline's "
                                    f"text encoder(s) ({type(e).__name__}: {str(e).splitlines()[0][:300]})") from None
    parts = lora.adapted_text_encoders(pipe, ["init_from"])
    missing = [c for c, n in init.text_encoders.items() if c not in parts]
    if missing:
        raise lora.AdapterError(f"lora.init_from {init.source}: its {', '.join(missing)} LoRA layers load into no layer "
                                "of this pipeline's text encoder(s)")
    pipe.fuse_lora(components=parts, lora_scale=1.0, adapter_names=["init_from"])
    pipe.unload_lora_weights()
    return parts


def patterns(init: InitAdapter, rank: int, alpha: float) -> tuple[dict, dict]:
    """peft rank_pattern / alpha_pattern that give each of the adapter's layers its own rank and alpha (escaped full
    module names: peft matches the keys as regexes)."""
    ranks = {re.escape(m): r for m, r in init.ranks.items() if r != rank}
    alphas = {re.escape(m): a for m, a in init.alphas.items() if a != alpha}
    return ranks, alphas


def load(unet, init: InitAdapter, adapter_name: str = "default") -> int:
    """Copy the adapter's weights into the LoRA layers `lora.attach` made (with `patterns`); returns how many preset
    layers start at zero. Checks that every layer got its weights and its scale."""
    ranks, mods = init.ranks, dict(unet.named_modules())
    with torch.no_grad():
        for m in init.down:
            layer = mods[m]
            layer.lora_A[adapter_name].weight.copy_(init.down[m])
            layer.lora_B[adapter_name].weight.copy_(init.up[m])
            want = init.alphas[m] / ranks[m]
            if abs(layer.scaling[adapter_name] - want) > 1e-6 * max(1.0, want):
                raise lora.AdapterError(f"lora.init_from {init.source}: layer {m} got scale {layer.scaling[adapter_name]}, "
                                        f"the adapter applies alpha/rank = {want}")
    adapted = [n for n, mod in mods.items() if adapter_name in getattr(mod, "lora_A", {})]
    return len(set(adapted) - set(init.down))
