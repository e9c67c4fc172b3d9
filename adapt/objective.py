"""The training objective as pure tensor math: strength window, forward noising, targets, weights, loss.

No I/O, no accelerate, no config objects. Notation follows DDPM (Ho et al. 2020):
alphas_cumprod[t] = ᾱ_t, x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε. Shapes: latents (B, C, H, W), t (B,).
"""

from __future__ import annotations

import torch


def strength_window(scheduler, num_inference_steps: int, strength: float) -> torch.Tensor:
    """Timesteps that img2img at `strength` runs the UNet on (SDEdit, Meng et al. 2022).

    Reproduces diffusers' `StableDiffusionImg2ImgPipeline.get_timesteps`: set the scheduler to
    `num_inference_steps`, keep the last int(steps·strength) of its timesteps. The first entry is
    also the timestep the source latent is noised to. `scheduler` is not modified. Returns (N,) long,
    in the order img2img visits them (descending).
    """
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    sched = type(scheduler).from_config(scheduler.config)
    sched.set_timesteps(num_inference_steps)
    init_timestep = min(int(num_inference_steps * strength), num_inference_steps)
    if init_timestep < 1:
        raise ValueError(f"strength {strength} x {num_inference_steps} steps visits no timestep; raise either")
    t_start = max(num_inference_steps - init_timestep, 0)
    timesteps = sched.timesteps[t_start * getattr(sched, "order", 1):]
    # Euler-type schedulers hold float timesteps; with 'leading'/'trailing' spacing they are integers.
    return timesteps.round().long()


def window_timesteps(scheduler, num_inference_steps: int, strength: float, kind: str) -> torch.Tensor:
    """The set training draws t from: 'img2img_exact' (the visited set), 'continuous' (0..first visited), 'full'."""
    T = scheduler.config.num_train_timesteps
    if kind == "full":
        return torch.arange(T)
    visited = strength_window(scheduler, num_inference_steps, strength)
    if kind == "img2img_exact":
        return visited.unique()
    if kind == "continuous":
        return torch.arange(int(visited.max()) + 1)
    raise ValueError(f"unknown window {kind!r}; expected img2img_exact, continuous or full")


def sample_timesteps(window: torch.Tensor, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform draw of (B,) timesteps from the window set."""
    idx = torch.randint(0, len(window), (batch_size,), generator=generator)
    return window[idx]


def _expand(a: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """Gather a[t] and broadcast to (B, 1, 1, 1)."""
    return a.to(t.device)[t].float().reshape(-1, *([1] * (ndim - 1)))


def q_sample(alphas_cumprod: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Forward process x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε (DDPM, Ho et al. 2020, eq. 4)."""
    ab = _expand(alphas_cumprod, t, x0.ndim)
    return (ab.sqrt() * x0 + (1 - ab).sqrt() * noise).to(x0.dtype)


def v_target(alphas_cumprod: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """v = √ᾱ_t ε − √(1−ᾱ_t) x_0 (progressive distillation, Salimans & Ho 2022, sec. 4)."""
    ab = _expand(alphas_cumprod, t, x0.ndim)
    return (ab.sqrt() * noise - (1 - ab).sqrt() * x0).to(x0.dtype)


def target(prediction_type: str, alphas_cumprod, x0, noise, t) -> torch.Tensor:
    """What the UNet regresses: ε, v, or x_0, following the base model's prediction_type."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return v_target(alphas_cumprod, x0, noise, t)
    if prediction_type == "sample":
        return x0
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def snr(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ᾱ_t / (1 − ᾱ_t) (Kingma et al. 2021), shape (B,)."""
    ab = alphas_cumprod.to(t.device)[t].float()
    return ab / (1 - ab)


def min_snr_weights(alphas_cumprod, t, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023, eq. 7, written per target), shape (B,).

    The x_0-loss weight min(SNR, γ) becomes min(SNR, γ)/SNR for an ε-target and
    min(SNR, γ)/(SNR+1) for a v-target, since ‖ε̂−ε‖² = ‖x̂_0−x_0‖²·SNR and ‖v̂−v‖² = ‖x̂_0−x_0‖²·(SNR+1).
    """
    s = snr(alphas_cumprod, t)
    clipped = torch.clamp(s, max=gamma)
    if prediction_type == "epsilon":
        return clipped / s
    if prediction_type == "v_prediction":
        return clipped / (s + 1)
    if prediction_type == "sample":
        return clipped
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def offset_noise(noise: torch.Tensor, offset: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """ε + offset·n with n ~ N(0, 1) per (sample, channel): lets the model shift mean brightness (Guttenberg 2023)."""
    if offset == 0:
        return noise
    n = torch.randn(noise.shape[:2] + (1,) * (noise.ndim - 2), generator=generator, dtype=noise.dtype)
    return noise + offset * n.to(noise.device)


def loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None,
         spatial: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample weighted MSE, shape (B,); the caller averages. Computed in fp32.

    spatial: (B, 1, h, w) per-position weights (masked loss): the squared error is averaged under them,
    sum(w·e²) / sum(w), so a small mask does not shrink the loss (and the effective learning rate) with its area.
    """
    err = (pred.float() - target.float()).pow(2)
    dims = tuple(range(1, pred.ndim))
    if spatial is None:
        per = err.mean(dim=dims)
    else:
        w = spatial.float().to(err.device).expand_as(err)
        per = (err * w).sum(dim=dims) / w.sum(dim=dims).clamp_min(1e-8)
    return per if weights is None else per * weights.to(per.device)
