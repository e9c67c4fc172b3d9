"""`adapt export`: convert adapters between adapt's diffusers format and the kohya / WebUI / ComfyUI format.

    adapt export runs/demo --format kohya [--out kohya.safetensors]   (+ kohya_vae.safetensors when it ships vae/)
    adapt export downloaded_lora.safetensors --format diffusers [--base <base it was trained on>] [--out folder]
    adapt export peft_save_pretrained_folder --format diffusers|kohya

The formats themselves live in `adapt.kohya`.
"""

from __future__ import annotations

from pathlib import Path

from adapt import lora
from adapt.kohya import from_kohya, to_kohya  # noqa: F401  (the API this command wraps)


def add_parser(sub):
    p = sub.add_parser("export", help="convert an adapter: --format kohya (WebUI/ComfyUI) or diffusers (import kohya)")
    p.add_argument("adapter", help="adapter folder, .safetensors file or hub id (org/name[@revision])")
    p.add_argument("--format", choices=["kohya", "diffusers"], required=True)
    p.add_argument("--out", default=None, help="output file (kohya) or folder (diffusers); never one of the inputs")
    p.add_argument("--architecture", choices=["auto", "sd15", "sd21", "sdxl"], default=None,
                   help="kohya import: the published family the file was trained on (default auto: from its tensor "
                        "shapes, names and ss_* metadata)")
    p.add_argument("--base", default=None, help="kohya import: the base model it was trained on (needed for bases "
                   "outside the published SD 1.x / 2.x / XL families); its UNet config decides the layer names")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.set_defaults(func=cmd_export)


def cmd_export(a) -> int:
    src = Path(lora.locate(a.adapter))
    if a.out is None and str(src) != str(a.adapter):  # beside it would be inside the hub cache
        raise lora.AdapterError(f"{a.adapter}: a hub adapter; give --out (the default writes beside the input)")
    if a.format == "kohya" and (a.architecture is not None or a.base is not None):
        flags = " and ".join(f for f, v in (("--architecture", a.architecture), ("--base", a.base)) if v is not None)
        raise lora.AdapterError(f"{flags}: settings of the kohya import (--format diffusers); an export to kohya keys "
                                "takes the layer names from the adapter itself")
    if a.format == "kohya":
        out = Path(a.out) if a.out else (src if src.is_dir() else src.parent) / "kohya_lora.safetensors"
        target = out
    else:
        out = Path(a.out) if a.out else src.with_name(src.stem + "_diffusers")
        target = out / lora.WEIGHTS_NAME
    inputs = {lora.weights_path(src).resolve()} | ({src.resolve()} if src.exists() else set())
    if target.resolve() in inputs or out.resolve() in inputs:
        raise lora.AdapterError(f"--out {out} is the input {src}; adapt never overwrites an input, choose another path")
    from adapt import decoder
    vae = decoder.find(src) if a.format == "kohya" else None
    # A LoRA file holds the UNet only; the decoder tuned on the domain goes beside it as WebUI/ComfyUI's VAE file.
    vae_out = out.with_name(out.stem + "_vae.safetensors") if vae is not None else None
    for t in (target, vae_out):
        if t is not None and t.exists() and not a.overwrite:
            raise lora.AdapterError(f"{t} exists; pass --overwrite to replace it")
    if a.format == "kohya":
        path = to_kohya(src, out)
        print(f"wrote {path}")
        if vae is not None:
            decoder.to_single_file(vae, vae_out)
            print(f"wrote {vae_out}: the VAE decoder tuned on the domain ({vae}), original layout; the adapter was "
                  "evaluated with it: select it as the VAE (WebUI models/VAE, ComfyUI models/vae), as with vae-ft-mse")
        return 0
    from adapt import peftfile
    if peftfile.is_peft(lora._keys(lora.weights_path(src))):  # PeftModel.save_pretrained's folder
        print(f"wrote {peftfile.to_diffusers(src, target)} (from peft's save_pretrained layout)")
        return 0
    base_cfg = None
    if a.base:
        from adapt import model
        base_cfg = model.unet_config(a.base)
    print(f"wrote {from_kohya(src, out, a.architecture or 'auto', base_cfg)}")
    return 0
