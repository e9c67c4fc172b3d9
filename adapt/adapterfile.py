"""Where an adapter's weights file is: a folder or file as given, or a Hugging Face hub id fetched into the hub
cache; pickles are refused. `adapt.lora` re-exports these names (lora.locate, lora.weights_path, ...)."""

from __future__ import annotations

import re
from pathlib import Path

from safetensors import safe_open

from adapt.checkpoint import list_checkpoints

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class AdapterError(ValueError):
    """An adapter cannot be attached, saved or loaded as asked; the message names the cause."""


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(@[\w./-]+)?$")  # org/name or org/name@revision


def locate(adapter: str | Path) -> str:
    """The local adapter `adapter` names: a file or folder as given, or, for a Hugging Face hub id ('org/name',
    'org/name@revision', as `pipe.load_lora_weights("org/name")` takes), its snapshot folder in the hub cache:
    downloaded (its .safetensors, JSON, model card and vae/ only) or, offline, found there. A path whose first folder
    exists here is a local path, never a hub id: a typo in runs/... is named at once, not looked up on the hub."""
    given = str(adapter)
    p = Path(given).expanduser()
    if (p.exists() or not HUB_ID.match(given) or Path(given.split("/")[0]).is_dir()
            or p.suffix in (".safetensors", *PICKLE_SUFFIXES)):
        return given
    repo, _, revision = given.partition("@")
    from huggingface_hub import constants, snapshot_download
    from adapt.model import hub_unreachable
    try:
        return snapshot_download(repo, revision=revision or None, allow_patterns=["*.safetensors", "*.json", "*.md", "vae/*"])
    except Exception as e:
        why = (f"the Hugging Face hub is unreachable (offline={constants.HF_HUB_OFFLINE}) and it is not in the local "
               "cache" if hub_unreachable(e) else f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        raise AdapterError(f"adapter not found: {given!r} is not a local file or folder (no {p.absolute()}), nor a hub "
                           f"adapter ({why})") from None


def hub_id(folder: str | Path) -> str | None:
    """'org/name@commit' for a snapshot folder of the hub cache (.../models--org--name/snapshots/<commit>), else None:
    the portable name of what `locate` fetched."""
    p = Path(folder)
    m = re.fullmatch(r"models--([^/]+?)--(.+)", p.parent.parent.name) if p.parent.name == "snapshots" else None
    return f"{m.group(1)}/{m.group(2)}@{p.name}" if m else None


def weights_path(adapter: str | Path) -> Path:
    """The safetensors file of an adapter given as folder or file; pickles are refused."""
    p = Path(adapter)
    if p.is_dir():
        if (p / WEIGHTS_NAME).is_file():
            return p / WEIGHTS_NAME
        found = sorted(p.glob("*.safetensors"))
        if len(found) == 1:
            return found[0]
        pickles = [q.name for q in p.iterdir() if q.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise AdapterError(f"{p}: only pickle files {pickles}; {refuse_pickle_reason()}")
        ckpts = [c for c in list_checkpoints(p) if (c / WEIGHTS_NAME).is_file()]  # oldest written first
        hint = (f"; a training run without its final adapter yet (still running, or stopped)? Its checkpoints are "
                f"adapters as of their step: {ckpts[-1]}" if ckpts else "")
        raise AdapterError(f"{p}: no {WEIGHTS_NAME} (found {[q.name for q in found] or 'no safetensors'}){hint}")
    if not p.exists():
        raise AdapterError(f"adapter not found: {p}")
    if p.suffix in PICKLE_SUFFIXES:
        raise AdapterError(f"{p}: {refuse_pickle_reason()}")
    if p.suffix != ".safetensors":
        raise AdapterError(f"{p}: unsupported adapter file type {p.suffix!r}; expected .safetensors")
    return p


def weights_sha256(adapter: str | Path) -> str:
    """sha256 of an adapter's weights file: what ties an evaluation report to the adapter it measured."""
    from adapt.provenance import file_sha256
    return file_sha256(weights_path(adapter))


def refuse_pickle_reason() -> str:
    return ("pickle files (.bin/.pt/.ckpt) can execute arbitrary code when loaded, so adapt refuses them. "
            "Convert once in a trusted environment: sd = torch.load(path, weights_only=True); "
            "safetensors.torch.save_file(sd, 'pytorch_lora_weights.safetensors')")


def _keys(path: Path) -> list[str]:
    """The tensor names in a .safetensors file, from its header (no tensor is read)."""
    try:
        with safe_open(str(path), "pt") as f:
            return list(f.keys())
    except Exception as e:
        raise AdapterError(f"{path}: not a readable .safetensors file ({type(e).__name__}: {e})") from e
