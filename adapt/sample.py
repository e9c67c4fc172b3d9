"""txt2img and img2img with adapters, strength, scale and fixed seeds, on diffusers pipelines.

img2img at strength s is SDEdit (Meng et al. 2022): noise the source latent to the first
timestep of the last int(steps·s) inference steps and denoise from there. Each image gets its
own generator seeded `seed + index`, so results do not depend on batch size.
"""

from __future__ import annotations

import math
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
    # Built from the shared modules directly, as from_pipe does but without its final .to(dtype): that casts every
    # parameter to float32 unless given a dtype (huggingface/diffusers#12754), and to any one dtype would also cast
    # the LoRA weights the recipe keeps in fp32 beside a bf16/fp16 UNet. Config values the class takes carry over.
    import inspect
    params = inspect.signature(cls.__init__).parameters
    comps = pipe.components
    kw = {k: comps.get(k) for k in params if k != "self" and (k in comps or params[k].default is inspect.Parameter.empty)}
    kw.update({k: pipe.config[k] for k in params if k not in kw and k in pipe.config})
    out = cls(**kw)
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


def budget_size(width: int, height: int, budget: int, multiple: int) -> tuple[int, int]:
    """(W, H), sides multiples of `multiple` (the VAE factor), with at most budget² pixels and the aspect nearest
    the image's among sizes that use at least 80% of the budget (rounding each side down on its own can miss the
    aspect by 10% at small budgets: 3:4 at 64² px would become 48x72 instead of 56x72)."""
    a, area = width / height, budget * budget
    cands = []
    for w in range(multiple, min(area // multiple, int(2 * budget * math.sqrt(a))) + multiple, multiple):
        cap = area // w // multiple * multiple  # the tallest height within the budget
        low = max(multiple, math.ceil(0.8 * area / w / multiple) * multiple)  # the shortest using 80% of the budget
        near = {math.floor(w / a / multiple) * multiple, math.ceil(w / a / multiple) * multiple}
        for h in near | set(range(low, cap + 1, multiple)):
            if multiple <= h <= cap:
                cands.append((w, h))
    big = [c for c in cands if c[0] * c[1] >= 0.8 * area] or [max(cands, key=lambda c: c[0] * c[1])]
    return min(big, key=lambda c: (abs(math.log(c[0] / c[1] / a)), -c[0] * c[1]))


def fit_budget(img, budget: int, multiple: int) -> Image.Image:
    """Open a path or take a PIL image; RGB, resized (bicubic, no crop) to `budget_size`: img2img then keeps the
    input's shape (a portrait stays a portrait) at the pixel count the model was trained for."""
    img = to_pil(img)
    size = budget_size(*img.size, budget, multiple)
    return img if img.size == size else img.resize(size, Image.BICUBIC)


@torch.no_grad()
def img2img(pipe, images: list, prompts: list[str] | str, strength: float, steps: int = 50, guidance: float = 7.5,
            seed: int = 0, scheduler: str | None = "ddim", negative_prompt: str | None = None, batch_size: int = 8,
            mask: torch.Tensor | None = None, paste_blur: float | None = None, blend: bool = True,
            on_batch=None) -> list[Image.Image]:
    """img2img on each image with its own seeded generator; returns PIL images.

    Images run at their own size (`fit_budget` them first); images of one size are batched together.
    mask: latent edit masks, (1, h, w) per image (a list, or an (N, 1, h, w) tensor) in [0, 1]
    (adapt.masking): outside them every step keeps the noised source (latent blending; `blend=False`
    skips it), and with `paste_blur` (pixels, >= 0) the decoded output is pasted onto the input through
    the feathered mask, so outside it the output is the input.
    on_batch(indices, images): called as each batch is done (final images), e.g. to write them before the rest run.
    """
    from adapt import masking
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    if mask is not None and len(mask) != len(images):
        raise ValueError(f"mask: {len(mask)} masks for {len(images)} images")
    p = _variant(pipe, "img2img")
    if scheduler:
        p.scheduler = make_scheduler(pipe.scheduler, scheduler)
    prompts = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
    gens = generators(seed, len(images))
    out: list = [None] * len(images)
    for idx in _same_size_batches(images, batch_size):
        batch = [images[i] for i in idx]
        extra = {}
        if mask is not None and blend:
            extra = {"callback_on_step_end": masking.Blend(p, batch, torch.stack([mask[i] for i in idx]), [seed + i for i in idx]),
                     "callback_on_step_end_tensor_inputs": ["latents"]}
        w, h = batch[0].size
        res = p(prompt=[prompts[i] for i in idx], image=batch, strength=strength, height=h, width=w,
                num_inference_steps=steps, guidance_scale=guidance, generator=[gens[i] for i in idx],
                negative_prompt=[negative_prompt] * len(batch) if negative_prompt else None, **extra).images
        if mask is not None and paste_blur is not None:
            res = [masking.paste([o], [images[i]], masking.pixel_mask(mask[i][None], o.size[::-1], paste_blur))[0]
                   for i, o in zip(idx, res)]
        for i, img in zip(idx, res):
            out[i] = img
        if on_batch is not None:
            on_batch(idx, res)
    return out


def _same_size_batches(images: list[Image.Image], batch_size: int) -> list[list[int]]:
    """Indices in batches of at most `batch_size` images of one size (a diffusers pipeline resizes a batch to
    its first image's size), in order of first appearance."""
    by_size: dict = {}
    for i, img in enumerate(images):
        by_size.setdefault(img.size, []).append(i)
    return [idx[k:k + batch_size] for idx in by_size.values() for k in range(0, len(idx), batch_size)]


@torch.no_grad()
def txt2img(pipe, prompts: list[str] | str, n: int = 1, steps: int = 50, guidance: float = 7.5, seed: int = 0,
            scheduler: str | None = "ddim", size: int | None = None, batch_size: int = 8, on_batch=None) -> list[Image.Image]:
    """txt2img for each prompt (or `n` copies of one prompt), one seeded generator per image; `on_batch` as img2img's."""
    p = _variant(pipe, "txt2img")
    if scheduler:
        p.scheduler = make_scheduler(pipe.scheduler, scheduler)
    prompts = [prompts] * n if isinstance(prompts, str) else list(prompts)
    gens = generators(seed, len(prompts))
    out = []
    for i in range(0, len(prompts), batch_size):
        res = p(prompt=prompts[i:i + batch_size], num_inference_steps=steps, guidance_scale=guidance,
                generator=gens[i:i + batch_size], height=size, width=size).images
        out += res
        if on_batch is not None:
            on_batch(list(range(i, i + len(res))), res)
    return out


def grid(rows: list[list[Image.Image]], labels: list[str] | None = None, pad: int = 2) -> Image.Image:
    """Paste rows of images into one image on white. Cells are as large as the largest image; a smaller or
    differently shaped image is centred in its cell at its own size (padded, never squashed)."""
    w = max(img.size[0] for row in rows for img in row)
    h = max(img.size[1] for row in rows for img in row)
    ncol = max(len(r) for r in rows)
    g = Image.new("RGB", (ncol * (w + pad) + pad, len(rows) * (h + pad) + pad), "white")
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            iw, ih = img.size
            g.paste(img.convert("RGB"), (pad + c * (w + pad) + (w - iw) // 2, pad + r * (h + pad) + (h - ih) // 2))
    return g


def save_images(images: list[Image.Image], out: str | Path, stem: str = "sample", infos: list | None = None) -> list[Path]:
    """`<stem>_000.png`, ...; `infos`: one PIL PngInfo per image (adapt.provenance's record) or None."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(images):
        paths.append(out / f"{stem}_{i:03d}.png")
        atomic.write_image(img, paths[-1], infos[i] if infos else None)
    return paths


def to_array(img: Image.Image) -> np.ndarray:
    """(H, W, 3) float32 in [0, 1]."""
    return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
