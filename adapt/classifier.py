"""A small domain classifier trained from scratch on real source vs real target images.

It judges "target reach" (the share of outputs it calls target) and gives the feature space for KID.
No pretrained weights are needed, so it works offline and for any domain pair. When a VAE is given,
each training image is also seen after an encode-decode round trip, so the classifier judges content
and not the VAE's softness (every img2img output has been through that VAE).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


class DomainNet(nn.Module):
    """(B, 3, H, W) in [-1, 1] -> logit (B,); `features` gives the (B, 64) penultimate activations."""

    def __init__(self, width: int = 16):
        super().__init__()
        w = width
        block = lambda i, o, s: [nn.Conv2d(i, o, 3, padding=1, stride=s), nn.GroupNorm(4, o), nn.SiLU()]
        # Max-pooling at the end: "is there a lens anywhere" is a presence question, not an average.
        self.body = nn.Sequential(*block(3, w, 1), *block(w, w, 2), *block(w, 2 * w, 1), *block(2 * w, 2 * w, 2),  # H/4
                                  *block(2 * w, 4 * w, 1), nn.AdaptiveMaxPool2d(1), nn.Flatten())
        self.head = nn.Linear(4 * w, 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x)).squeeze(-1)


@dataclass
class TrainedClassifier:
    net: DomainNet
    accuracy: float  # held-out accuracy on real images
    n_train: int
    n_heldout: int

    @torch.no_grad()
    def prob_target(self, x: torch.Tensor, batch: int = 256) -> np.ndarray:
        self.net.eval()
        return torch.cat([torch.sigmoid(self.net(x[i:i + batch])) for i in range(0, len(x), batch)]).numpy()

    @torch.no_grad()
    def features(self, x: torch.Tensor, batch: int = 256) -> np.ndarray:
        self.net.eval()
        return torch.cat([self.net.features(x[i:i + batch]) for i in range(0, len(x), batch)]).numpy()


@torch.no_grad()
def vae_roundtrip(vae, x: torch.Tensor, batch: int = 32) -> torch.Tensor:
    """Encode (posterior mode) and decode: what the VAE alone does to images (N, 3, H, W) in [-1, 1]."""
    dtype = vae.dtype
    upcast = dtype == torch.float16 and bool(vae.config.get("force_upcast", False))
    if upcast:  # SDXL's VAE overflows in fp16; diffusers' pipelines run it in fp32 when its config says so
        vae.to(torch.float32)
    try:
        out = []
        for i in range(0, len(x), batch):
            xb = x[i:i + batch].to(vae.device, vae.dtype)
            out.append(vae.decode(vae.encode(xb).latent_dist.mode()).sample.clamp(-1, 1).float().cpu())
    finally:
        if upcast:
            vae.to(dtype)
    return torch.cat(out)


def train(source: torch.Tensor, target: torch.Tensor, vae=None, heldout: float = 0.2, epochs: int = 8,
          batch_size: int = 32, lr: float = 2e-3, seed: int = 0) -> TrainedClassifier:
    """Train on (1-heldout) of each class, report accuracy on the rest. Inputs (N, 3, H, W) in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)

    def split(x):
        perm = torch.randperm(len(x), generator=g)
        k = max(1, int(round(len(x) * heldout)))
        return x[perm[k:]], x[perm[:k]]

    s_tr, s_te = split(source)
    t_tr, t_te = split(target)
    x_tr = torch.cat([s_tr, t_tr])
    y_tr = torch.cat([torch.zeros(len(s_tr)), torch.ones(len(t_tr))])
    if vae is not None:  # the same images after the VAE round trip, same labels
        x_tr = torch.cat([x_tr, vae_roundtrip(vae, x_tr)])
        y_tr = torch.cat([y_tr, y_tr])
    net = DomainNet()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(x_tr) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x_tr), generator=g)
        for i in range(0, len(x_tr), batch_size):
            idx = perm[i:i + batch_size]
            xb = x_tr[idx]
            flip = torch.rand(len(idx), generator=g) < 0.5  # the domains are left-right symmetric
            xb = torch.where(flip.view(-1, 1, 1, 1), xb.flip(-1), xb)
            loss = nn.functional.binary_cross_entropy_with_logits(net(xb), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    clf = TrainedClassifier(net, 0.0, len(x_tr), len(s_te) + len(t_te))
    x_te = torch.cat([s_te, t_te])
    y_te = np.concatenate([np.zeros(len(s_te)), np.ones(len(t_te))])
    if vae is not None:  # held-out accuracy on both raw and round-tripped images
        x_te = torch.cat([x_te, vae_roundtrip(vae, x_te)])
        y_te = np.concatenate([y_te, y_te])
    clf.accuracy = float(((clf.prob_target(x_te) > 0.5) == y_te).mean())
    return clf
