"""txt2img and img2img with adapters, strength, scale and fixed seeds, on diffusers pipelines.

img2img at strength s is SDEdit (Meng et al. 2022): noise the source latent to the first
timestep of the last int(steps·s) inference steps and denoise from there. Each image gets its
own generator seeded `seed + index`, so results do not depend on batch size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from adapt import atomic

SCHEDULERS = {
    "ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "euler": "EulerDiscreteScheduler",
    "pndm": "PNDMScheduler", "dpm": "DPMSolverMultistepScheduler",
}


def make_scheduler(base_scheduler, name: str):
    """Scheduler `name` configured from the base model's scheduler config (betas, prediction type)."""
    import diffusers
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose from {sorted(SCHEDULERS)}")
    return getattr(diffusers, SCHEDULERS[name]).from_config(base_scheduler.config)


def _variant(pipe, kind: str):
    """The txt2img or img2img pipeline sharing `pipe`'s modules (no copies)."""
    from diffusers import (StableDiffusionImg2ImgPipeline, StableDiffusionPipeline, StableDiffusionXLImg2ImgPipeline,
                           StableDiffusionXLPipeline)
    xl = getattr(pipe, "text_encoder_2", None) is not None
    cls = {("sd", "txt2img"): StableDiffusionPipeline, ("sd", "img2img"): StableDiffusionImg2ImgPipeline,
           ("sdxl", "txt2img"): StableDiffusionXLPipeline, ("sdxl", "img2img"): StableDiffusionXLImg2ImgPipeline}[("sdxl" if xl else "sd", kind)]
    if isinstance(pipe, cls):
        return pipe
    out = cls.from_pipe(pipe) if hasattr(cls, "from_pipe") else cls(**pipe.components)
    out.set_progress_bar_config(disable=True)
    return out


def generators(seed: int, n: int, device="cpu") -> list[torch.Generator]:
    return [torch.Generator(device).manual_seed(seed + i) for i in range(n)]


def to_pil(img, size: int | None = None) -> Image.Image:
    """Open a path or take a PIL image; RGB; optionally resized (short side) and center-cropped to `size`."""
    if not isinstance(img, Image.Image):
        from adapt.data import open_image
        img = open_image(img)
    img = img.convert("RGB")
    if size is not None and img.size != (size, size):
        w, h = img.size
        s = size / min(w, h)
        img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
        w, h = img.size
        left, top = (w - size) // 2, (h - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return img


@torch.no_grad()
def img2img(pipe, images: list, prompts: list[str] | str, strength: float, steps: int = 50, guidance: float = 7.5,
            seed: int = 0, scheduler: str | None = "ddim", negative_prompt: str | None = None, batch_size: int = 8,
            mask: torch.Tensor | None = None, paste_blur: float | None = None, blend: bool = True) -> list[Image.Image]:
    """img2img on each image with its own seeded generator; returns PIL images.

    mask: latent edit masks (N, 1, h, w) in [0, 1] (adapt.masking): outside them every step keeps the
    noised source (latent blending; `blend=False` skips it), and with `paste_blur` (pixels, >= 0) the
    decoded output is pasted onto the input through the feathered mask, so outside it the output is the input.
    """
    from adapt import masking
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    if mask is not None and mask.shape[0] != len(images):
        raise ValueError(f"mask: {mask.shape[0]} masks for {len(images)} images")
    p = _variant(pipe, "img2img")
    if scheduler:
        p.scheduler = make_scheduler(pipe.scheduler, scheduler)
    prompts = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
    gens = generators(seed, len(images))
    out = []
    for i in range(0, len(images), batch_size):
        batch = images[i:i + batch_size]
        extra = {}
        if mask is not None and blend:
            extra = {"callback_on_step_end": masking.Blend(p, batch, mask[i:i + batch_size], seed + i),
                     "callback_on_step_end_tensor_inputs": ["latents"]}
        out += p(prompt=prompts[i:i + batch_size], image=batch, strength=strength,
                 num_inference_steps=steps, guidance_scale=guidance, generator=gens[i:i + batch_size],
                 negative_prompt=[negative_prompt] * len(batch) if negative_prompt else None, **extra).images
    if mask is not None and paste_blur is not None:
        out = masking.paste(out, images, masking.pixel_mask(mask, out[0].size[::-1], paste_blur))
    return out


@torch.no_grad()
def txt2img(pipe, prompts: list[str] | str, n: int = 1, steps: int = 50, guidance: float = 7.5, seed: int = 0,
            scheduler: str | None = "ddim", size: int | None = None, batch_size: int = 8) -> list[Image.Image]:
    """txt2img for each prompt (or `n` copies of one prompt), one seeded generator per image."""
    p = _variant(pipe, "txt2img")
    if scheduler:
        p.scheduler = make_scheduler(pipe.scheduler, scheduler)
    prompts = [prompts] * n if isinstance(prompts, str) else list(prompts)
    gens = generators(seed, len(prompts))
    out = []
    for i in range(0, len(prompts), batch_size):
        out += p(prompt=prompts[i:i + batch_size], num_inference_steps=steps, guidance_scale=guidance,
                 generator=gens[i:i + batch_size], height=size, width=size).images
    return out


def grid(rows: list[list[Image.Image]], labels: list[str] | None = None, pad: int = 2) -> Image.Image:
    """Paste rows of equally sized images into one image (white padding)."""
    w, h = rows[0][0].size
    ncol = max(len(r) for r in rows)
    g = Image.new("RGB", (ncol * (w + pad) + pad, len(rows) * (h + pad) + pad), "white")
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            g.paste(img.resize((w, h)), (pad + c * (w + pad), pad + r * (h + pad)))
    return g


def save_images(images: list[Image.Image], out: str | Path, stem: str = "sample") -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(images):
        paths.append(out / f"{stem}_{i:03d}.png")
        atomic.write_image(img, paths[-1])
    return paths


def to_array(img: Image.Image) -> np.ndarray:
    """(H, W, 3) float32 in [0, 1]."""
    return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
