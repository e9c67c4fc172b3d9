"""Measure the embedded base's quality bars and write them to figures.json (its zoo README quotes them).

    python recipes/evaluate_base.py [--base tiny-faces] [--n 64] [--ceiling-n 256] [--out adapt/zoo/tiny-faces]

Bars (issue: the embedded base): VAE PSNR on held-out faces, scaled latent std on source data,
a txt2img sample grid, KID of txt2img samples vs held-out real faces (next to real-vs-real KID),
img2img SSIM at strength 0.3-0.5, and the control: prompted "wearing sunglasses", the base must
not draw sunglasses (ground-truth lens detector).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

import adapt
from adapt import atomic, cache, classifier, data, metrics, model, sample, synth, synthbench


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="tiny-faces")
    ap.add_argument("--n", type=int, default=64, help="held-out images per measurement")
    ap.add_argument("--ceiling-n", type=int, default=256,
                    help="sunglasses renders for the lens-shape ceiling (a pass rate near 0.2: 64 leaves +-0.1)")
    ap.add_argument("--out", default=None, help="folder for figures.json and samples.png (default: the base folder)")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    adapt.quiet()
    t0 = time.time()
    pipe, facts = model.load_base(a.base)
    out = Path(a.out or facts.resolved)
    out.mkdir(parents=True, exist_ok=True)
    n = a.n
    faces, recs, _ = data.load("datasets/synth_faces", 64, "eval", num_images=n, logger=lambda m: None)
    real_b, _, _ = data.load("datasets/synth_faces", 64, "classifier", num_images=n, logger=lambda m: None)
    figs = {"n": n}

    # VAE reconstruction and latent statistics on held-out source faces.
    rec = classifier.vae_roundtrip(pipe.vae, faces)
    x, r = (faces.permute(0, 2, 3, 1).numpy() + 1) / 2, (rec.permute(0, 2, 3, 1).numpy() + 1) / 2
    figs["vae_psnr_db"] = float(np.mean([metrics.psnr(r[i], x[i]) for i in range(n)]))
    stats = cache.latent_stats(cache.encode_posteriors(pipe.vae, faces), facts.scaling_factor, facts.shift_factor)
    figs["scaled_latent_std"] = stats["overall_std"]
    # The lens-shape ceiling: a real sunglasses render through this VAE and back, judged by the shape check
    # against the same face without glasses; no adapter drawing through this VAE can do better.
    nc = a.ceiling_n
    ceil_src, srecs, _ = data.load("datasets/synth_faces", 64, "eval", num_images=nc, logger=lambda m: None)
    tgt, _, _ = data.load("datasets/synth_sunglasses", 64, "eval", num_images=nc, logger=lambda m: None)
    xs = (ceil_src.permute(0, 2, 3, 1).numpy() + 1) / 2
    tr = (classifier.vae_roundtrip(pipe.vae, tgt).permute(0, 2, 3, 1).numpy() + 1) / 2
    fcs = synthbench.faces_of(srecs)
    passed = np.array([synthbench.shape(tr[i], xs[i], fcs[i], synth.skin_mask(fcs[i]))["passed"] for i in range(nc)], float)
    figs["vae_sunglasses_shape_ceiling"] = float(passed.mean())
    figs["vae_sunglasses_shape_ceiling_n"] = nc
    figs["vae_sunglasses_shape_ceiling_ci95"] = metrics.bootstrap_ci(passed)
    figs["scaled_latent_channel_mean"] = stats["channel_mean"]
    figs["scaled_latent_channel_std"] = stats["channel_std"]

    # txt2img samples from held-out captions; KID against real held-out faces, next to real-vs-real.
    captions = [rc.caption for rc in recs]
    gen = sample.txt2img(pipe, captions, steps=50, guidance=3.0, seed=0)
    rows = [gen[i:i + 8] for i in range(0, min(n, 32), 8)]
    grid = sample.grid(rows)
    grid.resize((grid.width * 2, grid.height * 2)).save(out / "samples.png")
    g = np.stack([sample.to_array(im) for im in gen])
    down = lambda arr: torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(arr).permute(0, 3, 1, 2).float(), 16).flatten(1).numpy()
    rb = (real_b.permute(0, 2, 3, 1).numpy() + 1) / 2
    figs["kid_pixels_samples_vs_real"] = metrics.kid(down(g), down(x))[0]
    figs["kid_pixels_real_vs_real"] = metrics.kid(down(rb), down(x))[0]
    # a from-scratch "real vs generated" probe: if it cannot tell them apart, samples look like the domain
    gt = torch.from_numpy(g).permute(0, 3, 1, 2).float() * 2 - 1
    probe = classifier.train(real_b, gt, epochs=15)
    figs["real_vs_generated_probe_accuracy"] = probe.accuracy

    # img2img preservation at moderate strengths, and the control prompt.
    src = [sample.to_pil(rc.load(), 64) for rc in recs]
    for s in (0.3, 0.5):
        outs = sample.img2img(pipe, src, captions, s, 25, 1.0, seed=0)
        figs[f"img2img_ssim_at_{s}"] = float(np.mean([metrics.ssim(sample.to_array(o), x[i]) for i, o in enumerate(outs)]))
    fc = synthbench.faces_of(recs)
    for s in (0.4, 0.6, 0.8):
        outs = sample.img2img(pipe, src, [c + " wearing sunglasses" for c in captions], s, 25, 1.0, seed=0)
        det = [synthbench.lens_darkening(sample.to_array(o), x[i], synth.lens_mask(fc[i]), synth.skin_mask(fc[i]))
               >= synthbench.SUNGLASSES_THRESHOLD for i, o in enumerate(outs)]
        figs[f"control_sunglasses_rate_at_{s}"] = float(np.mean(det))
    gen_sg = sample.txt2img(pipe, [c + " wearing sunglasses" for c in captions[:16]], steps=50, guidance=3.0, seed=0)
    grid = sample.grid([gen_sg[i:i + 8] for i in range(0, len(gen_sg), 8)])
    grid.resize((grid.width * 2, grid.height * 2)).save(out / "samples_prompted_sunglasses.png")
    figs["seconds"] = round(time.time() - t0, 1)
    atomic.write_text(out / "figures.json", json.dumps(figs, indent=1))
    print(json.dumps(figs, indent=1))


if __name__ == "__main__":
    main()
