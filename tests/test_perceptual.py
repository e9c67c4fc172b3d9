"""FID and (Intra-)LPIPS: the math against closed forms and the reference `lpips` package, the weight loaders' errors."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from adapt import perceptual as P


def random_lpips_weights(net, seed=0):
    """Seeded torchvision-layout backbone, LPIPS lin weights and two image batches (3, 3, 64, 64)."""
    g = torch.Generator().manual_seed(seed)
    spec, bb, lin, inc, taps = P._NETS[net], {}, {}, 3, 0
    for layer in spec["layers"]:
        if isinstance(layer, str):
            continue
        idx, out, *geom = layer
        k = geom[0] if geom else 3
        bb[f"features.{idx}.weight"] = torch.randn(out, inc, k, k, generator=g) * (2 / (inc * k * k)) ** 0.5
        bb[f"features.{idx}.bias"] = torch.randn(out, generator=g) * 0.01
        if idx in spec["taps"]:
            lin[f"lin{taps}.model.1.weight"] = torch.rand(1, out, 1, 1, generator=g)
            taps += 1
        inc = out
    x = torch.rand(3, 3, 64, 64, generator=g) * 2 - 1
    y = torch.rand(3, 3, 64, 64, generator=g) * 2 - 1
    return bb, lin, x, y


def write_lpips(tmp_path, net="alex"):
    bb, lin, x, y = random_lpips_weights(net)
    torch.save(bb, tmp_path / f"{net}_backbone.pth")  # torchvision ships .pth; read with weights_only=True
    save_file(lin, str(tmp_path / f"{net}_lin.safetensors"))
    return tmp_path / f"{net}_backbone.pth", tmp_path / f"{net}_lin.safetensors", x, y


# lpips 0.1.4's LPIPS(net=..., pnet_rand=True) with these same weights copied in gives (measured once, CPU fp32):
REFERENCE = {"alex": [0.913191, 0.953729, 0.915745], "vgg": [0.831762, 0.817135, 0.819484]}


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_matches_the_reference_package(tmp_path, net):
    torch.set_num_threads(1)
    backbone, lin, x, y = write_lpips(tmp_path, net)
    lp = P.LPIPS(backbone, lin, net=net, size=None)
    assert lp(x, y).tolist() == pytest.approx(REFERENCE[net], abs=2e-6)
    assert lp(x, x).abs().max() == 0 and torch.allclose(lp(x, y), lp(y, x))


def test_fid_closed_forms():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=4), rng.normal(size=4)
    a, b = rng.uniform(0.5, 2, 4), rng.uniform(0.5, 2, 4)  # diagonal covariances commute: sum (sqrt a - sqrt b)^2
    want = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert P.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, rel=1e-10)
    m = rng.normal(size=(4, 4))
    s = m @ m.T + np.eye(4)  # S2 = c^2 S1: Tr(S1 + c^2 S1 - 2c S1) = (1 - c)^2 Tr S1
    assert P.frechet_distance(mu1, s, mu1, 9 * s) == pytest.approx(4 * np.trace(s), rel=1e-10)
    f = rng.normal(size=(200, 8))
    assert abs(P.fid(f, f)) < 1e-9 and P.fid(f, f + 1.0) == pytest.approx(8.0, rel=1e-9)
    with pytest.raises(ValueError, match="N >= 2"):
        P.fid(f[:1], f)


class _Detector(torch.nn.Module):
    """The call signature of StyleGAN2-ADA's TorchScript Inception: uint8 images in, (N, D) features out."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 3)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        assert x.dtype == torch.uint8
        return self.conv(x.float() / 255).relu().mean((2, 3))


def test_fid_through_a_torchscript_detector(tmp_path):
    torch.manual_seed(0)
    torch.jit.save(torch.jit.script(_Detector()), str(tmp_path / "inception.pt"))
    det = P.InceptionFeatures(tmp_path / "inception.pt")
    a, b = torch.rand(40, 3, 32, 32) * 2 - 1, torch.rand(40, 3, 32, 32) * 0.5
    fa = det(a, batch_size=16)
    assert fa.shape == (40, 16)
    assert P.fid(fa, det(b)) > 10 * abs(P.fid(fa, det(a.flip(0))))  # a set vs itself, reordered: ~0
    with pytest.raises(P.WeightsError, match="not found"):
        P.InceptionFeatures(tmp_path / "missing.pt")
    (tmp_path / "bad.pt").write_bytes(b"nope")
    with pytest.raises(P.WeightsError, match="bad.pt: not a TorchScript"):
        P.InceptionFeatures(tmp_path / "bad.pt")


def test_intra_lpips_clusters_and_pairs(tmp_path):
    torch.set_num_threads(1)
    backbone, lin, _, _ = write_lpips(tmp_path)
    lp = P.LPIPS(backbone, lin, net="alex", size=None)
    g = torch.Generator().manual_seed(1)
    train = torch.rand(3, 3, 64, 64, generator=g) * 2 - 1
    # outputs: copies of training images 0 and 1, plus noisy variants of image 0
    outs = torch.cat([train[[0, 0, 1]], train[[0, 0, 0]] + 0.3 * torch.randn(3, 3, 64, 64, generator=g)])
    r = P.intra_lpips(lp, outs, train, batch_size=2)  # small batches exercise the blockwise pairs
    assert r["intra_lpips_cluster_sizes"] == [5, 1, 0] and r["intra_lpips_clusters_used"] == 1
    members = outs[[0, 1, 3, 4, 5]]
    pairs = [(i, j) for i in range(5) for j in range(i + 1, 5)]
    brute = float(torch.stack([lp(members[[i]], members[[j]])[0] for i, j in pairs]).mean())
    assert r["intra_lpips"] == pytest.approx(brute, rel=1e-5)
    collapsed = P.intra_lpips(lp, train[[0, 0, 1, 1]], train)  # outputs that copy the training images: 0
    assert collapsed["intra_lpips"] == 0


def test_lpips_weight_errors_name_file_and_key(tmp_path):
    backbone, lin, _, _ = write_lpips(tmp_path)
    with pytest.raises(P.WeightsError, match="features.0.weight should be .*for vgg"):
        P.LPIPS(backbone, lin, net="vgg")  # AlexNet weights given for VGG
    bad = tmp_path / "lin_missing.safetensors"
    save_file({"lin0.model.1.weight": torch.rand(1, 64, 1, 1)}, str(bad))
    with pytest.raises(P.WeightsError, match="lin_missing.safetensors: lin1.model.1.weight"):
        P.LPIPS(backbone, bad, net="alex")
    with pytest.raises(P.WeightsError, match="not found"):
        P.LPIPS(tmp_path / "nope.pth", lin, net="alex")
    import pickle  # a pickle that is not a plain tensor dict is refused by the weights-only loader
    (tmp_path / "evil.pth").write_bytes(pickle.dumps(ValueError("x")))
    with pytest.raises(P.WeightsError, match="evil.pth: not a tensor-only state dict"):
        P.LPIPS(tmp_path / "evil.pth", lin, net="alex")


def save_tiny_clip(path):
    """A small random transformers CLIPModel with its tokenizer, saved the way a downloaded one is."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig
    from adapt.tiny import TINY_WORDS, build_tokenizer
    tok = build_tokenizer(TINY_WORDS + ["photo", "person", "wearing"], max_length=32)
    text = CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                          max_position_embeddings=32, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_clip_score_and_direction_formulas():
    t = torch.nn.functional.normalize(torch.tensor([1.0, 2.0, 0.5]), dim=0)
    ortho = torch.nn.functional.normalize(torch.tensor([2.0, -1.0, 0.0]), dim=0)
    assert P.clip_score(torch.stack([t, ortho, -t]), t).tolist() == pytest.approx([100.0, 0.0, 0.0], abs=1e-4)
    src_t, tgt_t = torch.tensor([1.0, 0, 0]), torch.tensor([0.0, 1, 0])
    inp = torch.tensor([[0.5, 0.5, 0.0]] * 3)
    out = inp + torch.tensor([[-1.0, 1, 0], [1.0, -1, 0], [0.0, 0, 1]])  # along, against, across the text direction
    assert P.clip_direction(out, inp, tgt_t, src_t).tolist() == pytest.approx([1.0, -1.0, 0.0], abs=1e-6)


def test_clip_embeddings_from_a_saved_model(tmp_path):
    torch.set_num_threads(1)
    clip = P.Clip(str(save_tiny_clip(tmp_path / "clip")))
    imgs = torch.rand(3, 3, 64, 64) * 2 - 1
    e = clip.images(imgs, batch_size=2)
    assert e.shape == (3, 16) and torch.allclose(e.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(e, clip.images(imgs)) and not torch.allclose(e[0], e[1])
    t = clip.texts(["a photo of a person", "a photo of a person wearing sunglasses"])
    assert t.shape == (2, 16) and not torch.allclose(t[0], t[1])
    with pytest.raises(P.WeightsError, match="could not load a CLIPModel"):
        P.Clip(str(tmp_path / "missing"))
    # a folder missing a weight: transformers would draw it at random, every score would be noise
    from conftest import rewrite_safetensors
    rewrite_safetensors(tmp_path / "clip" / "model.safetensors",
                        lambda t: {k: v for k, v in t.items() if k != "visual_projection.weight"})
    with pytest.raises(P.WeightsError, match=r"clip: 1 of CLIPModel's .* \(visual_projection\.weight\)"):
        P.Clip(str(tmp_path / "clip"))
