"""Aspect-ratio buckets: train on each image at (nearly) its own shape instead of a centre square.

As in NovelAI's and kohya sd-scripts' bucketing, and SDXL's own training (Podell et al. 2023, sec. 2.3):
a set of (width, height) at about `resolution`² pixels, sides multiples of `step` (the VAE factor x 8,
so latent sides stay multiples of 8), aspect between 1:max_aspect and max_aspect:1. Each image goes to
the bucket nearest its aspect (in log space), is resized to cover it and cropped (centre, or a seeded
random offset); its original size and crop offset are kept for SDXL's micro-conditioning.

Batches come from one bucket at a time, drawn by `BucketSampler` from (seed, step) alone, so a resumed
run draws the same batches, and all ranks share the draw and take disjoint slices of it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

SIZING_VERSION = 1


@dataclass(frozen=True)
class Sizing:
    """How training images become tensors: the contract between the config, data loading and the latent cache
    (its `key()` is part of the cache key, so a change of any field re-encodes)."""
    resolution: int                # pixel budget: buckets hold about resolution² pixels
    step: int                      # bucket sides are multiples of this (VAE factor × UNet downsampling)
    buckets: bool = True           # False: every image becomes one resolution x resolution square
    max_aspect: float = 2.5        # most extreme bucket, long side : short side
    random_crop: bool = False      # crop at a seeded random offset instead of the centre
    crops: int = 1                 # crops per image (random_crop only), each cached as its own latents
    seed: int = 0                  # random crops' seed
    min_size: int | None = None    # skip images whose short side is below this; None = upscale them (named in the log)

    def __post_init__(self):
        if self.resolution <= 0 or self.step <= 0:
            raise ValueError(f"resolution and step must be > 0, got {self.resolution}, {self.step}")
        if self.buckets and self.resolution % self.step:
            raise ValueError(f"data.resolution={self.resolution} is not a multiple of the bucket step {self.step} "
                             "(VAE factor x UNet downsampling, or data.bucket_step): pick a multiple, or data.buckets=false")
        if self.max_aspect < 1:
            raise ValueError(f"data.max_aspect must be >= 1, got {self.max_aspect}")
        if self.crops < 1 or (self.crops > 1 and not self.random_crop):
            raise ValueError(f"data.crops_per_image={self.crops}: must be >= 1, and > 1 only with data.random_crop=true "
                             "(centre crops are all the same)")

    def bucket_set(self) -> list[tuple[int, int]]:
        if not self.buckets:
            return [(self.resolution, self.resolution)]
        return make_buckets(self.resolution, self.step, self.max_aspect)

    def key(self) -> dict:
        """What the cached latents depend on: the seed only matters for random crops (a new train.seed with centre
        crops reuses the cache); min_size only selects images, which the data fingerprint covers."""
        d = dataclasses.asdict(self)
        if not self.random_crop:
            d.pop("seed")
        d.pop("min_size")
        return {**d, "version": SIZING_VERSION}


def make_buckets(resolution: int, step: int, max_aspect: float = 2.5) -> list[tuple[int, int]]:
    """(width, height) pairs with width·height <= resolution², sides multiples of `step`, sorted by aspect."""
    if resolution % step:
        raise ValueError(f"resolution {resolution} is not a multiple of the bucket step {step}")
    area = resolution * resolution
    out = set()
    w = resolution
    while True:  # landscape sides: the tallest height that keeps the budget; portrait buckets are their mirrors
        h = (area // w) // step * step
        if h < step or w / h > max_aspect:
            break
        out |= {(w, h), (h, w)}
        w += step
    return sorted(out, key=lambda b: (b[0] / b[1], b[0]))


def nearest(buckets: list[tuple[int, int]], width: int, height: int) -> tuple[int, int]:
    """The bucket whose aspect is nearest the image's (log ratio; ties go to the larger area)."""
    a = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - a), -b[0] * b[1]))


@dataclass
class Placement:
    """Where one image went: its bucket, its size before resizing, and the crop taken after resizing to cover."""
    bucket: tuple[int, int]        # (width, height)
    original_size: tuple[int, int]  # (height, width), SDXL's order
    crop_top_left: tuple[int, int]  # (top, left) in resized pixels
    upscaled: bool                  # the image was smaller than its bucket on some side
    resized_size: tuple[int, int]   # (height, width) after resizing to cover, before cropping

    def time_ids(self, flipped: bool = False) -> list[int]:
        """SDXL micro-conditioning (Podell et al. 2023, sec. 2.2): original (h, w), crop (top, left), target (h, w).
        A flipped crop starts as far from the right edge as the crop did from the left (as in kohya's sd-scripts)."""
        (h, w), (top, left), (bw, bh) = self.original_size, self.crop_top_left, self.bucket
        if flipped:
            left = self.resized_size[1] - bw - left
        return [h, w, top, left, bh, bw]

    def apply(self, img: Image.Image, resample=Image.BICUBIC) -> Image.Image:
        """The same resize and crop on another image of the original's size (a loss mask)."""
        (rh, rw), (top, left), (bw, bh) = self.resized_size, self.crop_top_left, self.bucket
        if img.size != (self.original_size[1], self.original_size[0]):
            img = img.resize((self.original_size[1], self.original_size[0]), Image.NEAREST)
        if img.size != (rw, rh):
            img = img.resize((rw, rh), resample)
        return img.crop((left, top, left + bw, top + bh))


def place(img: Image.Image, bucket: tuple[int, int], generator: torch.Generator | None = None) -> tuple[Image.Image, Placement]:
    """Resize `img` to cover `bucket` (bicubic) and crop it to the bucket: centred, or at a random offset
    drawn from `generator` (data.random_crop)."""
    bw, bh = bucket
    w, h = img.size
    s = max(bw / w, bh / h)
    rw, rh = max(bw, round(w * s)), max(bh, round(h * s))
    if (rw, rh) != (w, h):
        img = img.resize((rw, rh), Image.BICUBIC)
    if generator is None:
        left, top = (rw - bw) // 2, (rh - bh) // 2
    else:
        left = int(torch.randint(0, rw - bw + 1, (1,), generator=generator))
        top = int(torch.randint(0, rh - bh + 1, (1,), generator=generator))
    return img.crop((left, top, left + bw, top + bh)), Placement(bucket, (h, w), (top, left), s > 1, (rh, rw))


@dataclass
class Sized:
    """Training images at their buckets. With `crops` crops per image, image i's crop v is entry i·crops + v."""
    pixels: list[torch.Tensor]      # (3, H, W) in [-1, 1] per entry; H, W = the entry's bucket
    placements: list[Placement]     # per entry
    crops: int = 1

    def __len__(self) -> int:  # images, not entries
        return len(self.pixels) // self.crops

    def bucket_of(self) -> list[tuple[int, int]]:
        """Each image's bucket (all crops of an image share it: the bucket follows the aspect)."""
        return [p.bucket for p in self.placements[::self.crops]]

    def time_ids(self, flipped: bool = False) -> torch.Tensor:
        """(entries, 6) SDXL micro-conditioning per entry."""
        return torch.tensor([p.time_ids(flipped) for p in self.placements], dtype=torch.float32)


def crop_generator(seed: int, image: int, crop: int) -> torch.Generator:
    """The random crop of (image, crop) depends on these alone, so a cache rebuilt elsewhere is identical."""
    return torch.Generator().manual_seed((seed * 1_000_003 + image) * 101 + crop)


def size_images(images: list[Image.Image], sizing: Sizing) -> Sized:
    """Place every image in its nearest-aspect bucket, `sizing.crops` crops each."""
    bs = sizing.bucket_set()
    pixels, placements = [], []
    for i, img in enumerate(images):
        bucket = nearest(bs, *img.size)
        for v in range(sizing.crops):
            out, p = place(img, bucket, crop_generator(sizing.seed, i, v) if sizing.random_crop else None)
            pixels.append(torch.from_numpy(np.asarray(out, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 127.5 - 1.0)
            placements.append(p)
    return Sized(pixels, placements, sizing.crops)


def kept_fraction(width: int, height: int, bucket: tuple[int, int]) -> float:
    """Share of the original image's pixels inside the crop (1.0 = nothing cut away)."""
    bw, bh = bucket
    s = max(bw / width, bh / height)
    return min(1.0, (bw / s) * (bh / s) / (width * height))


class BucketSampler:
    """Deterministic bucket-homogeneous batches: batch(step, rank) depends only on (seed, step, rank).

    Each step one bucket is chosen with probability proportional to its number of images (so every
    image is drawn equally often in expectation), then `world·batch` positions are drawn from it with
    a generator shared by all ranks: a permutation of the bucket, cycled when the bucket holds fewer
    images than the step needs (a small bucket repeats images within a step rather than being dropped),
    and rank r takes slice r. Ranks therefore see disjoint images whenever the bucket has enough.
    """

    def __init__(self, bucket_of: list[tuple[int, int]], batch_size: int, world: int = 1, seed: int = 0,
                 repeats: list[int] | None = None):
        """repeats: per image, how many times as often it is drawn (kohya's N_name folders); None = all once."""
        if repeats is not None and (len(repeats) != len(bucket_of) or min(repeats, default=1) < 1):
            raise ValueError(f"repeats: one int >= 1 per image ({len(bucket_of)}), got {len(repeats)} (min {min(repeats, default=None)})")
        self.groups: dict[tuple[int, int], list[int]] = {}
        for i, b in enumerate(bucket_of):
            self.groups.setdefault(b, []).extend([i] * (repeats[i] if repeats else 1))  # an image n times: drawn n times as often
        self.keys = sorted(self.groups)
        self.batch_size, self.world, self.seed = batch_size, world, seed
        self.weights = torch.tensor([len(self.groups[k]) for k in self.keys], dtype=torch.float64)

    def batch(self, step: int, rank: int = 0) -> tuple[tuple[int, int], torch.Tensor]:
        """(bucket, (batch_size,) image indices) for `rank` at `step`."""
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + step) * 7919 + 17)  # same on every rank
        k = self.keys[int(torch.multinomial(self.weights, 1, generator=g))]
        members = torch.tensor(self.groups[k])
        need = self.world * self.batch_size
        order = torch.cat([members[torch.randperm(len(members), generator=g)] for _ in range(-(-need // len(members)))])
        return k, order[rank * self.batch_size:(rank + 1) * self.batch_size]

    def summary(self) -> list[str]:
        """One line per bucket: its size, its images, and what happens when it is smaller than a step's draw."""
        need = self.world * self.batch_size
        lines = []
        for w, h in self.keys:
            drawn, images = len(self.groups[(w, h)]), len(set(self.groups[(w, h)]))  # drawn counts repeats
            lines.append(f"bucket {w}x{h}: {images} images" + (f" ({drawn} with repeats)" if images < drawn else "") +
                         (f" (fewer than the {need} a step draws: its images repeat within a step)" if drawn < need else ""))
        return lines
