"""A target-domain decoder: the VAE decoder fine-tuned on the training images, the encoder left frozen.

Why: a latent diffusion model can show only what its decoder can draw. The embedded base's decoder learned
faces without sunglasses; a real sunglasses render encoded and decoded again keeps two lenses and the bridge
between them (the benchmark's shape check) 9% of the time, so no UNet adapter drawing through that decoder can
show a bridge reliably. Fine-tuning the decoder alone on the few-shot target images raised that ceiling to
89% on held-out renders (400 steps on the demo's 32 images, source-face PSNR 32.8 -> 29.9 dB).

Only the decoder moves, as in Stability's sd-vae-ft-mse: the encoder, and so every latent the UNet was trained
on or will be given, stays the base's. The result is saved beside the adapter as a diffusers AutoencoderKL
folder (`vae/`, safetensors), which plain diffusers loads with `AutoencoderKL.from_pretrained`. The loss is
pixel MSE against the training image, on the encoder's posterior mode (the latent the UNet learned to produce).
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from adapt import atomic, checkpoint, lora, model

VAE_DIR = "vae"  # beside the adapter's weights (lora.WEIGHTS_NAME)
WEIGHTS = "diffusion_pytorch_model.safetensors"


class DecoderError(ValueError):
    """A tuned-VAE folder that cannot serve this base; the message names the folder and what differs."""


def key_of(vae_fingerprint: str, data_fingerprint: str, steps: int, lr: float, batch_size: int, seed: int) -> str:
    """What a tuned decoder is a function of; a saved one with the same key is reused (e.g. on resume)."""
    return f"vae={vae_fingerprint};data={data_fingerprint};steps={steps};lr={lr:g};batch={batch_size};seed={seed}"


def _trainable(vae) -> list[torch.nn.Parameter]:
    vae.requires_grad_(False)
    params = [p for n, p in vae.named_parameters() if n.startswith(("decoder.", "post_quant_conv."))]
    for p in params:
        p.requires_grad_(True)
    return params


def finetune(vae, pixels: list[torch.Tensor], steps: int, lr: float, batch_size: int, seed: int,
             stop=lambda: None, gradient_checkpointing: bool = False, log=print) -> dict | None:
    """Fine-tune `vae`'s decoder in place (in fp32; the VAE stays fp32) on `pixels`, (3, H, W) in [-1, 1] each.

    Each step draws one size group (with probability proportional to its images, as the LoRA loop's buckets)
    and `batch_size` of its images, from a generator seeded by (seed, step). Returns figures (loss of the first
    and last 10% of steps, seconds), or None when `stop()` returned a signal (the VAE is then half-trained).
    """
    vae.to(torch.float32)
    device = next(vae.parameters()).device
    groups: dict[tuple, list[int]] = {}
    for i, x in enumerate(pixels):
        groups.setdefault(tuple(x.shape), []).append(i)
    keys = sorted(groups)
    z, x_all = {}, {}
    with torch.no_grad():  # posterior modes, once: (N_g, C, h, w) per group, kept on the host like the pixels
        for k in keys:
            x_all[k] = torch.stack([pixels[i] for i in groups[k]]).float()
            z[k] = torch.cat([vae.encode(x_all[k][j:j + 4].to(device)).latent_dist.mode().cpu()
                              for j in range(0, len(x_all[k]), 4)])
    params = _trainable(vae)
    if gradient_checkpointing:
        vae.enable_gradient_checkpointing()
    vae.train()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    weights = torch.tensor([len(groups[k]) for k in keys], dtype=torch.float)
    losses, t0 = [], time.time()
    try:
        for step in range(steps):
            if stop() is not None:
                return None
            g = torch.Generator().manual_seed(seed * 1_000_003 + step)
            k = keys[int(torch.multinomial(weights, 1, generator=g))]
            n = len(groups[k])
            idx = torch.randperm(n, generator=g).repeat(-(-batch_size // n))[:batch_size]  # cycled when n < batch
            rec = vae.decode(z[k][idx].to(device)).sample
            loss = torch.nn.functional.mse_loss(rec, x_all[k][idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
            if (step + 1) % max(steps // 4, 1) == 0:
                log(f"decoder step {step + 1}/{steps}: pixel MSE {float(loss.detach()):.5f}")
    finally:
        vae.eval()
        vae.requires_grad_(False)
        if gradient_checkpointing:
            vae.disable_gradient_checkpointing()
    tenth = max(steps // 10, 1)
    ls = torch.stack(losses).float().cpu() if losses else torch.zeros(1)
    return {"steps": steps, "lr": lr, "batch_size": batch_size, "loss_first": round(float(ls[:tenth].mean()), 6),
            "loss_last": round(float(ls[-tenth:].mean()), 6), "seconds": round(time.time() - t0, 1)}


def save(vae, out_dir: str | Path, key: str, figures: dict, base_dtype: torch.dtype = torch.float32) -> Path:
    """`out_dir`/vae/ as diffusers writes it (config.json + safetensors), each file written atomically; the
    weights carry `key` and `figures` in their metadata, and `base_dtype`, the precision the base VAE was loaded in
    (its encoder, saved here, is the base's rounded to it: `load` compares it at that precision)."""
    folder = Path(out_dir) / VAE_DIR
    sd = {k: v.detach().float().contiguous().cpu() for k, v in vae.state_dict().items()}
    atomic.write_safetensors(sd, folder / WEIGHTS, metadata={"format": "pt", "adapt_decoder_key": key,
                                                             "adapt_decoder_figures": json.dumps(figures),
                                                             "adapt_base_dtype": str(base_dtype).removeprefix("torch.")})
    atomic.write_text(folder / "config.json", vae.to_json_string())
    return folder


def saved(out_dir: str | Path) -> tuple[str | None, dict]:
    """(key, figures) of the tuned VAE saved in `out_dir`; (None, {}) when there is none or it is unreadable."""
    path = Path(out_dir) / VAE_DIR / WEIGHTS
    if not (path.is_file() and (path.parent / "config.json").is_file()):
        return None, {}
    from safetensors import safe_open
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        return meta.get("adapt_decoder_key"), json.loads(meta.get("adapt_decoder_figures", "{}"))
    except Exception:  # a torn or foreign file: not reusable, so it is trained again
        return None, {}


def find(adapter: str | Path) -> Path | None:
    """The tuned-VAE folder that ships with `adapter` (its folder, or the folder of its weights file), or None. A
    training checkpoint's adapter (out_dir/checkpoint-N/) decodes with its run's (out_dir/vae/): the decoder is tuned
    before the first LoRA step, so every checkpoint of the run was trained with it."""
    p = Path(adapter)
    folder = p if p.is_dir() else p.parent if p.name == lora.WEIGHTS_NAME else None
    if folder is not None and checkpoint.PATTERN.match(folder.name) and (folder / "state.json").is_file():
        folder = folder.parent
    if folder is None or not (folder / VAE_DIR / "config.json").is_file():
        return None
    return folder / VAE_DIR


def load(adapter: str | Path, base_vae):
    """The adapter's tuned VAE, on the base VAE's device and dtype; None when it ships none. Refuses a folder whose
    architecture or encoder differs from `base_vae`'s: its latents would not be the ones the UNet works in."""
    path = find(adapter)
    if path is None:
        return None
    from diffusers import AutoencoderKL
    try:
        vae = AutoencoderKL.from_pretrained(str(path), **model.dtype_kw(base_vae.dtype))
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise DecoderError(f"{path}: not a loadable VAE folder ({type(e).__name__}: {e})") from e
    try:  # diffusers fills a weight the file lacks at random and only warns
        model.verify_weights(vae, path)
    except model.ModelError as e:
        raise DecoderError(str(e)) from e
    norm = lambda v: list(v) if isinstance(v, (list, tuple)) else v  # a config built in code holds tuples, JSON lists
    differ = [k for k in ("in_channels", "latent_channels", "block_out_channels", "layers_per_block", "scaling_factor")
              if norm(vae.config.get(k)) != norm(base_vae.config.get(k))]
    if differ:
        what = ", ".join(f"{k} ({vae.config.get(k)} vs {base_vae.config.get(k)})" for k in differ)
        raise DecoderError(f"{path}: VAE config differs from the base's in {what}; it was tuned for another base")
    vae.to(next(base_vae.parameters()).device)
    # Trained from a base loaded in bf16/fp16, the saved encoder is the base's rounded to that precision; sampled in
    # another half type it is rounded twice. So compare to within one step of the coarsest precision involved: exact
    # for fp32 on both sides, and still far tighter than any other encoder is to this one.
    from safetensors import safe_open
    with safe_open(str(path / WEIGHTS), "pt") as f:
        at = getattr(torch, (f.metadata() or {}).get("adapt_base_dtype", "float32"), torch.float32)
    eps = max(torch.finfo(at).eps, torch.finfo(base_vae.dtype).eps)
    frozen = ("encoder", "quant_conv")  # what finetune never trains: every latent comes from these
    base_sd = {k: v for k, v in base_vae.state_dict().items() if k.startswith(frozen)}
    mine = vae.state_dict()
    for n, v in base_sd.items():
        if not torch.allclose(mine[n].float(), v.float(), rtol=eps, atol=eps * 1e-3):
            raise DecoderError(f"{path}: its encoder differs from the base's (first at {n}); a tuned decoder "
                               "keeps the base's encoder, so this VAE was tuned for another base")
    vae.load_state_dict(base_sd, strict=False)  # the base's own encoder, at the base's precision, exactly
    return vae


def to_single_file(folder: str | Path, path: str | Path) -> Path:
    """The tuned VAE `folder` (diffusers layout) as one original-layout .safetensors file, written atomically: the
    file WebUI (models/VAE) and ComfyUI (models/vae) select as a VAE, keyed as Stability's vae-ft-mse-840000
    (`encoder.*`, `decoder.*`, `quant_conv.*`, `post_quant_conv.*`; attention as 1x1 convs)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from adapt import singlefile
    folder = Path(folder)
    try:
        cfg = json.loads((folder / "config.json").read_text())
        sd = load_file(str(folder / WEIGHTS))
    except (OSError, ValueError, SafetensorError) as e:
        raise DecoderError(f"{folder}: not a readable tuned-VAE folder ({type(e).__name__}: {e})") from e
    original = singlefile.vae_to_original(sd, cfg, prefix="")
    return atomic.write_safetensors({k: v.contiguous() for k, v in original.items()}, path, metadata={"format": "pt"})


@contextmanager
def swapped(pipe, vae):
    """`pipe` decodes with `vae` inside the block (None: unchanged); the previous VAE is restored after."""
    old = pipe.vae
    if vae is not None:
        pipe.vae = vae
    try:
        yield pipe
    finally:
        pipe.vae = old
