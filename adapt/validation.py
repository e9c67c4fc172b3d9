"""Validation grids during training: img2img at the run's strength on fixed images and seeds, input | base | adapter."""

from __future__ import annotations

import numpy as np
import torch

from adapt import atomic, data, sample


class Validator:
    """img2img at the recipe's strength on fixed images and seeds: grid of input | base | adapter."""

    def __init__(self, cfg, pipe, unet, out, acc, say):
        self.cfg, self.pipe, self.unet, self.acc, self.say = cfg, pipe, unet, acc, say  # unet: LoRA is attached in place later
        self.base = None  # the base column, drawn once
        self.dir = out / "validation"
        if not acc.is_main_process:
            return
        v = cfg.validation
        try:
            pixels, recs, _ = data.load(v.source, cfg.data.resolution, v.split, num_images=v.num_images,
                                        cache_dir=cfg.data.cache_dir, logger=lambda m: None)
        except data.DataError as e:
            raise data.DataError(f"validation.source: {e}") from None
        self.images = [sample.fit_budget(r.load(), cfg.data.resolution, pipe.vae_scale_factor) for r in recs]
        self.prompts = [(v.prompt or "{caption}").format(caption=r.caption) for r in recs]

    def _run(self):
        v, o = self.cfg.validation, self.cfg.objective
        # In the training precision: accelerate's prepare() makes the UNet return fp32 under mixed precision, which
        # a bf16/fp16 VAE takes only under autocast.
        with self.acc.autocast():
            return sample.img2img(self.pipe, self.images, self.prompts, o.strength, o.inference_steps, v.guidance_scale,
                                  v.seed, o.scheduler)

    @torch.no_grad()
    def draw_base(self):
        """The base column, drawn now (before the decoder is tuned and any LoRA is attached)."""
        if self.acc.is_main_process:
            self.base = self._run()

    def _track(self, grid, step: int) -> None:
        """The grid to the run's image-capable trackers (train.report_to), as diffusers' scripts log theirs."""
        for tracker in self.acc.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_image("validation", np.asarray(grid), step, dataformats="HWC")
            elif tracker.name == "wandb":
                import wandb
                tracker.log({"validation": wandb.Image(grid, caption="input | base | adapter")}, step=step)

    @torch.no_grad()
    def __call__(self, step: int):
        if self.acc.is_main_process:
            was_training = self.unet.training
            self.unet.eval()
            if self.base is None:
                self.unet.disable_adapters()
                self.base = self._run()
                self.unet.enable_adapters()
            adapted = self._run()
            self.unet.train(was_training)
            self.dir.mkdir(parents=True, exist_ok=True)
            path = self.dir / f"step_{step:06d}.png"
            grid = sample.grid([list(r) for r in zip(self.images, self.base, adapted)])
            atomic.write_image(grid, path)
            self.say(f"validation grid (input | base | adapter) at step {step}: {path}")
            self._track(grid, step)
        self.acc.wait_for_everyone()
