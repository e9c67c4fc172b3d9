"""Resumable training checkpoints: safetensors + JSON only, written atomically.

A checkpoint folder `checkpoint-<step>/` holds
  lora.safetensors       peft LoRA weights of the UNet
  optimizer.safetensors  optimizer state tensors, keyed "<param index>.<name>"
  state.json             step, optimizer param_groups, LR-scheduler state, anything else the recipe adds
The recipe derives data order, noise and timesteps from (seed, step, rank), so no RNG state is stored
and nothing is unpickled on resume. Writes go to `.checkpoint-<step>.tmp` and are renamed into place;
a crash mid-write leaves the previous checkpoint untouched and the temporary folder is ignored.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

PATTERN = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the previous one is intact."""


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints in `out_dir`, oldest first."""
    d = Path(out_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := PATTERN.match(p.name)) and (p / "state.json").is_file()]
    return [p for _, p in sorted(found)]


def optimizer_tensors(optimizer) -> tuple[dict, dict]:
    """Split an optimizer state_dict into tensors (safetensors) and JSON-able rest."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def restore_optimizer(optimizer, tensors: dict, meta: dict) -> None:
    state: dict = {}
    for key, v in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    for key, v in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def save(out_dir: str | Path, step: int, lora_state: dict, optimizer, state: dict, total_limit: int | None = None,
         writer=save_file, before_rename=None) -> Path:
    """Write checkpoint-<step> atomically; prune to `total_limit`. `writer` and `before_rename` are test seams."""
    out = Path(out_dir)
    final = out / f"checkpoint-{step}"
    tmp = out / f".checkpoint-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        writer({k: v.detach().cpu().contiguous() for k, v in lora_state.items()}, str(tmp / "lora.safetensors"))
        opt_t, opt_meta = optimizer_tensors(optimizer)
        writer(opt_t, str(tmp / "optimizer.safetensors"))
        (tmp / "state.json").write_text(json.dumps({**state, "step": step, "optimizer": opt_meta}, indent=1))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if before_rename is not None:
            before_rename(tmp)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        _fsync_dir(out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        prev = list_checkpoints(out)
        raise CheckpointError(f"could not write checkpoint at step {step} in {out}: {e}. "
                              f"Previous checkpoint intact: {prev[-1] if prev else 'none'}") from e
    if total_limit is not None:
        for old in list_checkpoints(out)[:-total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load(path: str | Path) -> tuple[dict, dict, dict]:
    """(lora_state, optimizer_tensors, state) of a checkpoint folder."""
    p = Path(path)
    if not (p / "state.json").is_file():
        raise CheckpointError(f"{p} is not a complete checkpoint (no state.json)")
    for bad in ("optimizer.bin", "random_states_0.pkl", "pytorch_model.bin"):
        if (p / bad).exists() and not (p / "optimizer.safetensors").exists():
            raise CheckpointError(f"{p}: pickle-based checkpoint ({bad}); adapt resumes only from its safetensors checkpoints")
    return load_file(str(p / "lora.safetensors")), load_file(str(p / "optimizer.safetensors")), json.loads((p / "state.json").read_text())


def resolve(out_dir: str | Path, resume: str | None) -> Path | None:
    """'latest' -> newest complete checkpoint in out_dir (None if there is none); a path -> that folder."""
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(out_dir)
        return found[-1] if found else None
    p = Path(resume)
    if not (p / "state.json").is_file():
        raise CheckpointError(f"resume_from_checkpoint={resume!r}: not a complete checkpoint folder")
    return p
