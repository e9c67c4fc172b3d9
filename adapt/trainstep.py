"""One training step's data and loss, shared by the recipe and `adapt bench`.

Randomness is derived from (seed, step, micro-step, rank) alone, so a resumed run draws exactly the
batches, noise and timesteps an uninterrupted run would, and every DDP rank draws different data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adapt import buckets, cache, objective


@dataclass
class TrainData:
    """Everything a step draws from: cached posteriors, or raw pixels (caching off), in aspect buckets.

    Entries: with `crops` crops per image, image i's crop v is entry i·crops + v; an entry's tensors have its
    bucket's shape, and `sampler` makes every batch come from one bucket.
    """
    captions: list[str]  # per image
    caption_index: torch.Tensor  # (N,) row of each image's caption in `emb`
    emb: torch.Tensor  # (U+1, L, D) unique caption embeddings; last row is the empty prompt
    window: torch.Tensor  # (K,) timesteps training may draw
    alphas_cumprod: torch.Tensor  # (T,)
    scaling_factor: float
    shift_factor: float
    prediction_type: str
    sampler: buckets.BucketSampler
    crops: int = 1
    post: dict | None = None  # {'mean', 'std'} [+ 'mean_flip', 'std_flip']: lists of (C, h, w) per entry
    pixels: list | None = None  # (3, H, W) per entry when caching is off
    pooled: torch.Tensor | None = None  # (U+1, P) for SDXL
    time_ids: torch.Tensor | None = None  # (entries, 6) SDXL micro-conditioning: original, crop, target (h, w)
    time_ids_flip: torch.Tensor | None = None  # the same for the flipped entries
    loss_masks: list | None = None  # (1, h, w) masked-loss weights per entry at latent resolution; None = uniform

    def __len__(self):
        return len(self.caption_index)


def latent_loss_masks(masks: list[torch.Tensor], factor: int, outside: float) -> list[torch.Tensor]:
    """(1, H, W) pixel masks in [0, 1] per entry -> (1, H/f, W/f) loss weights: the share of each latent
    cell's pixels inside the mask, mapped to [outside, 1]."""
    return [outside + (1 - outside) * torch.nn.functional.avg_pool2d(m.float()[None], factor)[0] for m in masks]


def build(pipe, facts, captions: list[str], window: torch.Tensor, post: dict | None, sized: buckets.Sized,
          batch_size: int, device="cpu", world: int = 1, seed: int = 0, repeats: list[int] | None = None) -> TrainData:
    """TrainData for a pipeline: one embedding per unique caption plus the empty prompt (last row).

    With `post` (cached posteriors of `sized`'s entries) steps sample latents from it; without, steps encode
    `sized.pixels`. The bucket sampler draws `world` x `batch_size` images a step; SDXL gets each entry's
    original size and crop (`sized.placements`). `repeats`: per image, how many times as often it is drawn."""
    uniq = sorted(set(captions))
    row = {c: i for i, c in enumerate(uniq)}
    enc = cache.encode_prompts(pipe, uniq + [""], device=device)
    prompts = {k: v[enc["index"]] for k, v in enc.items() if k != "index"}  # rows in uniq + [""] order
    xl = "pooled" in prompts
    return TrainData(captions=captions, caption_index=torch.tensor([row[c] for c in captions]), emb=prompts["emb"],
                     window=window, alphas_cumprod=pipe.scheduler.alphas_cumprod, scaling_factor=facts.scaling_factor,
                     shift_factor=facts.shift_factor, prediction_type=facts.prediction_type,
                     sampler=buckets.BucketSampler(sized.bucket_of(), batch_size, world, seed, repeats), crops=sized.crops,
                     post=post, pixels=None if post is not None else sized.pixels, pooled=prompts.get("pooled"),
                     time_ids=sized.time_ids() if xl else None, time_ids_flip=sized.time_ids(True) if xl else None)


def step_generator(seed: int, step: int, micro: int = 0, rank: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 97 + micro) * 131 + rank)


def draw(data: TrainData, batch_size: int, g: torch.Generator, caption_dropout: float = 0.0, flip: bool = False,
         noise_offset: float = 0.0, pipe=None, at: int = 0, rank: int = 0) -> dict:
    """A batch: z0 (B, C, h, w), t (B,), noise, emb (B, L, D), images (B,) indices [+ pooled, time_ids for SDXL, loss_mask].

    Images come from `data.sampler` at draw number `at` (step x grad_accum + micro) for `rank`: one bucket,
    disjoint across ranks. With `pipe` given and no cached posteriors, the VAE and text encoder run on this
    batch (the reference trainers' way; used to measure what caching saves).
    """
    _, idx = data.sampler.batch(at, rank)
    if len(idx) != batch_size:
        raise ValueError(f"the bucket sampler draws {len(idx)} images per rank, the step asked for {batch_size}")
    crop = torch.randint(0, data.crops, (batch_size,), generator=g)
    entry = (idx * data.crops + crop).tolist()
    use_flip = (torch.rand(batch_size, generator=g) < 0.5) if flip else torch.zeros(batch_size, dtype=torch.bool)
    drop = torch.rand(batch_size, generator=g) < caption_dropout
    cap = torch.where(drop, torch.full_like(idx, len(data.emb) - 1), data.caption_index[idx])
    t = objective.sample_timesteps(data.window, batch_size, g)
    fl = use_flip.view(-1, 1, 1, 1)
    pick = lambda xs: torch.stack([xs[e] for e in entry])
    if data.post is not None:
        post = {"mean": pick(data.post["mean"]), "std": pick(data.post["std"])}
        if flip:
            post = {"mean": torch.where(fl, pick(data.post["mean_flip"]), post["mean"]),
                    "std": torch.where(fl, pick(data.post["std_flip"]), post["std"])}
        z0 = cache.sample_latents(post, torch.arange(batch_size), data.scaling_factor, data.shift_factor, g)
        emb = data.emb[cap]
        pooled = data.pooled[cap] if data.pooled is not None else None
    else:  # caching off: encode this batch now
        x = pick(data.pixels)
        x = torch.where(fl, x.flip(-1), x)
        post = cache.encode_posteriors(pipe.vae, x, batch_size=batch_size)
        z0 = cache.sample_latents(post, torch.arange(batch_size), data.scaling_factor, data.shift_factor, g)
        caps = ["" if d else data.captions[i] for d, i in zip(drop.tolist(), idx.tolist())]
        enc = cache.encode_prompts(pipe, caps)
        emb = enc["emb"][enc["index"]]
        pooled = enc["pooled"][enc["index"]] if "pooled" in enc else None
    noise = objective.offset_noise(torch.randn(z0.shape, generator=g), noise_offset, g)
    batch = {"z0": z0, "t": t, "noise": noise, "emb": emb, "images": idx}
    if data.loss_masks is not None:
        m = pick(data.loss_masks)
        batch["loss_mask"] = torch.where(fl, m.flip(-1), m)
    if pooled is not None:
        batch["pooled"] = pooled
        batch["time_ids"] = torch.where(use_flip.view(-1, 1), data.time_ids_flip[entry], data.time_ids[entry])
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
