"""Pretrain the embedded base `tiny-faces` from scratch on the source domain (faces, no sunglasses).

    python recipes/pretrain_ldm.py --config recipes/configs/pretrain_tiny_faces.yaml [key=value ...]

Follows the latent diffusion recipe (Rombach et al. 2022) at toy scale:
  1. VAE: AutoencoderKL, L1 + L2 reconstruction + a small KL term, 64 px -> 16x16x4 latents.
  2. Latent scaling: fold the per-channel latent mean into the VAE's quant convs (exact, so
     plain diffusers pipelines, which know no shift, stay correct), then scaling_factor = 1/std.
  3. Text encoder: a small CLIP text model, kept frozen at its seeded random init. Why: adapt's
     LoRA recipe treats τθ as a frozen pretrained encoder, exactly as with real SD checkpoints,
     and a frozen encoder lets prompt embeddings be computed once; the UNet's cross-attention
     learns to read the (injective) random features of the caption vocabulary.
  4. UNet: UNet2DConditionModel with cross-attention, ε-prediction on DDPM noise (SD's scaled-linear
     betas), Min-SNR-5 weighting, EMA, caption dropout for classifier-free guidance.
  5. Export: StableDiffusionPipeline folder, fp16 safetensors (text encoder fp32), plus stats.json.

Every stage checkpoints atomically every `checkpoint_every` steps and resumes from its last
checkpoint when run again, so the job can be stopped at any time: SIGINT (Ctrl-C), SIGTERM or a
dropped terminal (SIGHUP) finishes the current step, writes a checkpoint there and exits 130 / 143 / 129
(a second Ctrl-C aborts). Every log line also goes to <out_dir>/pretrain.log, which a closed terminal keeps.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel

from adapt import config as cfglib
from adapt import atomic, checkpoint, model, objective, runguard, synth
from adapt.tiny import build_tokenizer


LOG_FILE: Path | None = None  # <out_dir>/pretrain.log, set by main: the record survives a closed terminal (SIGHUP)


def log(msg: str):
    line = f"[pretrain {time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    if LOG_FILE is not None:
        atomic.append_line(LOG_FILE, line)


class Stopped(Exception):
    """A signal stopped a stage after `step`; its checkpoint is written."""

    def __init__(self, stage: str, step: int, signum: int, folder: Path):
        super().__init__(stage, step, signum, folder)
        self.stage, self.step, self.signum, self.folder = stage, step, signum, folder


def render(split: str, n: int) -> tuple[torch.Tensor, list[str]]:
    """(n, 3, 64, 64) float in [-1, 1] and captions, for source-domain faces of `split`."""
    imgs, caps = [], []
    for i in range(n):
        img, cap, _ = synth.make("faces", split, i)
        imgs.append(np.asarray(img))
        caps.append(cap)
    x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return x, caps


def save_ckpt(folder: Path, tensors: dict, optimizer, step: int):
    """adapt's checkpoint format (safetensors + JSON, atomic; no pickle): folder/checkpoint-<step>, newest kept."""
    flat = {f"{name}.{k}": v for name, sd in tensors.items() for k, v in sd.items()}
    checkpoint.save(folder, step, flat, optimizer, {}, total_limit=1, weights="model")


def load_ckpt(folder: Path, optimizer) -> tuple[dict, int]:
    """({name: state_dict}, step) of the newest intact checkpoint in `folder`; ({}, 0) when there is none."""
    for path in reversed(checkpoint.list_checkpoints(folder)):
        if checkpoint.damage(path, "model") is None:
            flat, opt_t, state = checkpoint.load(path, "model")
            checkpoint.restore_optimizer(optimizer, opt_t, state["optimizer"])
            tensors: dict = {}
            for k, v in flat.items():
                name, rest = k.split(".", 1)
                tensors.setdefault(name, {})[rest] = v
            return tensors, state["step"]
        log(f"skipping damaged checkpoint {path}")
    return {}, 0


def cosine_lr(step: int, total: int, peak: float, warmup: int = 100, floor: float = 0.05) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))


def to_pil(t: torch.Tensor):
    from PIL import Image
    return Image.fromarray(((t.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy())


def sunglasses_probe(n: int):
    """vae -> share of n held-out sunglasses renders (split val) whose VAE round trip passes synthbench's shape
    check against the same face without glasses: what any model drawing through this VAE can reach at best."""
    from adapt import synthbench
    pairs = [(synth.make("faces", "val", i), synth.make("sunglasses", "val", i)[0]) for i in range(n)]
    src = [np.asarray(a, dtype=np.float32) / 255 for (a, _, _), _ in pairs]
    faces = [f for (_, _, f), _ in pairs]
    tgt = torch.from_numpy(np.stack([np.asarray(b) for _, b in pairs])).permute(0, 3, 1, 2).float() / 127.5 - 1

    @torch.no_grad()
    def probe(vae) -> float:
        rec = ((vae.decode(vae.encode(tgt).latent_dist.mode()).sample.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
        return float(np.mean([synthbench.shape(r, s, f, synth.skin_mask(f))["passed"] for r, s, f in zip(rec, src, faces)]))
    return probe


def build_vae(latent_channels: int = 4) -> AutoencoderKL:
    # 3 blocks -> factor 4: 64 px -> 16x16 latents, so an eye spans ~2 latent pixels.
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=(16, 32, 64),
                         down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                         layers_per_block=1, norm_num_groups=8, sample_size=64)


def build_unet(cross_attn_levels: int = 2, latent_channels: int = 4, heads: int = 4) -> UNet2DConditionModel:
    # levels 2 (v1): cross-attention at 8x8, 4x4 and the mid block: 7 transformer blocks, 6.6 M params.
    # levels 3 (v2): also at 16x16 (one down, two up blocks), where a lens bridge is one latent pixel
    # wide; 10 transformer blocks, 6.9 M params, ~2.2x the step time (256-token self-attention).
    # attention_head_dim is the head *count* in diffusers' UNet2DConditionModel (a legacy name): `heads`
    # heads of 128 / heads channels. The weights' shapes do not depend on it, the function does.
    full = cross_attn_levels == 3
    return UNet2DConditionModel(
        sample_size=16, in_channels=latent_channels, out_channels=latent_channels, layers_per_block=1, block_out_channels=(64, 128, 128),
        down_block_types=("CrossAttnDownBlock2D" if full else "DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D" if full else "UpBlock2D"),
        cross_attention_dim=64, attention_head_dim=heads, norm_num_groups=32)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean PSNR in dB of images in [-1, 1]."""
    mse = ((a.clamp(-1, 1) - b) / 2).pow(2).mean(dim=(1, 2, 3))
    return float((10 * torch.log10(1 / mse.clamp_min(1e-10))).mean())


def train_vae(cfg, x: torch.Tensor, x_val: torch.Tensor, work: Path, stop: runguard.Stopper) -> AutoencoderKL:
    final = work / "vae_final.safetensors"
    vae = build_vae(cfg.vae_latent_channels)
    if cfg.vae_from:  # reuse a trained VAE as it is (e.g. v1's for a new UNet): latents, caches and tuned decoders stay valid
        log(f"VAE: reusing {cfg.vae_from}/vae")
        reused = AutoencoderKL.from_pretrained(cfg.vae_from, subfolder="vae", **model.dtype_kw(torch.float32))
        model.verify_weights(reused, Path(cfg.vae_from) / "vae")  # a weight missing from it would be drawn at random
        return reused
    if final.exists():
        vae.load_state_dict(load_file(str(final)))
        return vae
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    x_clut = None
    if cfg.vae_clutter > 0:  # the same faces overdrawn with random primitives (synth.clutter): a broader codec
        log(f"VAE: {cfg.vae_clutter:.0%} of batches with clutter")
        x_clut = torch.stack([(torch.from_numpy(np.asarray(synth.clutter(to_pil(x[i]), i))).permute(2, 0, 1).float() / 127.5 - 1)
                              for i in range(len(x))])
    probe = sunglasses_probe(64)
    tensors, start = load_ckpt(work / "vae_checkpoints", opt)
    if tensors:
        vae.load_state_dict(tensors["vae"])
        log(f"VAE: resumed at step {start}")
    t0 = time.time()
    for step in range(start, cfg.vae_steps):
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)  # data order survives resume
        idx = torch.randint(0, len(x), (cfg.vae_batch,), generator=g)
        batch = x[idx]
        if x_clut is not None:
            batch = torch.where((torch.rand(cfg.vae_batch, generator=g) < cfg.vae_clutter).view(-1, 1, 1, 1), x_clut[idx], batch)
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, cfg.vae_steps, cfg.vae_lr)
        post = vae.encode(batch).latent_dist
        rec = vae.decode(post.sample(generator=g)).sample
        err = rec - batch
        loss = err.abs().mean() + err.pow(2).mean() + cfg.vae_kl * post.kl().mean() / batch[0].numel()
        if cfg.vae_edge_weight:  # a thin line is all gradient: weight its edges, not only its few pixels
            loss = loss + cfg.vae_edge_weight * ((err[..., 1:, :] - err[..., :-1, :]).abs().mean()
                                                 + (err[..., :, 1:] - err[..., :, :-1]).abs().mean())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if (step + 1) % 100 == 0:
            log(f"VAE step {step + 1}/{cfg.vae_steps} loss {loss.item():.4f} ({(time.time() - t0) / (step + 1 - start):.2f} s/step)")
        periodic = (step + 1) % (cfg.checkpoint_every * 2) == 0
        if periodic:
            with torch.no_grad():
                val = psnr(vae.decode(vae.encode(x_val[:64]).latent_dist.mode()).sample, x_val[:64])
            log(f"VAE held-out PSNR {val:.2f} dB; round trip of real sunglasses renders passes the shape check "
                f"{probe(vae):.0%} (the ceiling for any adapter drawing lenses through this VAE)")
        if periodic or stop.signum is not None:
            save_ckpt(work / "vae_checkpoints", {"vae": vae.state_dict()}, opt, step + 1)
        if stop.signum is not None:
            raise Stopped("VAE", step + 1, stop.signum, work / "vae_checkpoints")
    atomic.write_safetensors(vae.state_dict(), final)
    return vae


@torch.no_grad()
def fold_latent_shift(vae: AutoencoderKL, x: torch.Tensor, fold: bool = True) -> dict:
    """Center the latent channels inside the VAE, then set scaling_factor so Var[z·scale] = 1 (fold=False:
    only measure, for a reused VAE that was folded when it was trained).

    z' = z − m is exact: quant_conv's mean half gets bias −m, post_quant_conv (1x1, W) gets bias + W·m.
    """
    zs = torch.cat([vae.encode(x[i:i + 256]).latent_dist.sample() for i in range(0, len(x), 256)])
    raw_mean, raw_std, raw_overall = zs.mean(dim=(0, 2, 3)), zs.std(dim=(0, 2, 3)), float(zs.std())
    if fold:
        c = vae.config.latent_channels
        vae.quant_conv.bias[:c] -= raw_mean
        vae.post_quant_conv.bias += vae.post_quant_conv.weight[:, :, 0, 0] @ raw_mean
        zs = zs - raw_mean.view(1, -1, 1, 1)
        vae.register_to_config(scaling_factor=float(1.0 / zs.std()))
    scale = vae.config.scaling_factor
    scaled = zs * scale
    return {"raw_mean": raw_mean.tolist(), "raw_std": raw_std.tolist(), "raw_overall_std": raw_overall,
            "scaling_factor": scale, "scaled_mean": scaled.mean(dim=(0, 2, 3)).tolist(),
            "scaled_std": scaled.std(dim=(0, 2, 3)).tolist(), "scaled_overall_std": float(scaled.std())}


def train_unet(cfg, vae, text_encoder, tokenizer, x, caps, work: Path, stop: runguard.Stopper):
    unet = build_unet(cfg.unet_cross_attn_levels, vae.config.latent_channels, cfg.unet_heads)
    ema = build_unet(cfg.unet_cross_attn_levels, vae.config.latent_channels, cfg.unet_heads)
    final = work / "unet_ema_final.safetensors"
    if final.exists():
        ema.load_state_dict(load_file(str(final)))
        return ema
    ema.load_state_dict(unet.state_dict())
    ema.requires_grad_(False)
    with torch.no_grad():  # cache posteriors and prompt embeddings once
        mean, std = [], []
        for i in range(0, len(x), 256):
            d = vae.encode(x[i:i + 256]).latent_dist
            mean.append(d.mean)
            std.append(d.std)
        mean, std = torch.cat(mean), torch.cat(std)  # (N, 4, 16, 16)
        uniq = sorted(set(caps)) + [""]
        ids = tokenizer(uniq, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
        emb = text_encoder(ids)[0]  # (U, L, 64)
        cap_idx = torch.tensor([uniq.index(c) for c in caps])
        empty = len(uniq) - 1
    scale = vae.config.scaling_factor
    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    ac = sched.alphas_cumprod
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.unet_lr, weight_decay=1e-2)
    tensors, start = load_ckpt(work / "unet_checkpoints", opt)
    if tensors:
        unet.load_state_dict(tensors["unet"])
        ema.load_state_dict(tensors["ema"])
        log(f"UNet: resumed at step {start}")
    t0, losses = time.time(), []
    for step in range(start, cfg.unet_steps):
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 10_000_000 + step)
        idx = torch.randint(0, len(x), (cfg.unet_batch,), generator=g)
        z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * scale
        drop = torch.rand(cfg.unet_batch, generator=g) < cfg.caption_dropout
        e = emb[torch.where(drop, torch.full_like(cap_idx[idx], empty), cap_idx[idx])]
        t = torch.randint(0, 1000, (cfg.unet_batch,), generator=g)
        noise = torch.randn(z0.shape, generator=g)
        zt = objective.q_sample(ac, z0, noise, t)
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, cfg.unet_steps, cfg.unet_lr, warmup=200, floor=0.1)
        pred = unet(zt, t, e).sample
        w = objective.min_snr_weights(ac, t, cfg.min_snr_gamma, "epsilon")
        loss = objective.loss(pred, noise, w).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            d = min(cfg.ema_decay, (1 + step) / (10 + step))
            torch._foreach_lerp_(list(ema.parameters()), list(unet.parameters()), 1 - d)
        losses.append(loss.item())
        if (step + 1) % 50 == 0:
            log(f"UNet step {step + 1}/{cfg.unet_steps} loss {np.mean(losses[-50:]):.4f} ({(time.time() - t0) / (step + 1 - start):.2f} s/step)")
        if (step + 1) % cfg.checkpoint_every == 0 or stop.signum is not None:
            save_ckpt(work / "unet_checkpoints", {"unet": unet.state_dict(), "ema": ema.state_dict()}, opt, step + 1)
        if stop.signum is not None:
            raise Stopped("UNet", step + 1, stop.signum, work / "unet_checkpoints")
    atomic.write_safetensors(ema.state_dict(), final)
    return ema


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("overrides", nargs="*", help="key=value")
    args = ap.parse_intermixed_args(argv)  # key=value overrides may sit between flags
    cfg = cfglib.load(cfglib.PretrainConfig, args.config, args.overrides)
    torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    work = Path(cfg.out_dir)
    work.mkdir(parents=True, exist_ok=True)
    cfglib.dump(cfg, work / "config.yaml")
    global LOG_FILE
    LOG_FILE = work / "pretrain.log"
    stop = runguard.Stopper(log)
    try:
        run(cfg, work, stop)
    except Stopped as e:
        log(f"{signal.Signals(e.signum).name}: stopped after {e.stage} step {e.step} with a checkpoint in {e.folder}; "
            "run the same command again to resume from it")
        return 128 + e.signum
    finally:
        stop.close()
    return 0


def run(cfg, work: Path, stop: runguard.Stopper):
    """The stages, each resuming from its checkpoints in `work`."""
    t_start = time.time()
    log(f"rendering {cfg.num_images} source faces (split 'pretrain') and 256 held-out (split 'val')")
    x, caps = render("pretrain", cfg.num_images)
    x_val, _ = render("val", 256)

    vae = train_vae(cfg, x, x_val, work, stop).eval().requires_grad_(False)
    with torch.no_grad():
        vae_psnr = psnr(torch.cat([vae.decode(vae.encode(x_val[i:i + 64]).latent_dist.mode()).sample for i in range(0, 256, 64)]), x_val)
    log(f"VAE held-out PSNR (256 faces, posterior mode) {vae_psnr:.2f} dB; sunglasses round trip passes the shape check "
        f"{sunglasses_probe(256)(vae):.0%}")
    stats = fold_latent_shift(vae, x, fold=cfg.vae_from is None)
    log(f"latents: raw per-channel mean {np.round(stats['raw_mean'], 3)}, raw std {stats['raw_overall_std']:.3f}; "
        f"scaling_factor {stats['scaling_factor']:.4f} -> scaled std {stats['scaled_overall_std']:.4f}")

    torch.manual_seed(cfg.seed)
    tokenizer = build_tokenizer(synth.vocabulary(), max_length=32)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=32, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, projection_dim=64)).eval().requires_grad_(False)

    unet = train_unet(cfg, vae, text_encoder, tokenizer, x, caps, work, stop)

    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    out = Path(cfg.export_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.to(torch.float16)
    text_encoder.to(torch.float32)  # transformers loads the stored dtype: fp16 here would break plain from_pretrained
    pipe.save_pretrained(tmp, safe_serialization=True)
    model.write_portable(tmp)  # tokenizer files and text-encoder names that transformers 4.x reads too
    stats.update(vae_psnr_db=vae_psnr, vae_steps=cfg.vae_steps, unet_steps=cfg.unet_steps,
                 wall_s=time.time() - t_start, threads=cfg.num_threads, torch=torch.__version__)
    (tmp / "stats.json").write_text(json.dumps(stats, indent=2))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    log(f"exported {out} ({sum(f.stat().st_size for f in out.rglob('*') if f.is_file()) / 1e6:.1f} MB)")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except cfglib.ConfigError as e:  # a bad key or value: one line naming it, as lora_img2img.py does
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # a second signal while stopping: abort without writing
        print("aborted by a second signal; no checkpoint was written for the current step (the last periodic one "
              "remains)", file=sys.stderr)
        sys.exit(130)
