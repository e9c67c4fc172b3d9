"""`adapt eval`: strength x scale x sampling-mode sweeps of img2img on held-out sources, against the
base at the same strength. The report (aggregates, frontier, recommendation, files) is `adapt.report`;
the synthetic benchmark's ground-truth judges are `adapt.synthbench`; the command line is in `adapt.cli`.

For every (strength, scale, mode, seed) each source image is run through img2img with fixed noise
(seed `1000·seed + i`), so scale 0 (the base) and the adapter see identical noise. Modes:
  plain    img2img as diffusers runs it
  masked   the adapter's own edit mask (adapt.masking: DiffEdit-style, computed once per image), latent
           blending inside it and, with mask_paste, the input pasted back outside it
Per output we measure
  target reach   the domain classifier's verdict (adapt.classifier); with the benchmark's geometry also the lens
                 detector (the headline) and the shape check (two lenses and a bridge)
  preservation   SSIM / PSNR / L2 to the input, overall and outside the eye band, and colour drift there
  distance       KID to real target images on classifier features and on 16x16 pixels
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from adapt import classifier, config, data, decoder, lora, masking, metrics, model, perceptual, report as rep, sample, synthbench
from adapt.facts import AdapterFacts


def _interrupted(path: Path) -> bool:
    """A report left by a Ctrl-C'd sweep: running the same command again replaces it without overwrite=true."""
    try:
        return json.loads(path.read_text()).get("status") == "interrupted"
    except (OSError, ValueError, AttributeError):
        return False


def _arr(pixels: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) in [0, 1]."""
    return ((pixels.permute(0, 2, 3, 1).numpy() + 1) / 2).clip(0, 1)


def _per_image(outs: np.ndarray, inputs: np.ndarray, faces, masks) -> dict:
    """Per-image preservation (and, with geometry, the benchmark's judges): each (N,)."""
    m: dict = {}
    for i, (o, x) in enumerate(zip(outs, inputs)):
        smap = metrics.ssim_map(o, x)
        vals = {"ssim": float(smap.mean()), "psnr": metrics.psnr(o, x), "l2": metrics.mse(o, x)}
        if faces is not None:
            vals.update(synthbench.judge(o, x, smap, faces[i], masks, i))
        for k, v in vals.items():
            m.setdefault(k, []).append(v)
    return {k: np.array(v) for k, v in m.items()}


def _square(images: list[np.ndarray], res: int) -> np.ndarray:
    """(N, res, res, 3): each (H, W, 3) image's centre square at `res` (the identity for square inputs at res)."""
    from PIL import Image
    out = []
    for x in images:
        if x.shape[:2] != (res, res):
            img = data.fit(Image.fromarray((x * 255).round().astype(np.uint8)), res)[0]
            x = np.asarray(img, dtype=np.float32) / 255.0
        out.append(x)
    return np.stack(out)


def _downsample(x: np.ndarray, size: int = 16) -> np.ndarray:
    t = torch.from_numpy(x).permute(0, 3, 1, 2).float()
    return torch.nn.functional.adaptive_avg_pool2d(t, size).flatten(1).numpy()


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C during the sweep, after the finished settings were written; the message says where."""


def _classifier_images(source: str, res: int, split: str, n: int, log) -> torch.Tensor:
    """The images the domain classifier learns from. A folder split as Hugging Face datasets reads it (train/,
    test/) rarely has a split named for the classifier: it then learns from the training split, never from the
    evaluated one, and the log says so."""
    try:
        return data.load(source, res, split, num_images=n, logger=lambda m: None)[0]
    except data.MissingSplit as e:
        if "train" not in e.found:
            raise
        log(f"domain classifier: {source} has no {split!r} split (splits: {', '.join(e.found)}); it learns from 'train'")
        return data.load(source, res, "train", num_images=n, logger=lambda m: None)[0]


def curves(cfg: config.EvalConfig) -> list[tuple[float, str]]:
    """(scale, mode) series swept at every strength: the base (scale 0) only plain, adapters in every mode."""
    return [(c, m) for c in cfg.scales for m in cfg.modes if c > 0 or m == "plain"]


def run(cfg: config.EvalConfig, progress: bool = True, log=print) -> dict:
    """Run the sweep and write every output file into cfg.out; returns the report."""
    t0 = time.time()
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise config.ConfigError(f"out: {out} is a file, not a folder")
    if (out / "report.json").exists() and not cfg.overwrite and not _interrupted(out / "report.json"):
        raise config.ConfigError(f"out: {out} already holds a report; pass overwrite=true or another --out")
    cfg = dataclasses.replace(cfg, adapter=lora.locate(cfg.adapter))  # a hub id: its snapshot folder
    out.mkdir(parents=True, exist_ok=True)
    facts = lora.facts(cfg.adapter) or AdapterFacts(architecture="sd")  # trained elsewhere: nothing recorded
    base = cfg.base or facts.base
    if not base:
        raise config.ConfigError("base: the adapter stores no base model; pass --base")
    steps = cfg.steps or facts.inference_steps or 50
    sched = cfg.scheduler or facts.scheduler or "ddim"
    empty = [s for s in cfg.strengths if int(steps * s) < 1]
    if empty:
        raise config.ConfigError(f"strengths {empty}: img2img at {steps} steps runs int(steps x strength) = 0 steps; "
                                 f"the smallest usable strength is {1 / steps:g}")
    device = model.pick_device(cfg.device)
    pipe, bf = model.load_base(base, torch_dtype=model.pick_dtype(cfg.dtype, device))
    pipe.to(device)
    name = lora.load_into(pipe, cfg.adapter, 1.0, adapter_name="adapter", base_resolved=bf.resolved, log=log)
    try:  # the adapter's rows decode with the VAE decoder tuned on its domain, when it ships one; the base's rows not
        tuned = decoder.load(cfg.adapter, pipe.vae) if cfg.adapter_decoder else None
    except decoder.DecoderError as e:
        raise config.ConfigError(str(e)) from None
    tuned_path = decoder.find(cfg.adapter) if tuned is not None else None
    if tuned is not None:
        log(f"decoder: {tuned_path} (tuned on the target domain) for the adapter's rows; the base's for scale 0")
    res = bf.sample_size
    warnings = []

    src_px, src_rec, _ = data.load(cfg.source, res, cfg.source_split, caption_column=cfg.caption_column,
                                   num_images=cfg.num_images, logger=log)
    tgt_px, tgt_rec, _ = data.load(cfg.target, res, cfg.target_split, num_images=cfg.num_target, logger=log)
    if len(tgt_px) < 2:
        raise data.DataError(f"target {cfg.target} (split {cfg.target_split}): {len(tgt_px)} usable image(s); KID needs at least 2")
    trained = set(facts.image_fingerprints)
    src_fp = data.image_fingerprints(src_px)
    for label, fp, recs in (("source", src_fp, src_rec), ("target", data.image_fingerprints(tgt_px), tgt_rec)):
        # content hashes (adapters since 0.9), and hashes of the sized pixels that earlier adapters recorded
        overlap = trained & (set(fp) | {r.extra["content_hash"] for r in recs})
        if overlap:
            warnings.append(f"{len(overlap)} {label} evaluation images are identical to the adapter's training images "
                            f"(dataset fingerprint {facts.dataset_fingerprint}); use a held-out split")
    for w in warnings:
        log("WARNING: " + w)

    # Domain classifier on a separate split of real source vs real target images.
    cs = _classifier_images(cfg.source, res, cfg.classifier_split, cfg.classifier_images, log)
    ct = _classifier_images(cfg.target, res, cfg.classifier_split, cfg.classifier_images, log)
    # A folder has no splits: the classifier learns the very sources it then judges (as "source"), which biases reach
    # low. A cross-validated classifier judges each of their outputs with the fold model that did not learn its
    # source (cross-fitting) and keeps every image to learn from; otherwise they are left out when enough others
    # remain, and the report says so when not.
    src_in_cs = None  # per evaluated source: its row in cs, or -1
    cs_row = {f: j for j, f in enumerate(data.image_fingerprints(cs))}
    shared = [cs_row[f] for f in src_fp if f in cs_row]
    if shared and classifier.cross_validates(len(cs), len(ct)):
        src_in_cs = [cs_row.get(f, -1) for f in src_fp]
        log(f"domain classifier: {len(shared)} of its {len(cs)} source images are evaluated sources ({cfg.source} has "
            f"no separate '{cfg.classifier_split}' split); each of their outputs is judged by the cross-validation model "
            "that did not learn its source")
    elif shared and len(cs) - len(shared) >= 8:
        log(f"domain classifier: {len(shared)} of its {len(cs)} source images are evaluated sources ({cfg.source} "
            f"has no separate '{cfg.classifier_split}' split); left out, so it judges faces it has not seen")
        cs = cs[[j for j in range(len(cs)) if j not in set(shared)]]
    elif shared:
        warnings.append(f"the domain classifier was trained on the evaluated source images ({len(shared)} of "
                        f"{len(cs)}; {cfg.source} has no separate '{cfg.classifier_split}' split and too few others): "
                        "classifier reach may read low; give the source more images than num_images")
        log("WARNING: " + warnings[-1])
    # The sources, and whether the benchmark's lens detector (not the classifier) can judge reach on them.
    # Each source runs at its own aspect within res² pixels; preservation is measured at that size, and the
    # classifier, KID and perceptual metrics see the centre square of each output (`_square`).
    src_images = [sample.fit_budget(r.load(), res, bf.vae_factor) for r in src_rec]
    square = all(img.size == (res, res) for img in src_images)
    inputs = [sample.to_array(img) for img in src_images]
    faces = synthbench.faces_of(src_rec)
    if faces is not None and synthbench.faces_of(tgt_rec) is None:  # the benchmark's faces toward a user's own domain
        faces = None
        warnings.append(f"the sources carry the synthetic benchmark's face geometry but the target ({cfg.target}) is not "
                        "its renders: the lens detector, shape check and eye band judge only that benchmark; the domain "
                        "classifier judges reach and preservation is over the whole image")
        log("note: " + warnings[-1])
    elif faces is not None and not square:
        faces = None
        warnings.append("the benchmark's lens detector and shape check need square sources at the base's resolution; "
                        "not computed for these non-square sources")

    base_only = lambda: lora.applied(pipe, [name], [0.0], fuse=False)  # the judge sees images, never the adapter
    clf = classifier.train(cs, ct, vae=pipe.vae, kind=cfg.classifier, features=classifier.BaseFeatures(pipe, base_only))
    lo, hi = clf.accuracy_ci
    log(f"domain classifier ({clf.kind}): accuracy {clf.accuracy:.3f} [{lo:.2f}, {hi:.2f}] by {clf.validation} on "
        f"{clf.n_heldout} real images ({len(cs)} source, {len(ct)} target; raw and VAE round-tripped)")
    report = {"version": rep.REPORT_VERSION, "status": "ok",
              "settings": {**config.to_dict(cfg), "base": base, "steps": steps, "scheduler": sched,
                           # a hub adapter as org/name@commit, not this machine's cache folder: the report's
                           # `adapt sample --recommended` line then works anywhere
                           "adapter": lora.hub_id(cfg.adapter) or cfg.adapter,
                           "adapter_sha256": lora.weights_sha256(cfg.adapter),
                           "decoder": str(tuned_path) if tuned_path else None,
                           "noise_seeds": [1000 * s for s in range(cfg.seeds)], "n_source": len(src_rec),
                           "n_target": len(tgt_px), "n_classifier": clf.n_train},
              "versions": rep.versions(), "classifier_accuracy": clf.accuracy,
              "classifier": {"kind": clf.kind, "accuracy_ci": clf.accuracy_ci, "validation": clf.validation,
                             "n_heldout": clf.n_heldout, "n_source": len(cs), "n_target": len(ct)},
              "warnings": warnings, "optional_metrics": {}}
    if clf.accuracy < cfg.min_classifier_accuracy:
        weak = (f"domain classifier ({clf.kind}) accuracy {clf.accuracy:.3f} [{lo:.2f}, {hi:.2f}] by {clf.validation} on "
                f"{clf.n_heldout} real images ({len(cs)} source, {len(ct)} target) < min_classifier_accuracy "
                f"{cfg.min_classifier_accuracy}")
        if faces is None:  # it is the only judge of reach: nothing this sweep would measure could be trusted
            other = "scratch" if clf.kind == "base_features" else "base_features"
            report.update(status="refused", reason=f"{weak}: its target-reach verdicts would be unreliable (more or "
                          f"cleaner classifier images, or domains that differ visibly, are needed; classifier={other} "
                          "tries the other kind of judge)")
            rep.write(out, report)
            return report
        warnings.append(f"{weak}: its reach column (clf) is unreliable; the lens detector judges reach here")
        log("WARNING: " + warnings[-1])

    masks = synthbench.Masks.of(faces, res) if faces is not None else None
    report["has_masks"] = faces is not None
    report["source_sizes"] = sorted({f"{w}x{h}" for w, h in (img.size for img in src_images)})
    prompts = [cfg.prompt.format(caption=r.caption) for r in src_rec]
    def ceiling_of(vae) -> dict:  # preservation of that VAE's encode-decode alone, on the sources
        rt = [_arr(classifier.vae_roundtrip(vae, torch.from_numpy(x).permute(2, 0, 1)[None] * 2 - 1))[0] for x in inputs]
        return {k: float(v.mean()) for k, v in _per_image(rt, inputs, faces, masks).items()
                if k in ("ssim", "psnr", "l2", "ssim_out", "psnr_out")}
    report["vae_ceiling"] = ceiling_of(pipe.vae)
    if tuned is not None:  # the adapter's rows decode with this one: what it costs plain img2img outside the edit
        report["adapter_vae_ceiling"] = ceiling_of(tuned)
    tgt_feat, tgt_pix = clf.features(tgt_px), _downsample(_arr(tgt_px))
    perc = _perceptual_setup(cfg, facts, res, src_px, tgt_px, report, log, device)
    opt = report["optional_metrics"]
    for k, v in opt.items():
        if not v.startswith("not computed"):
            log(f"{k}: {v}")
    if any(v.startswith("not computed") for v in opt.values()):
        log(f"not computed (no weights given): {', '.join(k for k, v in opt.items() if v.startswith('not computed'))}")

    edit_mask, mask_stats = None, {}
    if "masked" in cfg.modes:  # the adapter's own edit region, once per image (it depends on image and prompt only)
        settings = cfg.mask_settings()
        edit_mask = masking.auto_mask(pipe, src_images, prompts, [name], settings)
        px = [masking.pixel_mask(m[None], img.size[::-1], 0)[0, 0].numpy() > 0.5 for m, img in zip(edit_mask, src_images)]
        mask_stats["mask_area"] = np.array([p.mean() for p in px])
        if masks is not None:
            mask_stats["mask_outside_band"] = np.array([synthbench.outside_band_share(p, b) for p, b in zip(px, masks.band)])
        log(f"edit masks (adapter-guided, t={settings.timestep}, threshold {settings.threshold}, close {settings.close}, dilate {settings.dilate}): "
            f"mean area {mask_stats['mask_area'].mean():.1%}"
            + (f", {mask_stats['mask_outside_band'].mean():.0%} of it outside the eye band" if masks is not None else ""))

    per = {}  # (strength, scale, mode) -> dict of (seeds, N) arrays
    grid_imgs = {}
    runs = [(s, c, m) for s in cfg.strengths for c, m in curves(cfg)]
    from tqdm.auto import tqdm
    bar = tqdm(total=len(runs) * cfg.seeds, desc="eval sweep", disable=not progress, mininterval=2.0)
    stopped = False
    try:  # Ctrl-C keeps the settings already measured (below)
        for strength, scale, mode in runs:
            acc: dict = {}
            outs_all = []
            masked = mode == "masked"
            for seed in range(cfg.seeds):
                with lora.applied(pipe, [name], [scale], fuse=cfg.fuse), decoder.swapped(pipe, tuned if scale > 0 else None):
                    outs = sample.img2img(pipe, src_images, prompts, strength, steps, cfg.guidance, 1000 * seed, sched,
                                          batch_size=cfg.batch_size, mask=edit_mask if masked else None,
                                          paste_blur=cfg.mask_blur if masked and cfg.mask_paste else None, blend=cfg.mask_blend)
                if seed == 0:
                    grid_imgs[(strength, scale, mode)] = outs[:4]
                arr = [sample.to_array(o) for o in outs]
                m = _per_image(arr, inputs, faces, masks)
                arr = _square(arr, res)  # (N, res, res, 3)
                outs_all.append(arr)
                x = torch.from_numpy(arr).permute(0, 3, 1, 2).float() * 2 - 1
                prob, m["feat"] = clf.judge(x, sources=src_in_cs)  # the judge's verdicts and KID features at once
                m["reach"] = (prob > 0.5).astype(float)
                if masked:
                    m.update(mask_stats)
                for k, v in m.items():
                    acc.setdefault(k, []).append(v)
                bar.update(1)
            done = {k: np.stack(v) for k, v in acc.items()}
            done["pix"] = _downsample(np.concatenate(outs_all))
            done["perceptual"] = _perceptual_row(perc, np.stack(outs_all))
            per[(strength, scale, mode)] = done  # one assignment: a setting is in `per` whole or not at all
    except KeyboardInterrupt:
        stopped = True
    bar.close()

    rows = []
    for key in [k for k in runs if k in per]:  # all of them, unless interrupted
        p = per[key]
        rows.append({**rep.aggregate(*key, {k: v for k, v in p.items() if k != "perceptual"}, tgt_feat, tgt_pix, faces is not None),
                     **p["perceptual"]})
    rep.add_deltas(rows)
    rep.mark_frontier(rows, faces is not None)
    report["rows"] = rows
    if stopped:
        report.update(status="interrupted", seconds=round(time.time() - t0, 1),
                      reason=f"interrupted (Ctrl-C) after {len(rows)} of {len(runs)} settings; the rows hold those, whole "
                             "(every seed and image); nothing is recommended from a partial sweep; the same command "
                             "runs it again")
        rep.write(out, report)
        raise SweepInterrupted(f"interrupted: {len(rows)} of {len(runs)} settings were measured and are in {out / 'report.json'} "
                               "(status 'interrupted', no recommendation); the same command runs the sweep again")
    report["spearman"] = rep.spearman(cfg.strengths, per, curves(cfg), faces is not None)
    report["recommended"] = rep.recommend(rows, cfg.preservation_threshold, faces is not None)
    report["seconds"] = round(time.time() - t0, 1)
    from adapt import plots
    plots.curves(rows, report["vae_ceiling"], out / "curves.png", faces is not None)
    plots.pareto(rows, out / "pareto.png", faces is not None, report["recommended"])
    plots.sweep_grid(src_images[:4], grid_imgs, cfg.strengths, curves(cfg), out / "grid.png")
    rep.write(out, report)
    return report


def _weights_id(path) -> str:
    from adapt.provenance import file_sha256
    return f"{path} (sha256 {file_sha256(path)[:12]})"


def _perceptual_setup(cfg, facts, res, src_px, tgt_px, report, log, device) -> dict:
    """Load the CLIP / FID / LPIPS weights the config names; record in report['optional_metrics'] what runs and why not."""
    status, perc = report["optional_metrics"], {}
    if cfg.clip_model:
        clip = perc["clip"] = perceptual.Clip(cfg.clip_model, device)
        perc["clip_src"], perc["clip_target"] = clip.images(src_px), clip.texts([cfg.clip_target_text])[0]
        status["clip_score"] = f"computed: {cfg.clip_model} against {cfg.clip_target_text!r}"
        if cfg.clip_source_text:
            perc["clip_source"] = clip.texts([cfg.clip_source_text])[0]
            status["clip_direction"] = f"computed: {cfg.clip_model}, {cfg.clip_source_text!r} -> {cfg.clip_target_text!r}"
        else:
            status["clip_direction"] = "not computed: set clip_source_text"
    else:
        status["clip_score"] = status["clip_direction"] = "not computed: set clip_model (a CLIPModel folder) and clip_target_text"
    if cfg.fid_inception:
        perc["inception"] = perceptual.InceptionFeatures(cfg.fid_inception, device)
        perc["tgt_incep"] = perc["inception"](tgt_px)
        status["fid"] = f"computed: {_weights_id(cfg.fid_inception)}; {len(tgt_px)} target images as reference"
    else:
        status["fid"] = "not computed: set fid_inception to a TorchScript Inception file (weights are not shipped)"
    if not cfg.lpips_backbone:
        status["lpips"] = status["intra_lpips"] = "not computed: set lpips_backbone and lpips_linear (weights are not shipped)"
        return perc
    perc["lpips"] = perceptual.LPIPS(cfg.lpips_backbone, cfg.lpips_linear, cfg.lpips_net, cfg.lpips_size, device)
    perc["src_px"] = src_px
    status["lpips"] = f"computed: {_weights_id(cfg.lpips_backbone)} + {_weights_id(cfg.lpips_linear)}; net {cfg.lpips_net}"
    train = cfg.intra_lpips_train or facts.dataset
    if not train:
        status["intra_lpips"] = "not computed: the adapter records no training dataset; set intra_lpips_train"
        return perc
    split = (facts.dataset_split or "train") if not cfg.intra_lpips_train else "train"
    perc["train_px"], _, _ = data.load(train, res, split, logger=lambda m: None)
    status["intra_lpips"] = f"computed: {len(perc['train_px'])} training images of {train} (split {split}) as cluster centres"
    return perc


def _perceptual_row(perc, outs) -> dict:
    """fid, clip_*, preservation_lpips and intra_lpips for one (strength, scale); outs: (seeds, N, H, W, 3) in [0, 1]."""
    if not perc:
        return {}
    seeds, n = outs.shape[:2]
    x = torch.from_numpy(outs.reshape(seeds * n, *outs.shape[2:])).permute(0, 3, 1, 2).float() * 2 - 1  # (S·N, 3, H, W)
    row = {}
    if "inception" in perc:
        row["fid"] = perceptual.fid(perc["inception"](x), perc["tgt_incep"])
    if "clip" in perc:
        emb = perc["clip"].images(x)
        row["clip_score"] = float(perceptual.clip_score(emb, perc["clip_target"]).mean())
        if "clip_source" in perc:
            src = perc["clip_src"].repeat(seeds, 1)  # output k pairs with input k mod N
            row["clip_direction"] = float(perceptual.clip_direction(emb, src, perc["clip_target"], perc["clip_source"]).mean())
    if "lpips" in perc:
        src = perc["src_px"].repeat(seeds, 1, 1, 1)  # output k pairs with input k mod N
        row["preservation_lpips"] = float(perc["lpips"](x, src).mean())
        if "train_px" in perc:
            row.update(perceptual.intra_lpips(perc["lpips"], x, perc["train_px"]))
    return row


