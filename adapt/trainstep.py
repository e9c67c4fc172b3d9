"""One training step's data and loss, shared by the recipe and `adapt bench`.

Randomness is derived from (seed, step, micro-step, rank) alone, so a resumed run draws exactly the
batches, noise and timesteps an uninterrupted run would, and every DDP rank draws different data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adapt import cache, objective


@dataclass
class TrainData:
    """Everything a step draws from. Either cached posteriors or raw pixels (caching off)."""
    captions: list[str]
    caption_index: torch.Tensor  # (N,) row of each image's caption in `emb`
    emb: torch.Tensor  # (U+1, L, D) unique caption embeddings; last row is the empty prompt
    window: torch.Tensor  # (K,) timesteps training may draw
    alphas_cumprod: torch.Tensor  # (T,)
    scaling_factor: float
    shift_factor: float
    prediction_type: str
    post: dict | None = None  # {'mean', 'std'} (N, C, h, w) [+ 'mean_flip', 'std_flip']
    pixels: torch.Tensor | None = None  # (N, 3, H, W) when caching is off
    pooled: torch.Tensor | None = None  # (U+1, P) for SDXL
    resolution: int = 64
    time_ids: torch.Tensor | None = None  # (N, 6) SDXL micro-conditioning per image; None = (r, r, 0, 0, r, r)
    loss_masks: torch.Tensor | None = None  # (N, 1, h, w) masked-loss weights at latent resolution; None = uniform

    def __len__(self):
        return len(self.caption_index)


def sdxl_time_ids(records, resolution: int) -> torch.Tensor:
    """(N, 6) SDXL micro-conditioning (Podell et al. 2023, sec. 2.2): original (h, w), crop (top, left), target (r, r).

    An image upscaled from a small original is conditioned on its small size, as SDXL was trained, so the adapter
    does not learn that "native resolution" looks soft; pipelines sample with (r, r, 0, 0, r, r).
    """
    rows = []
    for rec in records:
        (h, w), (top, left) = rec.extra.get("original_size", (resolution, resolution)), rec.extra.get("crop_top_left", (0, 0))
        rows.append([h, w, top, left, resolution, resolution])
    return torch.tensor(rows, dtype=torch.float32)


def latent_loss_masks(masks: torch.Tensor, factor: int, outside: float) -> torch.Tensor:
    """(N, 1, R, R) pixel masks in [0, 1] -> (N, 1, R/f, R/f) loss weights: the share of each latent cell's
    pixels inside the mask, mapped to [outside, 1]."""
    m = torch.nn.functional.avg_pool2d(masks.float(), factor)
    return outside + (1 - outside) * m


def build(pipe, facts, captions: list[str], window: torch.Tensor, post: dict | None, pixels: torch.Tensor,
          resolution: int, device="cpu", records=None) -> TrainData:
    """TrainData for a pipeline: one embedding per unique caption plus the empty prompt (last row).

    With `post` (cached posteriors) steps sample latents from it; without, steps encode `pixels`.
    `records` (from data.load) give SDXL's per-image original sizes and crops.
    """
    uniq = sorted(set(captions))
    row = {c: i for i, c in enumerate(uniq)}
    enc = cache.encode_prompts(pipe, uniq + [""], device=device)
    prompts = {k: v[enc["index"]] for k, v in enc.items() if k != "index"}  # rows in uniq + [""] order
    return TrainData(captions=captions, caption_index=torch.tensor([row[c] for c in captions]), emb=prompts["emb"],
                     window=window, alphas_cumprod=pipe.scheduler.alphas_cumprod, scaling_factor=facts.scaling_factor,
                     shift_factor=facts.shift_factor, prediction_type=facts.prediction_type, post=post,
                     pixels=None if post is not None else pixels, pooled=prompts.get("pooled"), resolution=resolution,
                     time_ids=sdxl_time_ids(records, resolution) if records is not None and "pooled" in prompts else None)


def step_generator(seed: int, step: int, micro: int = 0, rank: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 97 + micro) * 131 + rank)


def draw(data: TrainData, batch_size: int, g: torch.Generator, caption_dropout: float = 0.0, flip: bool = False,
         noise_offset: float = 0.0, pipe=None) -> dict:
    """A batch: z0 (B, C, h, w), t (B,), noise, emb (B, L, D) [+ pooled, time_ids for SDXL].

    With `pipe` given and no cached posteriors, the VAE and text encoder run on this batch
    (the reference trainers' way; used to measure what caching saves).
    """
    idx = torch.randint(0, len(data), (batch_size,), generator=g)
    use_flip = (torch.rand(batch_size, generator=g) < 0.5) if flip else torch.zeros(batch_size, dtype=torch.bool)
    drop = torch.rand(batch_size, generator=g) < caption_dropout
    cap = torch.where(drop, torch.full_like(idx, len(data.emb) - 1), data.caption_index[idx])
    t = objective.sample_timesteps(data.window, batch_size, g)
    if data.post is not None:
        post = data.post
        if flip:
            post = {"mean": torch.where(use_flip.view(-1, 1, 1, 1), post["mean_flip"][idx], post["mean"][idx]),
                    "std": torch.where(use_flip.view(-1, 1, 1, 1), post["std_flip"][idx], post["std"][idx])}
            z0 = cache.sample_latents(post, torch.arange(batch_size), data.scaling_factor, data.shift_factor, g)
        else:
            z0 = cache.sample_latents(post, idx, data.scaling_factor, data.shift_factor, g)
        emb = data.emb[cap]
        pooled = data.pooled[cap] if data.pooled is not None else None
    else:  # caching off: encode this batch now
        x = data.pixels[idx]
        x = torch.where(use_flip.view(-1, 1, 1, 1), x.flip(-1), x)
        post = cache.encode_posteriors(pipe.vae, x, batch_size=batch_size)
        z0 = cache.sample_latents(post, torch.arange(batch_size), data.scaling_factor, data.shift_factor, g)
        caps = ["" if d else data.captions[i] for d, i in zip(drop.tolist(), idx.tolist())]
        enc = cache.encode_prompts(pipe, caps)
        emb = enc["emb"][enc["index"]]
        pooled = enc["pooled"][enc["index"]] if "pooled" in enc else None
    noise = objective.offset_noise(torch.randn(z0.shape, generator=g), noise_offset, g)
    batch = {"z0": z0, "t": t, "noise": noise, "emb": emb}
    if data.loss_masks is not None:
        m = data.loss_masks[idx]
        batch["loss_mask"] = torch.where(use_flip.view(-1, 1, 1, 1), m.flip(-1), m)
    if pooled is not None:
        r = data.resolution  # SDXL micro-conditioning: original size, crop top-left, target size
        batch["pooled"] = pooled
        # A flipped centre crop has the same offset from the other edge, so the crop coordinates stand.
        batch["time_ids"] = data.time_ids[idx] if data.time_ids is not None else \
            torch.tensor([[r, r, 0, 0, r, r]] * batch_size, dtype=torch.float32)
    return batch


def forward_loss(unet, batch: dict, data: TrainData, min_snr_gamma: float | None = None, device="cpu",
                 dtype=torch.float32) -> torch.Tensor:
    """Per-sample loss (B,) of the UNet on a drawn batch; target follows the base's prediction_type."""
    z0, t, noise = batch["z0"].to(device), batch["t"].to(device), batch["noise"].to(device)
    ac = data.alphas_cumprod.to(device)
    zt = objective.q_sample(ac, z0, noise, t)
    kwargs = {}
    if "pooled" in batch:
        kwargs["added_cond_kwargs"] = {"text_embeds": batch["pooled"].to(device, dtype), "time_ids": batch["time_ids"].to(device, dtype)}
    pred = unet(zt.to(dtype), t, batch["emb"].to(device, dtype), **kwargs).sample
    tgt = objective.target(data.prediction_type, ac, z0, noise, t)
    w = objective.min_snr_weights(ac, t, min_snr_gamma, data.prediction_type) if min_snr_gamma else None
    return objective.loss(pred, tgt, w, batch.get("loss_mask"))
