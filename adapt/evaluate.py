"""`adapt eval`: strength x scale sweeps of img2img on held-out sources, against the base at the same strength.

For every (strength, scale, seed) each source image is run through img2img with fixed noise (seed
`1000·seed + i`), so scale 0 (the base) and the adapter see identical noise. Per output we measure
  target reach   a from-scratch domain classifier's verdict (+ the ground-truth lens detector when masks exist)
  preservation   SSIM / PSNR / L2 to the input, overall and outside the edit mask, and colour drift there
  distance       KID to real target images on classifier features and on 16x16 pixels
Aggregates carry bootstrap 95% CIs over images; Spearman ρ ties strength to reach and preservation.

report.json schema (REPORT_SCHEMA below is checked by `validate_report`):
  status                "ok" | "refused" (classifier below min accuracy; `reason` says why)
  settings, versions    the config, seeds and sample counts; library versions
  classifier_accuracy   held-out accuracy of the domain classifier on real images
  vae_ceiling           preservation of a VAE encode-decode alone (the best img2img can do)
  rows                  one per (strength, scale): strength, scale, target_reach, target_reach_ci,
                        preservation_ssim, preservation_ssim_ci, preservation_psnr, preservation_l2,
                        [detector_reach, detector_reach_ci, preservation_ssim_outside_mask,
                         preservation_psnr_outside_mask, colour_drift_outside_mask],
                        kid_features, kid_pixels, and delta_vs_base: {metric: adapter − base}
  spearman              per scale: rho and CI of strength vs target reach and vs preservation
  recommended           {strength, scale, rule, gain_over_base}
  optional_metrics      fid / lpips / intra_lpips / clip_score / clip_direction: "computed: <weights>" or
                        "not computed: <why>"; when computed, rows also carry fid (outputs vs the target
                        images), intra_lpips (Ojha et al. 2021), preservation_lpips (output vs input),
                        clip_score (vs clip_target_text) and clip_direction (edit vs text direction)
  warnings              e.g. evaluation images that overlap the adapter's training data
"""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path

import numpy as np
import torch

from adapt import atomic, classifier, config, data, lora, metrics, model, perceptual, sample, synth
from adapt.facts import AdapterFacts

REPORT_SCHEMA = {
    "status": str, "settings": dict, "versions": dict, "classifier_accuracy": float, "vae_ceiling": dict,
    "rows": list, "spearman": dict, "recommended": dict, "optional_metrics": dict, "warnings": list,
}
ROW_SCHEMA = {"strength": float, "scale": float, "target_reach": float, "target_reach_ci": list,
              "preservation_ssim": float, "preservation_psnr": float, "preservation_l2": float,
              "kid_features": float, "kid_pixels": float, "delta_vs_base": dict, "n_outputs": int}


def validate_report(report: dict) -> None:
    """Raise ValueError naming the first key that is missing or of the wrong type."""
    for k, tp in REPORT_SCHEMA.items():
        if k not in report:
            if report.get("status") == "refused" and k in ("rows", "spearman", "recommended", "vae_ceiling"):
                continue
            raise ValueError(f"report.json: missing key {k!r}")
        if not isinstance(report[k], tp):
            raise ValueError(f"report.json: {k!r} should be {tp.__name__}, got {type(report[k]).__name__}")
    for i, row in enumerate(report.get("rows", [])):
        for k, tp in ROW_SCHEMA.items():
            if not isinstance(row.get(k), tp):
                raise ValueError(f"report.json: rows[{i}].{k} should be {tp.__name__}, got {row.get(k)!r}")
    if report.get("rows") and report["rows"][0].get("preservation_ssim_outside_mask") is None and report.get("has_masks"):
        raise ValueError("report.json: masks exist but rows lack preservation_ssim_outside_mask")


def _arr(pixels: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) in [0, 1]."""
    return ((pixels.permute(0, 2, 3, 1).numpy() + 1) / 2).clip(0, 1)


def _masks(records, size: int):
    """Eye-band, lens and skin masks from metadata eye boxes (the embedded benchmark), else None."""
    if not all("eye_boxes" in r.extra and "face_box" in r.extra for r in records):
        return None
    faces = [synth.Face(seed=r.extra.get("seed", 0), background="", skin=0, hair_colour="", hair_style="", lens_tint="",
                        lens_shape="", face_box=r.extra["face_box"], eye_boxes=r.extra["eye_boxes"]) for r in records]
    return {"band": [synth.eye_mask(f, size) for f in faces], "lens": [synth.lens_mask(f, size) for f in faces],
            "skin": [synth.skin_mask(f, size) for f in faces]}


def _per_image(outs: np.ndarray, inputs: np.ndarray, masks) -> dict:
    """Per-image preservation (and detector) metrics: each (N,)."""
    m = {k: [] for k in ("ssim", "psnr", "l2", "ssim_out", "psnr_out", "drift_out", "lens")}
    for i, (o, x) in enumerate(zip(outs, inputs)):
        smap = metrics.ssim_map(o, x)
        m["ssim"].append(float(smap.mean()))
        m["psnr"].append(metrics.psnr(o, x))
        m["l2"].append(metrics.mse(o, x))
        if masks is not None:
            outside = ~masks["band"][i]
            m["ssim_out"].append(float(smap[outside].mean()))
            m["psnr_out"].append(metrics.psnr(o, x, outside))
            m["drift_out"].append(metrics.colour_drift(o, x, outside))
            m["lens"].append(metrics.lens_darkening(o, x, masks["lens"][i], masks["skin"][i]))
    return {k: np.array(v) for k, v in m.items() if v}


def _downsample(x: np.ndarray, size: int = 16) -> np.ndarray:
    t = torch.from_numpy(x).permute(0, 3, 1, 2).float()
    return torch.nn.functional.adaptive_avg_pool2d(t, size).flatten(1).numpy()


def run(cfg: config.EvalConfig, progress: bool = True, log=print) -> dict:
    """Run the sweep and write every output file into cfg.out; returns the report."""
    t0 = time.time()
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise config.ConfigError(f"out: {out} is a file, not a folder")
    if (out / "report.json").exists() and not cfg.overwrite:
        raise config.ConfigError(f"out: {out} already holds a report; pass overwrite=true or another --out")
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
    res = bf.sample_size
    warnings = []

    src_px, src_rec, _ = data.load(cfg.source, res, cfg.source_split, num_images=cfg.num_images, logger=log)
    tgt_px, _, _ = data.load(cfg.target, res, cfg.target_split, num_images=cfg.num_target, logger=log)
    if len(tgt_px) < 2:
        raise data.DataError(f"target {cfg.target} (split {cfg.target_split}): {len(tgt_px)} usable image(s); KID needs at least 2")
    trained = set(facts.image_fingerprints)
    for label, px in (("source", src_px), ("target", tgt_px)):
        overlap = trained & set(data.image_fingerprints(px))
        if overlap:
            warnings.append(f"{len(overlap)} {label} evaluation images are identical to the adapter's training images "
                            f"(dataset fingerprint {facts.dataset_fingerprint}); use a held-out split")
    for w in warnings:
        log("WARNING: " + w)

    # Domain classifier on a separate split of real source vs real target images.
    cs, _, _ = data.load(cfg.source, res, cfg.classifier_split, num_images=cfg.classifier_images, logger=lambda m: None)
    ct, _, _ = data.load(cfg.target, res, cfg.classifier_split, num_images=cfg.classifier_images, logger=lambda m: None)
    clf = classifier.train(cs, ct, vae=pipe.vae)
    log(f"domain classifier: held-out accuracy {clf.accuracy:.3f} ({clf.n_heldout} real images, raw and VAE round-tripped)")
    report = {"status": "ok", "settings": {**config.to_dict(cfg), "base": base, "steps": steps, "scheduler": sched,
                                           "noise_seeds": [1000 * s for s in range(cfg.seeds)], "n_source": len(src_rec),
                                           "n_target": len(tgt_px), "n_classifier": clf.n_train},
              "versions": _versions(), "classifier_accuracy": clf.accuracy, "warnings": warnings,
              "optional_metrics": {}}
    if clf.accuracy < cfg.min_classifier_accuracy:
        report.update(status="refused", reason=f"domain classifier held-out accuracy {clf.accuracy:.3f} < "
                      f"{cfg.min_classifier_accuracy}: its target-reach verdicts would be unreliable (more or cleaner "
                      f"classifier images, or domains that differ visibly, are needed)")
        _write(out, report, [])
        return report

    inputs = _arr(src_px)
    masks = _masks(src_rec, res)
    report["has_masks"] = masks is not None
    src_images = [sample.to_pil(r.load(), res) for r in src_rec]
    prompts = [cfg.prompt.format(caption=r.caption) for r in src_rec]
    ceiling = _per_image(_arr(classifier.vae_roundtrip(pipe.vae, src_px)), inputs, masks)
    report["vae_ceiling"] = {k: float(v.mean()) for k, v in ceiling.items()}
    tgt_feat, tgt_pix = clf.features(tgt_px), _downsample(_arr(tgt_px))
    perc = _perceptual_setup(cfg, facts, res, src_px, tgt_px, report, log, device)
    opt = report["optional_metrics"]
    for k, v in opt.items():
        if not v.startswith("not computed"):
            log(f"{k}: {v}")
    if any(v.startswith("not computed") for v in opt.values()):
        log(f"not computed (no weights given): {', '.join(k for k, v in opt.items() if v.startswith('not computed'))}")

    per = {}  # (strength, scale) -> dict of (seeds, N) arrays
    grid_imgs = {}
    runs = [(s, c) for s in cfg.strengths for c in cfg.scales]
    from tqdm.auto import tqdm
    bar = tqdm(total=len(runs) * cfg.seeds, desc="eval sweep", disable=not progress, mininterval=2.0)
    for strength, scale in runs:
        acc = {}
        outs_all = []
        for seed in range(cfg.seeds):
            with lora.applied(pipe, [name], [scale], fuse=cfg.fuse):
                outs = sample.img2img(pipe, src_images, prompts, strength, steps, cfg.guidance, 1000 * seed, sched,
                                      batch_size=cfg.batch_size)
            if seed == 0:
                grid_imgs[(strength, scale)] = outs[:4]
            arr = np.stack([sample.to_array(o) for o in outs])
            outs_all.append(arr)
            m = _per_image(arr, inputs, masks)
            x = torch.from_numpy(arr).permute(0, 3, 1, 2).float() * 2 - 1
            m["reach"] = (clf.prob_target(x) > 0.5).astype(float)
            m["feat"] = clf.features(x)
            for k, v in m.items():
                acc.setdefault(k, []).append(v)
            bar.update(1)
        per[(strength, scale)] = {k: np.stack(v) for k, v in acc.items()}
        per[(strength, scale)]["pix"] = _downsample(np.concatenate(outs_all))
        per[(strength, scale)]["perceptual"] = _perceptual_row(perc, np.stack(outs_all))
    bar.close()

    rows = [_row(strength, scale, per[(strength, scale)], tgt_feat, tgt_pix, masks is not None) for strength, scale in runs]
    for r in rows:
        r.update(per[(r["strength"], r["scale"])]["perceptual"])
    base_rows = {r["strength"]: r for r in rows if r["scale"] == 0.0}
    for r in rows:
        b = base_rows.get(r["strength"])
        r["delta_vs_base"] = {k: r[k] - b[k] for k in _NUMERIC if b is not None and k in r and isinstance(r[k], float)} if b else {}
    report["rows"] = rows
    report["spearman"] = _spearman(cfg, per, masks is not None)
    report["recommended"] = _recommend(cfg, rows, masks is not None)
    report["seconds"] = round(time.time() - t0, 1)
    from adapt import plots
    plots.curves(rows, report["vae_ceiling"], out / "curves.png", masks is not None)
    plots.pareto(rows, out / "pareto.png", masks is not None)
    plots.sweep_grid(src_images[:4], grid_imgs, cfg.strengths, max(cfg.scales), out / "grid.png")
    _write(out, report, rows)
    return report


_NUMERIC = ("target_reach", "detector_reach", "preservation_ssim", "preservation_psnr", "preservation_l2",
            "preservation_ssim_outside_mask", "preservation_psnr_outside_mask", "colour_drift_outside_mask",
            "kid_features", "kid_pixels", "fid", "intra_lpips", "preservation_lpips", "clip_score", "clip_direction")


def _weights_id(path) -> str:
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return f"{path} (sha256 {h.hexdigest()[:12]})"


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


def _row(strength, scale, m, tgt_feat, tgt_pix, has_masks) -> dict:
    """Aggregate one (strength, scale): means over seeds and images; CIs over images (seed-averaged)."""
    img = {k: v.mean(0) for k, v in m.items() if k not in ("feat", "pix", "perceptual")}  # (N,) per image
    row = {"strength": strength, "scale": scale, "n_outputs": int(m["reach"].size),
           "target_reach": float(img["reach"].mean()), "target_reach_ci": metrics.bootstrap_ci(img["reach"]),
           "preservation_ssim": float(img["ssim"].mean()), "preservation_ssim_ci": metrics.bootstrap_ci(img["ssim"]),
           "preservation_psnr": float(img["psnr"].mean()), "preservation_l2": float(img["l2"].mean())}
    if has_masks:
        det = (m["lens"] >= metrics.SUNGLASSES_THRESHOLD).astype(float).mean(0)
        row.update(detector_reach=float(det.mean()), detector_reach_ci=metrics.bootstrap_ci(det),
                   lens_darkening=float(img["lens"].mean()),
                   preservation_ssim_outside_mask=float(img["ssim_out"].mean()),
                   preservation_ssim_outside_mask_ci=metrics.bootstrap_ci(img["ssim_out"]),
                   preservation_psnr_outside_mask=float(img["psnr_out"].mean()),
                   colour_drift_outside_mask=float(img["drift_out"].mean()))
    feats = m["feat"].reshape(-1, m["feat"].shape[-1])
    row["kid_features"], row["kid_features_std"] = metrics.kid(feats, tgt_feat)
    row["kid_pixels"], row["kid_pixels_std"] = metrics.kid(m["pix"], tgt_pix)
    return row


def _spearman(cfg, per, has_masks) -> dict:
    out = {}
    for scale in cfg.scales:
        reach_key = "lens" if has_masks else "reach"
        pres_key = "ssim_out" if has_masks else "ssim"
        reach = np.stack([per[(s, scale)][reach_key].mean(0) for s in cfg.strengths])  # (S, N)
        pres = np.stack([per[(s, scale)][pres_key].mean(0) for s in cfg.strengths])
        r1, ci1 = metrics.spearman_ci(np.array(cfg.strengths), reach)
        r2, ci2 = metrics.spearman_ci(np.array(cfg.strengths), pres)
        out[str(scale)] = {"reach_metric": "lens_darkening" if has_masks else "classifier_reach",
                           "preservation_metric": "ssim_outside_mask" if has_masks else "ssim",
                           "rho_strength_reach": r1, "rho_strength_reach_ci": ci1,
                           "rho_strength_preservation": r2, "rho_strength_preservation_ci": ci2}
    return out


def _recommend(cfg, rows, has_masks) -> dict:
    key = "preservation_ssim_outside_mask" if has_masks else "preservation_ssim"
    rule = f"highest target_reach among adapter rows (scale > 0) with {key} >= {cfg.preservation_threshold}; ties: lower strength"
    ok = [r for r in rows if r["scale"] > 0 and r[key] >= cfg.preservation_threshold]
    if not ok:
        return {"strength": None, "scale": None, "rule": rule, "gain_over_base": None,
                "note": "no adapter setting meets the preservation threshold"}
    best = max(ok, key=lambda r: (r["target_reach"], -r["strength"], r["scale"]))
    return {"strength": best["strength"], "scale": best["scale"], "rule": rule,
            "target_reach": best["target_reach"], key: best[key],
            "gain_over_base": best["delta_vs_base"].get("target_reach")}


def _versions() -> dict:
    import diffusers
    import peft
    import adapt
    return {"adapt": adapt.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__, "peft": peft.__version__}


def _write(out: Path, report: dict, rows: list) -> None:
    validate_report(report)
    atomic.write_text(out / "report.json", json.dumps(report, indent=1, default=float))
    flat = [{k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in r.items()} for r in rows]
    buf = io.StringIO(newline="")
    if flat:
        w = csv.DictWriter(buf, fieldnames=list(flat[0]))
        w.writeheader()
        w.writerows(flat)
    atomic.write_text(out / "report.csv", buf.getvalue())
    from adapt.plots import summary_markdown
    atomic.write_text(out / "summary.md", summary_markdown(report))


def add_parser(sub):
    import argparse
    p = sub.add_parser("eval", help="strength x scale sweep of an adapter against the base, with a report",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=config.keys_help(config.EvalConfig))
    p.add_argument("--config", default=None, help="YAML with EvalConfig keys (see adapt/config.py)")
    p.add_argument("--adapter")
    p.add_argument("--base")
    p.add_argument("--source")
    p.add_argument("--target")
    p.add_argument("--prompt")
    p.add_argument("--strengths", help="comma-separated, e.g. 0.2,0.4,0.6,0.8")
    p.add_argument("--scales", help="comma-separated, e.g. 0,0.5,1.0 (0 = base)")
    p.add_argument("--seeds", type=int)
    p.add_argument("--num-images", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--out")
    p.add_argument("overrides", nargs="*", help="key=value EvalConfig overrides")
    p.set_defaults(func=cmd_eval)


def cmd_eval(a) -> int:
    ov = list(a.overrides)
    for key in ("adapter", "base", "source", "target", "prompt", "seeds", "num_images", "steps", "out"):
        if getattr(a, key) is not None:
            ov.append(f"{key}={json.dumps(getattr(a, key))}" if key == "prompt" else f"{key}={getattr(a, key)}")
    for key in ("strengths", "scales"):
        if getattr(a, key):
            ov.append(f"{key}=[{getattr(a, key)}]")
    cfg = config.load(config.EvalConfig, a.config, ov)
    if not cfg.adapter:
        raise config.ConfigError("adapter: required (--adapter DIR)")
    report = run(cfg)
    print((Path(cfg.out) / "summary.md").read_text())
    return 0 if report["status"] == "ok" else 3
