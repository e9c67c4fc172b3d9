"""Resumable training checkpoints: safetensors + JSON only, written atomically, kept as one line of history.

A checkpoint folder `checkpoint-<step>/` holds
  lora.safetensors       peft LoRA weights of the UNet (model.safetensors for recipes/pretrain_ldm.py)
  optimizer.safetensors  optimizer state tensors, keyed "<param index>.<name>"
  state.json             step, write time, optimizer param_groups, LR-scheduler state, the run record, anything
                         else the recipe adds
  pytorch_lora_weights.safetensors
                         the LoRA recipe's adapter as of this step, in the adapter's own format: `adapt sample`,
                         `adapt eval`, `adapt export` and plain diffusers load a checkpoint as they load the final
                         adapter (to pick a step, as sd-scripts' per-epoch files are used). Resume does not read it.
The recipe derives data order, noise and timesteps from (seed, step, rank), so no RNG state is stored
and nothing is unpickled on resume. Writes go to `.checkpoint-<step>.<pid>.tmp`, are fsynced and renamed into
place; any failure (safetensors' own `SafetensorError` on a full disk included) removes the temporary folder and
raises `CheckpointError` naming the previous intact checkpoint.

History: `latest` is the newest *intact* checkpoint by write time (a damaged one is skipped with a warning);
pruning keeps the newest by write time; resuming from an older checkpoint moves the newer ones aside into
`abandoned/`, so the next `latest` cannot continue the abandoned branch.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import torch

from adapt.atomic import fsync_dir
from adapt.runguard import alive

PATTERN = re.compile(r"^checkpoint-(\d+)$")
WEIGHTS = "lora"  # the LoRA recipe's weights file; recipes/pretrain_ldm.py stores whole models as "model"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the previous one is intact."""


def _written(p: Path) -> tuple[int, int]:
    """Sort key: write time (ns) recorded in state.json, then step; folders from before the field sort by step."""
    step = int(PATTERN.match(p.name).group(1))
    try:
        return json.loads((p / "state.json").read_text()).get("written_ns", 0), step
    except (OSError, ValueError):
        return 0, step


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Checkpoint folders with a state.json in `out_dir`, oldest written first (not checked for damage)."""
    d = Path(out_dir)
    if not d.is_dir():
        return []
    found = [p for p in d.iterdir() if PATTERN.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=_written)


def damage(path: Path, weights: str = WEIGHTS) -> str | None:
    """Why a checkpoint folder cannot be resumed from (None when it is intact)."""
    from safetensors import safe_open
    files = (f"{weights}.safetensors", "optimizer.safetensors", "state.json")
    for f in files:
        if not (path / f).is_file():
            return f"{f} is missing"
    try:
        state = json.loads((path / "state.json").read_text())
        int(state["step"]), state["optimizer"]["param_groups"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"state.json is unreadable ({type(e).__name__}: {e})"
    for f in files[:2]:
        try:
            with safe_open(str(path / f), "pt") as h:
                for k in h.keys():
                    h.get_slice(k)
        except Exception as e:  # SafetensorError on truncated or garbage files
            return f"{f} is unreadable ({type(e).__name__}: {e})"
    return None


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


def save(out_dir: str | Path, step: int, lora_state: dict, optimizer, state: dict, total_limit: int | None = None,
         weights: str = WEIGHTS, adapter=None) -> Path:
    """Write checkpoint-<step> atomically (`lora_state` into <weights>.safetensors; `adapter(folder)`, when given,
    writes the adapter file into it too); prune to the newest `total_limit` by write time."""
    from safetensors.torch import save_file
    out = Path(out_dir)
    final = out / f"checkpoint-{step}"
    tmp = out / f".checkpoint-{step}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in lora_state.items()}, str(tmp / f"{weights}.safetensors"))
        opt_t, opt_meta = optimizer_tensors(optimizer)
        save_file(opt_t, str(tmp / "optimizer.safetensors"))
        (tmp / "state.json").write_text(json.dumps({**state, "step": step, "written_ns": time.time_ns(),
                                                    "optimizer": opt_meta}, indent=1))
        if adapter is not None:
            adapter(tmp)
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        fsync_dir(out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        prev = [p for p in list_checkpoints(out) if p != final]
        reason = "no space left on the device" if "No space left" in str(e) or getattr(e, "errno", None) == 28 else \
            f"{type(e).__name__}: {e}"
        raise CheckpointError(f"could not write checkpoint at step {step} in {out}: {reason}. "
                              f"Previous checkpoint intact: {prev[-1] if prev else 'none'}") from e
    if total_limit is not None:
        for old in list_checkpoints(out)[:-total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load(path: str | Path, weights: str = WEIGHTS) -> tuple[dict, dict, dict]:
    """(weights' tensors, optimizer_tensors, state) of a checkpoint folder."""
    from safetensors.torch import load_file
    p = Path(path)
    for bad in ("optimizer.bin", "random_states_0.pkl", "pytorch_model.bin"):
        if (p / bad).exists() and not (p / "optimizer.safetensors").exists():
            raise CheckpointError(f"{p}: pickle-based checkpoint ({bad}); adapt resumes only from its safetensors checkpoints")
    why = damage(p, weights)
    if why:
        raise CheckpointError(f"{p} cannot be resumed from: {why}")
    return (load_file(str(p / f"{weights}.safetensors")), load_file(str(p / "optimizer.safetensors")),
            json.loads((p / "state.json").read_text()))


def resolve(out_dir: str | Path, resume: str | None, log=print) -> Path | None:
    """'latest' -> newest intact checkpoint in out_dir (damaged ones are named and skipped); a path -> that folder.

    'latest' with no checkpoint at all is an error: a resume that silently starts over would overwrite nothing
    but still surprise; drop the key to start a new run.
    """
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(out_dir)
        for p in reversed(found):
            why = damage(p)
            if why is None:
                return p
            log(f"warning: skipping damaged checkpoint {p}: {why}")
        raise CheckpointError(f"train.resume_from_checkpoint=latest: no intact checkpoint in {out_dir} "
                              f"({len(found)} damaged); drop the key to start a new run")
    p = Path(resume)
    if not p.is_dir():
        raise CheckpointError(f"train.resume_from_checkpoint={resume!r}: no such checkpoint folder")
    why = damage(p)
    if why:
        raise CheckpointError(f"train.resume_from_checkpoint={resume!r} cannot be resumed from: {why}")
    return p


def abandon_newer(out_dir: str | Path, resume: Path, log=print) -> list[Path]:
    """Move checkpoints written after `resume` into out_dir/abandoned/, so `latest` continues this branch."""
    out = Path(out_dir)
    key = _written(resume)
    newer = [p for p in list_checkpoints(out) if p.resolve() != resume.resolve() and _written(p) > key]
    newer += [p for p in out.iterdir() if PATTERN.match(p.name) and not (p / "state.json").is_file()]  # half-dead ones
    moved = []
    if newer:
        dest = out / "abandoned" / time.strftime("%Y%m%d-%H%M%S")
        dest.mkdir(parents=True, exist_ok=True)
        for p in newer:
            shutil.move(str(p), dest / p.name)
            moved.append(dest / p.name)
        log(f"resuming from {resume.name}: moved the {len(moved)} checkpoint(s) written after it into {dest} "
            f"({', '.join(p.name for p in newer)}), so 'latest' now follows this run")
    return moved


def remove_stale_tmp(out_dir: str | Path) -> int:
    """Remove temporary folders left by a killed writer (only those whose pid is gone)."""
    n = 0
    for p in Path(out_dir).glob(".checkpoint-*.tmp"):
        m = re.match(r"^\.checkpoint-\d+\.(\d+)\.tmp$", p.name)
        if m is None or not alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)
            n += 1
    return n
