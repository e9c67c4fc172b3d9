"""Latent and prompt-embedding caches, and the latent statistics check.

The VAE encoder is deterministic up to the posterior sample, so caching the posterior's mean and
std and sampling z = mean + std·n each step is exactly what re-encoding every step would give
(the reference trainers do the latter). A horizontal flip is cached as a second set of latents,
so flip augmentation stays exact. Prompt embeddings are computed once per unique caption.

Cache files are safetensors keyed by a hash of (model, data fingerprint, transform settings),
written to a temporary file and renamed, so an interrupted write never leaves a bad cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from adapt import atomic

log = logging.getLogger("adapt.cache")


class LatentError(ValueError):
    """Latents are NaN/inf or otherwise unusable; the message says what to change."""


def cache_key(**parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def module_fingerprint(module: torch.nn.Module) -> str:
    """Cheap weights fingerprint: names, shapes and the first 256 values of every tensor (not the whole model)."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.detach().flatten()[:256].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def load_or_compute(path: Path | None, compute, log=print) -> dict[str, torch.Tensor]:
    """Read `path` if it exists, else run `compute()` and write it atomically. `path=None` disables caching.

    A cache file that cannot be read (truncated, garbage) is recomputed and replaced, with a warning.
    """
    if path is not None and path.is_file():
        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error type on damaged files
            log(f"warning: latent cache {path} is unreadable ({type(e).__name__}: {e}); recomputing it")
    tensors = compute()
    if path is not None:
        atomic.write_safetensors({k: v.contiguous() for k, v in tensors.items()}, path)
        return load_file(str(path))  # train on exactly what later runs will read back
    return tensors


@torch.no_grad()
@torch.inference_mode()
def encode_posteriors(vae, pixels: torch.Tensor, batch_size: int | None = None, flip: bool = False) -> dict[str, torch.Tensor]:
    """VAE posterior mean and std of pixels (N, 3, H, W) in [-1, 1] -> each (N, C, H/f, W/f), fp32.

    Under inference mode (the VAE is frozen; without it autograd kept every activation of a batch: SDXL's
    VAE at 1024 px peaked at 31 GB on an H100), in batches of at most 2^20 pixels (4 at 512 px, 1 at 1024): at
    2^22 the encoder's full-resolution activations made caching, not training, the run's peak (SD 1.5 at 512 px
    on an H200: 8.3 GB allocated against 5.2 GB for the training steps), while a GPU encodes >40 images/s either way.
    Raises LatentError naming the images whose latents are NaN/inf (an fp16 VAE overflow, typically).
    """
    batch_size = batch_size or max(1, min(16, 2**20 // (pixels.shape[-1] * pixels.shape[-2])))
    dev, dtype = vae.device, vae.dtype
    means, stds = [], []
    for i in range(0, len(pixels), batch_size):
        x = pixels[i:i + batch_size]
        if flip:
            x = x.flip(-1)
        d = vae.encode(x.to(dev, dtype)).latent_dist
        means.append(d.mean.float().cpu())
        stds.append(d.std.float().cpu())
    mean, std = torch.cat(means), torch.cat(stds)
    bad = (~torch.isfinite(mean)).flatten(1).any(1) | (~torch.isfinite(std)).flatten(1).any(1)
    if bad.any():
        idx = bad.nonzero().flatten().tolist()
        raise LatentError(
            f"VAE produced NaN/inf latents for {len(idx)} of {len(pixels)} images (indices {idx[:10]}) with VAE dtype {dtype}. "
            "fp16 VAEs of SD1.x/SDXL overflow: run the VAE in fp32 (model.dtype=float32) or use an fp16-fixed VAE "
            "(model.vae=madebyollin/sdxl-vae-fp16-fix for SDXL).")
    return {"mean": mean, "std": std}


def encode_entries(vae, pixels: list[torch.Tensor], flip: bool = False, log=None) -> dict[str, list[torch.Tensor]]:
    """Posterior mean and std per entry of a bucketed set: pixels are (3, H, W) of several sizes. Entries of one
    size are encoded together (batches as in `encode_posteriors`), so a bucket costs what a square set would."""
    by_size: dict[tuple, list[int]] = {}
    for j, x in enumerate(pixels):
        by_size.setdefault(tuple(x.shape), []).append(j)
    mean: list = [None] * len(pixels)
    std: list = [None] * len(pixels)
    for k, (shape, idx) in enumerate(sorted(by_size.items())):
        t0 = time.time()
        post = encode_posteriors(vae, torch.stack([pixels[j] for j in idx]), flip=flip)
        for n, j in enumerate(idx):
            mean[j], std[j] = post["mean"][n], post["std"][n]
        if log and len(by_size) > 1:
            log(f"  encoded bucket {shape[2]}x{shape[1]}{' (flipped)' if flip else ''}: {len(idx)} crops in {time.time() - t0:.1f}s "
                f"({k + 1}/{len(by_size)})")
    return {"mean": mean, "std": std}


def pack(post: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
    """{name: [entry tensors]} -> flat safetensors keys 'name.j' (entries may differ in shape)."""
    return {f"{k}.{j}": t.contiguous() for k, ts in post.items() for j, t in enumerate(ts)}


def unpack(flat: dict[str, torch.Tensor]) -> dict[str, list[torch.Tensor]]:
    out: dict[str, dict[int, torch.Tensor]] = {}
    for key, t in flat.items():
        name, j = key.rsplit(".", 1)
        out.setdefault(name, {})[int(j)] = t
    return {k: [v[j] for j in range(len(v))] for k, v in out.items()}


def scaled(z: torch.Tensor, scaling_factor: float, shift_factor: float = 0.0) -> torch.Tensor:
    """(z − shift)·scale: the unit-variance latent the UNet was trained on (LDM, Rombach et al. 2022, sec. 3)."""
    return (z - shift_factor) * scaling_factor


def sample_latents(post: dict, idx: torch.Tensor, scaling_factor: float, shift_factor: float,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Scaled posterior samples for rows `idx`: (B, C, h, w)."""
    mean, std = post["mean"][idx], post["std"][idx]
    z = mean + std * torch.randn(mean.shape, generator=generator)
    return scaled(z, scaling_factor, shift_factor)


@torch.no_grad()
def latent_stats(post: dict, scaling_factor: float, shift_factor: float = 0.0, seed: int = 0) -> dict:
    """Per-channel mean/std of scaled posterior samples over every entry, and the overall std (should be ≈ 1)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.cat([scaled(m + s * torch.randn(m.shape, generator=g), scaling_factor, shift_factor).flatten(1)
                   for m, s in zip(post["mean"], post["std"])], 1)  # entries may differ in shape: (C, all latent pixels)
    return {"channel_mean": z.mean(1).tolist(), "channel_std": z.std(1).tolist(),
            "overall_std": float(z.std()), "overall_mean": float(z.mean()), "num_images": len(post["mean"])}


def check_stats(stats: dict, low: float = 0.8, high: float = 1.25) -> str | None:
    """A warning when Var[z0] is far from 1: the forward process keeps unit variance only if Var[z0] = 1."""
    s = stats["overall_std"]
    if not low <= s <= high:
        return (f"scaled latent std on this data is {s:.3f}, outside [{low}, {high}]: the forward process "
                f"Var[z_t] = ᾱ_t·Var[z0] + 1 − ᾱ_t is then not unit-variance, so the noise level at a given t "
                f"differs from what the base was trained for. Check the VAE's scaling_factor for this domain.")
    return None


@torch.no_grad()
def encode_prompts(pipe, captions: list[str], device="cpu") -> dict[str, torch.Tensor]:
    """Embeddings of each unique caption: {'emb': (U, L, D), 'pooled': (U, P) for SDXL, 'index': (N,)}."""
    uniq = sorted(set(captions))
    row = {c: i for i, c in enumerate(uniq)}
    index = torch.tensor([row[c] for c in captions])
    if getattr(pipe, "text_encoder_2", None) is not None:
        emb, _, pooled, _ = pipe.encode_prompt(uniq, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False)
        return {"emb": emb.float().cpu(), "pooled": pooled.float().cpu(), "index": index}
    emb, _ = pipe.encode_prompt(uniq, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False)
    return {"emb": emb.float().cpu(), "index": index}


def count_truncated(tokenizer, captions: list[str]) -> list[int]:
    """Indices of captions longer than the tokenizer's limit (they are truncated, as in every SD trainer)."""
    limit = tokenizer.model_max_length
    lengths = [len(ids) for ids in tokenizer(captions, truncation=False).input_ids]
    return [i for i, n in enumerate(lengths) if n > limit]
