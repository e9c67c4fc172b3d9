"""Metrics that need pretrained weights: FID and Intra-LPIPS (the few-shot literature's), LPIPS and CLIP.

They run when their weights are on disk. No package here ships them and nothing may download them, so the
user points at files:
  FID           a TorchScript Inception-v3 called as `model(x_uint8, return_features=True)` -> (N, 2048), the
                detector StyleGAN2-ADA and clean-fid use (`inception-2015-12-05.pt`; it resizes to 299 inside).
  LPIPS         the backbone's ImageNet weights in torchvision's key layout (`vgg16-397923af.pth` or
                `alexnet-owt-7be5be79.pth`) plus LPIPS v0.1's linear layers (`vgg.pth` / `alex.pth` from the
                `lpips` package, keys `lin{0..4}.model.1.weight`); .safetensors with the same keys also load.
`.pth` files are read with `torch.load(weights_only=True)`, the restricted unpickler that rebuilds tensors only.

  fid               Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule ...", eq. 6:
                    ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2)
  LPIPS             Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features ...", eq. 1: per layer l,
                    unit-normalise features over channels, weight the squared difference by w_l, average over
                    H x W, sum over layers.
  intra_lpips       Ojha et al. 2021, "Few-shot Image Generation via Cross-domain Correspondence", sec. 4.2:
                    assign each output to its nearest training image by LPIPS, average the pairwise LPIPS inside
                    each cluster, then over clusters. Low means outputs collapse onto the few training images.
  clip_score        Hessel et al. 2021, "CLIPScore", eq. 1 with w = 100 (as torchmetrics reports it):
                    100 · max(cos(E_I(output), E_T(target text)), 0)
  clip_direction    Gal et al. 2021, "StyleGAN-NADA", eq. 3 (directional CLIP similarity): cos(E_I(output) -
                    E_I(input), E_T(target text) - E_T(source text)); did the edit move the way the text does?
CLIP is any transformers CLIPModel folder (or hub id when online) with its tokenizer, e.g. openai/clip-vit-large-patch14.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


class WeightsError(ValueError):
    """A metric's weights file is missing or does not fit; the message names the file and key."""


def frechet_distance(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^1/2), in float64.

    Tr((S1 S2)^1/2) = sum of sqrt(eigenvalues of S1^1/2 S2 S1^1/2), which is symmetric PSD, so eigh suffices
    (no complex sqrtm as in scipy's route; negative round-off eigenvalues are clipped to 0).
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(np.asarray(s1, np.float64)), np.atleast_2d(np.asarray(s2, np.float64))
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(w.clip(min=0))) @ v.T  # S1^1/2
    inner = np.linalg.eigvalsh(root1 @ s2 @ root1)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(inner.clip(min=0)).sum())


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) of (N, D) features, unbiased (N - 1), as pytorch-fid and clean-fid compute them."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"FID needs (N >= 2, D) features, got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def fid(features_a: np.ndarray, features_b: np.ndarray) -> float:
    return frechet_distance(*gaussian_stats(features_a), *gaussian_stats(features_b))


class InceptionFeatures:
    """Pool features of a TorchScript Inception detector; images (N, 3, H, W) in [-1, 1] -> (N, D) numpy."""

    def __init__(self, path: str | Path, device: str = "cpu"):
        path = Path(path).expanduser()
        if not path.is_file():
            raise WeightsError(f"FID Inception weights not found: {path}")
        try:
            self.model = torch.jit.load(str(path), map_location=device).eval()
        except Exception as e:
            raise WeightsError(f"{path}: not a TorchScript Inception detector ({type(e).__name__}: {e})") from e
        self.path, self.device = path, device

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, batch_size: int = 64) -> np.ndarray:
        out = []
        for chunk in images.split(batch_size):
            x = ((chunk.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # the detector expects uint8 images
            out.append(self.model(x.to(self.device), return_features=True).float().cpu())
        return torch.cat(out).numpy()


# Backbones in torchvision's `features.N` numbering: (conv index, out channels, kernel, stride, padding); "M" = max
# pool; LPIPS taps the ReLU after each listed tap index (Zhang et al. use relu1..5 for AlexNet, relu_k_2/3 for VGG).
_NETS = {
    "alex": dict(layers=[(0, 64, 11, 4, 2), "M2", (3, 192, 5, 1, 2), "M5", (6, 384, 3, 1, 1), (8, 256, 3, 1, 1),
                         (10, 256, 3, 1, 1)], taps=[0, 3, 6, 8, 10], pool=dict(kernel_size=3, stride=2)),
    "vgg": dict(layers=[(0, 64), (2, 64), "M4", (5, 128), (7, 128), "M9", (10, 256), (12, 256), (14, 256), "M16",
                        (17, 512), (19, 512), (21, 512), "M23", (24, 512), (26, 512), (28, 512)],
                taps=[2, 7, 14, 21, 28], pool=dict(kernel_size=2, stride=2)),
}
# LPIPS's input scaling layer: its inputs are in [-1, 1]; these undo that and apply ImageNet normalisation.
_SHIFT = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
_SCALE = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)


def _read(path: Path) -> dict:
    if not path.is_file():
        raise WeightsError(f"LPIPS weights not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsError(f"{path}: not a tensor-only state dict ({type(e).__name__}: {e})") from e
    return sd.get("state_dict", sd)


class LPIPS:
    """LPIPS v0.1 (lin) distance with an AlexNet or VGG16 backbone; images (N, 3, H, W) in [-1, 1]."""

    def __init__(self, backbone: str | Path, linear: str | Path, net: str = "vgg", size: int | None = 256, device="cpu"):
        if net not in _NETS:
            raise WeightsError(f"lpips net {net!r}: expected one of {sorted(_NETS)}")
        spec, sd, lin = _NETS[net], _read(Path(backbone).expanduser()), _read(Path(linear).expanduser())
        self.net, self.size, self.convs, self.lins = net, size, [], []
        in_ch = 3
        for layer in spec["layers"]:
            if isinstance(layer, str):
                self.convs.append(None)  # max pool
                continue
            idx, out_ch, *geom = layer
            k, s, p = geom if geom else (3, 1, 1)
            w, b = sd.get(f"features.{idx}.weight"), sd.get(f"features.{idx}.bias")
            if w is None or b is None or tuple(w.shape) != (out_ch, in_ch, k, k):
                got = None if w is None else tuple(w.shape)
                raise WeightsError(f"{backbone}: features.{idx}.weight should be {(out_ch, in_ch, k, k)} for {net}, got {got}")
            self.convs.append((idx, w.float().to(device), b.float().to(device), s, p))
            in_ch = out_ch
        tap_channels = [c[1].shape[0] for c in self.convs if c is not None and c[0] in spec["taps"]]
        for i, ch in enumerate(tap_channels):
            w = lin.get(f"lin{i}.model.1.weight", lin.get(f"lin{i}.model.0.weight"))  # .0 when saved without dropout
            if w is None or tuple(w.shape) != (1, ch, 1, 1):
                raise WeightsError(f"{linear}: lin{i}.model.1.weight should be (1, {ch}, 1, 1) for {net}, "
                                   f"got {None if w is None else tuple(w.shape)}")
            self.lins.append(w.float().to(device))
        self.taps, self.pool, self.device = spec["taps"], spec["pool"], device

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch_size: int = 32) -> list[torch.Tensor]:
        """Unit-normalised tap features: a list of 5 tensors (N, C_l, H_l, W_l)."""
        outs = []
        for x in images.float().split(batch_size):
            x = x.to(self.device)
            if self.size and x.shape[-1] != self.size:
                x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
            x = (x - _SHIFT.to(x.device)) / _SCALE.to(x.device)
            taps = []
            for c in self.convs:
                if c is None:
                    x = F.max_pool2d(x, **self.pool)
                    continue
                idx, w, b, s, p = c
                x = F.relu(F.conv2d(x, w, b, stride=s, padding=p))
                if idx in self.taps:
                    taps.append(x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))  # eps as in lpips' normalize_tensor
            outs.append(taps)
        return [torch.cat([o[i] for o in outs]) for i in range(len(self.taps))]

    @torch.no_grad()
    def distance(self, fa: list[torch.Tensor], fb: list[torch.Tensor]) -> torch.Tensor:
        """LPIPS between feature lists of equal batch size (or one broadcast side): (N,)."""
        return sum(F.conv2d((a - b) ** 2, w).mean((1, 2, 3)) for a, b, w in zip(fa, fb, self.lins))

    def __call__(self, a: torch.Tensor, b: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
        """LPIPS(a[i], b[i]) for image batches (N, 3, H, W) in [-1, 1]: (N,). Features live one chunk at a time."""
        return torch.cat([self.distance(self.features(x), self.features(y)).cpu()
                          for x, y in zip(a.split(batch_size), b.split(batch_size))])


def _take(feats: list[torch.Tensor], idx) -> list[torch.Tensor]:
    return [f[idx] for f in feats]


def intra_lpips(lp: LPIPS, outputs: torch.Tensor, train_images: torch.Tensor, batch_size: int = 32) -> dict:
    """Ojha et al. 2021: cluster outputs to their nearest training image by LPIPS; mean pairwise LPIPS per cluster.

    outputs (N, 3, H, W), train_images (K, 3, H, W), both in [-1, 1]. Memory stays at two chunks of features
    (one image's VGG taps at 256 px are 32 MB), at the price of recomputing features for the pairs.
    Returns {"intra_lpips": mean over clusters with >= 2 members, "intra_lpips_clusters_used": int,
    "intra_lpips_cluster_sizes": list}.
    """
    ft = lp.features(train_images)
    k = len(train_images)
    assign = []
    for chunk in outputs.split(batch_size):
        fc = lp.features(chunk)
        assign.append(torch.stack([lp.distance(fc, _take(ft, [j])) for j in range(k)], 1).argmin(1).cpu())  # (B, K) -> (B,)
    assign = torch.cat(assign)
    per_cluster, sizes = [], []
    for j in range(k):
        members = outputs[assign == j]
        sizes.append(len(members))
        if len(members) < 2:
            continue
        total, count = 0.0, 0
        blocks = list(members.split(batch_size))
        for bi, block_a in enumerate(blocks):
            fa = lp.features(block_a)
            for bj in range(bi, len(blocks)):
                fb = fa if bj == bi else lp.features(blocks[bj])
                for i in range(len(block_a)):  # row i of block a against block b (upper triangle inside a block)
                    d = lp.distance(_take(fa, [i]), fb)
                    d = d[i + 1:] if bj == bi else d
                    total, count = total + float(d.sum()), count + len(d)
        per_cluster.append(total / count)
    value = float(np.mean(per_cluster)) if per_cluster else float("nan")
    return {"intra_lpips": value, "intra_lpips_clusters_used": len(per_cluster), "intra_lpips_cluster_sizes": sizes}


# CLIP's image normalisation (OpenAI's preprocessing; the same constants as transformers' OPENAI_CLIP_MEAN/STD).
_CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
_CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)


class Clip:
    """Normalised CLIP image and text embeddings from a transformers CLIPModel folder or hub id."""

    def __init__(self, name: str, device="cpu"):
        from transformers import AutoTokenizer, CLIPModel
        try:
            self.model = CLIPModel.from_pretrained(name).eval().to(device)
            self.tokenizer = AutoTokenizer.from_pretrained(name)
        except Exception as e:
            raise WeightsError(f"CLIP model {name!r}: could not load a CLIPModel and its tokenizer ({type(e).__name__}: {e})") from e
        if Path(name).is_dir():  # transformers draws a weight the folder lacks at random and only warns
            from adapt import model
            try:
                model.verify_weights(self.model, name)
            except model.ModelError as e:
                raise WeightsError(f"CLIP model {e}") from e
        self.size, self.device = int(self.model.config.vision_config.image_size), device

    @staticmethod
    def _embed(out) -> torch.Tensor:
        e = out if torch.is_tensor(out) else out.pooler_output  # transformers >= 5 returns the projection as pooler_output
        return F.normalize(e.float(), dim=-1)

    @torch.no_grad()
    def images(self, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> (N, D): resize the short side to CLIP's size (bicubic), centre crop, normalise."""
        out = []
        for x in images.float().split(batch_size):
            x = x.to(self.device)
            h, w = x.shape[-2:]
            scale = self.size / min(h, w)
            x = F.interpolate((x + 1) / 2, size=(round(h * scale), round(w * scale)), mode="bicubic", align_corners=False)
            top, left = (x.shape[-2] - self.size) // 2, (x.shape[-1] - self.size) // 2
            x = x[..., top:top + self.size, left:left + self.size].clamp(0, 1)
            x = (x - _CLIP_MEAN.to(x.device)) / _CLIP_STD.to(x.device)
            out.append(self._embed(self.model.get_image_features(pixel_values=x)).cpu())
        return torch.cat(out)

    @torch.no_grad()
    def texts(self, texts: list[str]) -> torch.Tensor:
        tok = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(self.device)
        return self._embed(self.model.get_text_features(input_ids=tok.input_ids, attention_mask=tok.attention_mask)).cpu()


def clip_score(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """CLIPScore per image: 100 · max(cos, 0); both embeddings normalised, text_emb (D,) or (N, D)."""
    return 100 * (image_emb * text_emb).sum(-1).clamp(min=0)


def clip_direction(out_emb: torch.Tensor, in_emb: torch.Tensor, target_emb: torch.Tensor, source_emb: torch.Tensor) -> torch.Tensor:
    """Directional CLIP similarity per image, in [-1, 1]: cos(E_I(out) - E_I(in), E_T(target) - E_T(source))."""
    return F.cosine_similarity(out_emb - in_emb, (target_emb - source_emb).expand_as(out_emb), dim=-1)
