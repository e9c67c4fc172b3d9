"""`adapt export`: convert adapters between adapt's diffusers format and the kohya / WebUI / ComfyUI format.

    adapt export runs/demo --format kohya [--out kohya.safetensors]
    adapt export downloaded_lora.safetensors --format diffusers [--base <base it was trained on>] [--out folder]

The formats themselves live in `adapt.kohya`.
"""

from __future__ import annotations

from pathlib import Path

from adapt import lora
from adapt.kohya import from_kohya, to_kohya  # noqa: F401  (the API this command wraps)


def add_parser(sub):
    p = sub.add_parser("export", help="convert an adapter: --format kohya (WebUI/ComfyUI) or diffusers (import kohya)")
    p.add_argument("adapter", help="adapter folder or .safetensors file")
    p.add_argument("--format", choices=["kohya", "diffusers"], required=True)
    p.add_argument("--out", default=None, help="output file (kohya) or folder (diffusers); never one of the inputs")
    p.add_argument("--architecture", choices=["auto", "sd15", "sd21", "sdxl"], default="auto",
                   help="kohya import: the published family the file was trained on (auto: from its tensor shapes, "
                        "names and ss_* metadata)")
    p.add_argument("--base", default=None, help="kohya import: the base model it was trained on (needed for bases "
                   "outside the published SD 1.x / 2.x / XL families); its UNet config decides the layer names")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.set_defaults(func=cmd_export)


def cmd_export(a) -> int:
    src = Path(a.adapter)
    if a.format == "kohya":
        out = Path(a.out) if a.out else (src if src.is_dir() else src.parent) / "kohya_lora.safetensors"
        target = out
    else:
        out = Path(a.out) if a.out else src.with_name(src.stem + "_diffusers")
        target = out / lora.WEIGHTS_NAME
    inputs = {lora.weights_path(src).resolve()} | ({src.resolve()} if src.exists() else set())
    if target.resolve() in inputs or out.resolve() in inputs:
        raise lora.AdapterError(f"--out {out} is the input {src}; adapt never overwrites an input, choose another path")
    if target.exists() and not a.overwrite:
        raise lora.AdapterError(f"{target} exists; pass --overwrite to replace it")
    if a.format == "kohya":
        path = to_kohya(src, out)
        from adapt import decoder
        if (vae := decoder.find(src)) is not None:
            print(f"note: {vae}, the VAE decoder tuned on the domain, is not in the kohya file (a LoRA holds the UNet "
                  "only): it is a diffusers AutoencoderKL folder; WebUI and ComfyUI take a VAE as one file in the "
                  "original layout, which adapt does not write, so there the adapter samples with the base's decoder")
    else:
        base_cfg = None
        if a.base:
            from adapt import model
            base_cfg = model.unet_config(a.base)
        path = from_kohya(src, out, a.architecture, base_cfg)
    print(f"wrote {path}")
    return 0
