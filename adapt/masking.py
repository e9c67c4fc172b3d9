"""Masked img2img: edit only where the adapter wants to change the image, keep the rest of the source.

1. Where (DiffEdit, Couairon et al. 2022, with the adapter in place of a second prompt): noise the
   source latent z0 to timestep t with a few noise draws and compare the UNet's noise prediction with
   the adapter on and off, both with the target prompt. |ε_adapter − ε_base|, averaged over draws and
   channels, is large where the adapter would draw something new. Normalised per image to [0, 1],
   thresholded, closed and dilated, it is the latent edit mask. A user can give a mask image instead.
2. Latent blending (Avrahami et al. 2023, "Blended Latent Diffusion"): after every denoising step the
   latent outside the mask is replaced by the source noised to the next timestep (one fixed noise per
   image), so the sampler redraws only the masked region, in context.
3. Paste back in pixels: the decoded output is blended with the input through a feathered
   pixel-resolution mask ("mask blur" in inpainting UIs), so outside the mask the output *is* the input,
   better than any VAE round trip can be.

Shapes: images (N, 3, H, W); latent masks (N, 1, h, w) with h = H / vae factor; pixel masks (N, 1, H, W).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from adapt.config import MaskSettings  # the settings, torch-free, shared with the CLI and EvalConfig
from adapt.model import vae_precision


def _encode(pipe, images: list[Image.Image]) -> torch.Tensor:
    """Scaled source latents (N, 4, h, w), posterior mean, in the UNet's dtype."""
    vae = pipe.vae
    with vae_precision(vae):  # an fp16 SDXL VAE encodes in fp32, as diffusers' img2img does
        x = pipe.image_processor.preprocess(images).to(vae.device, vae.dtype)
        z = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
    return z.to(pipe.unet.dtype)


def unet_cond(pipe, prompts: list[str], size: tuple[int, int]) -> dict:
    """UNet conditioning for `prompts` without guidance: encoder states (+ SDXL's pooled text and time ids)."""
    device = pipe.unet.device
    if getattr(pipe, "text_encoder_2", None) is None:
        emb, _ = pipe.encode_prompt(prompts, device, 1, False)
        return {"encoder_hidden_states": emb}
    emb, _, pooled, _ = pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False)
    h, w = size
    ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=emb.dtype, device=device).repeat(len(prompts), 1)  # original, crop, target
    return {"encoder_hidden_states": emb, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids}}


@torch.no_grad()
def auto_mask(pipe, images: list[Image.Image], prompts: list[str], names: list[str], settings: MaskSettings,
              seeds: list[int] | None = None):
    """Latent edit masks in {0, 1}, (1, h, w) per image: where the adapters `names` change the noise prediction.
    Stacked as an (N, 1, h, w) tensor when the images share one size, else a list (images of one size are
    computed together).

    Image i's noise draws come from its own generator, seeded `seeds[i]` (default `settings.seed + i`, the seed
    `sample.img2img` gives image i), so its mask does not depend on the other images of the call: sampled alone
    with its own seed, an image gets the mask, and so the output, it got in a batch."""
    seeds = [settings.seed + i for i in range(len(images))] if seeds is None else list(seeds)
    if len(seeds) != len(images):
        raise ValueError(f"auto_mask: {len(seeds)} seeds for {len(images)} images")
    sizes = {img.size for img in images}
    if len(sizes) > 1:
        out: list = [None] * len(images)
        for size in sizes:
            idx = [i for i, img in enumerate(images) if img.size == size]
            for i, m in zip(idx, auto_mask(pipe, [images[i] for i in idx], [prompts[i] for i in idx], names, settings,
                                           [seeds[i] for i in idx])):
                out[i] = m
        return out
    from diffusers import DDPMScheduler

    from adapt import lora
    if any(getattr(m, "merged", False) for m in pipe.unet.modules() if hasattr(m, "lora_A")):
        raise ValueError("auto_mask: an adapter is fused into the UNet (inside lora.applied(fuse=True)?); compute the "
                         "mask outside that block, so the adapter can be switched off for the base prediction")
    z0 = _encode(pipe, images)
    # the prompt encoded with the adapter on and off when it has text-encoder layers (kohya files) that change it
    with lora.applied(pipe, names, [1.0] * len(names), fuse=False):
        cond_a = unet_cond(pipe, prompts, images[0].size[::-1])
    cond_b = cond_a
    if lora.adapted_text_encoders(pipe, names):
        with lora.applied(pipe, names, [0.0] * len(names)):
            cond_b = unet_cond(pipe, prompts, images[0].size[::-1])
    ddpm = DDPMScheduler.from_config(pipe.scheduler.config)  # the training noise process the UNet knows
    t = torch.full((len(images),), settings.timestep, dtype=torch.long)
    diff = torch.zeros(z0.shape[0], 1, *z0.shape[2:], device=z0.device)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    for _ in range(settings.draws):
        noise = torch.cat([torch.randn((1, *z0.shape[1:]), generator=g) for g in gens]).to(z0)
        zt = ddpm.add_noise(z0, noise, t)
        tt = t.to(z0.device)
        with lora.applied(pipe, names, [1.0] * len(names), fuse=False):
            eps_a = pipe.unet(zt, tt, **cond_a).sample
        with lora.applied(pipe, names, [0.0] * len(names)):
            eps_b = pipe.unet(zt, tt, **cond_b).sample
        diff += (eps_a - eps_b).abs().float().mean(1, keepdim=True)
    lo, hi = diff.amin((2, 3), keepdim=True), diff.amax((2, 3), keepdim=True)
    m = ((diff - lo) / (hi - lo).clamp_min(1e-8) > settings.threshold).float()
    return morph(m, settings.close, settings.dilate).cpu()


def morph(m: torch.Tensor, close: int, dilate: int) -> torch.Tensor:
    """Binary masks (N, 1, h, w): closing of radius `close` (dilate, then erode), then dilation by `dilate`.
    Square structuring elements, in latent pixels; outside the image counts as unmasked, so the closing neither
    grows a region toward the border nor eats one that touches it."""
    if close:
        k, r = 2 * close + 1, close
        p = F.pad(m, (2 * r,) * 4)  # room for the dilation to spread and the erosion to see background beyond it
        p = -F.max_pool2d(-F.max_pool2d(p, k, stride=1, padding=r), k, stride=1, padding=r)
        m = p[..., 2 * r:-2 * r, 2 * r:-2 * r]
    if dilate:
        m = F.max_pool2d(m, 2 * dilate + 1, stride=1, padding=dilate)
    return m


def mask_from_images(masks: list[Image.Image], size, factor: int):
    """Latent masks from user mask images (white = edit), each resized to its image's `size` (H, W) pixels (one
    size for all, or a list with one per mask); a latent cell is on when any of its pixels is, so the mask covers
    what the user painted. An (N, 1, h, w) tensor for one size, else a list of (1, h, w)."""
    sizes = size if isinstance(size, list) else [size] * len(masks)
    out = [F.max_pool2d(torch.from_numpy(np.asarray(m.convert("L").resize(s[::-1], Image.NEAREST)) > 127)[None].float(), factor)
           for m, s in zip(masks, sizes)]
    return torch.stack(out) if len({tuple(s) for s in sizes}) == 1 else out


def pixel_mask(latent_mask: torch.Tensor, size: tuple[int, int], blur: float) -> torch.Tensor:
    """Feathered pixel mask (N, 1, H, W) in [0, 1] from latent masks: nearest upsampling, then a Gaussian of `blur` px."""
    m = F.interpolate(latent_mask.float(), size=size, mode="nearest")
    if blur <= 0:
        return m
    r = max(1, int(np.ceil(3 * blur)))
    k = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float32) ** 2 / (2 * blur ** 2))
    k = (k / k.sum()).view(1, 1, 1, -1)
    m = F.conv2d(F.pad(m, (r, r, 0, 0), mode="replicate"), k)
    return F.conv2d(F.pad(m, (0, 0, r, r), mode="replicate"), k.transpose(2, 3))


def paste(outputs: list[Image.Image], inputs: list[Image.Image], soft: torch.Tensor) -> list[Image.Image]:
    """out·m + input·(1 − m) per image, in 8-bit RGB: outside the mask the output is the input, bit for bit."""
    res = []
    for o, x, m in zip(outputs, inputs, soft):
        a = m[0].numpy()[..., None]
        mix = np.asarray(o, dtype=np.float32) * a + np.asarray(x.convert("RGB"), dtype=np.float32) * (1 - a)
        res.append(Image.fromarray(np.round(mix).clip(0, 255).astype(np.uint8)))
    return res


class Blend:
    """`callback_on_step_end` for diffusers img2img pipelines: after each step, outside the mask, the
    latent becomes the source noised to the next timestep; after the last step, the source itself."""

    def __init__(self, pipe, images: list[Image.Image], latent_mask: torch.Tensor, seeds: list[int]):
        self.z0 = _encode(pipe, images)
        self.mask = latent_mask.to(self.z0)
        # One fixed background noise per image, from its own seed: independent of batching.
        self.noise = torch.cat([torch.randn((1, *self.z0.shape[1:]), generator=torch.Generator().manual_seed(s))
                                for s in seeds]).to(self.z0)

    def __call__(self, pipe, i: int, t, kwargs: dict) -> dict:
        sched = pipe.scheduler
        steps = list(sched.timesteps)
        k = next(j for j, s in enumerate(steps) if s == t)
        if k + 1 < len(steps):
            bg = sched.add_noise(self.z0, self.noise, steps[k + 1].reshape(1))
        else:
            bg = self.z0
        lat = kwargs["latents"]
        return {"latents": self.mask * lat + (1 - self.mask) * bg.to(lat.dtype)}


def mask_image(latent_mask: torch.Tensor, size: tuple[int, int]) -> Image.Image:
    """A (1, h, w) latent mask as a white-on-black PNG at the image's `size` (W, H), for the record."""
    m = (latent_mask[0].numpy() > 0.5).astype(np.uint8) * 255
    return Image.fromarray(m).resize(size, Image.NEAREST)
