"""The evaluation report: per-setting aggregates, the reach / (shape) / preservation frontier, the
recommendation rule, and the files (report.json, report.csv, summary.md). No model code here:
`adapt.evaluate` runs the sweep and hands this module per-image arrays.

report.json schema (REPORT_SCHEMA below is checked by `validate_report`; version REPORT_VERSION):
  version, status       report format version; "ok" | "refused" (the classifier, the only reach judge, below min
                        accuracy) | "interrupted" (Ctrl-C: the finished rows, no spearman or recommendation)
  settings, versions    the config, seeds and sample counts; library versions
  classifier_accuracy   accuracy of the domain classifier on real images it did not learn from
  classifier            {kind: "scratch" | "base_features", accuracy_ci (95% Wilson), validation (a 20% held-out
                        split, or k-fold cross-validation for small sets), n_heldout, n_source, n_target};
                        absent in reports written before it was recorded
  vae_ceiling           preservation of a VAE encode-decode alone (the best plain img2img can do)
  adapter_vae_ceiling   the same through the adapter's tuned decoder (adapt.decoder), when it ships one
  rows                  one per (strength, scale, mode): strength, scale, mode ("plain" | "masked"),
                        target_reach (classifier), target_reach_ci, preservation_ssim(_ci), preservation_psnr,
                        preservation_l2, kid_features, kid_pixels, on_frontier, delta_vs_base {metric: row − base};
                        masked rows: mask_area; with benchmark geometry: detector_reach(_ci), shape_pass(_ci),
                        lens_darkening, preservation_ssim_outside_mask(_ci), preservation_psnr_outside_mask,
                        colour_drift_outside_mask, [mask_outside_band]
  spearman              per curve ("<scale>/<mode>"): rho and CI of strength vs reach and vs preservation
  recommended           {strength, scale, mode, rule, reach_metric, preservation_metric, ..., gain_over_base}
  optional_metrics      fid / lpips / intra_lpips / clip_score / clip_direction: "computed: <weights>" or "not computed: <why>"
  warnings              e.g. evaluation images that overlap the adapter's training data
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from adapt import atomic, metrics
from adapt.config import MaskSettings

REPORT_VERSION = 2
REPORT_SCHEMA = {
    "version": int, "status": str, "settings": dict, "versions": dict, "classifier_accuracy": float, "vae_ceiling": dict,
    "rows": list, "spearman": dict, "recommended": dict, "optional_metrics": dict, "warnings": list,
}
ROW_SCHEMA = {"strength": float, "scale": float, "mode": str, "target_reach": float, "target_reach_ci": list,
              "preservation_ssim": float, "preservation_psnr": float, "preservation_l2": float,
              "kid_features": float, "kid_pixels": float, "delta_vs_base": dict, "n_outputs": int, "on_frontier": bool}
NUMERIC = ("target_reach", "detector_reach", "shape_pass", "preservation_ssim", "preservation_psnr", "preservation_l2",
           "preservation_ssim_outside_mask", "preservation_psnr_outside_mask", "colour_drift_outside_mask",
           "kid_features", "kid_pixels", "fid", "intra_lpips", "preservation_lpips", "clip_score", "clip_direction")


def keys(has_geometry: bool) -> tuple[str, str]:
    """(reach, preservation) headline metrics: the ground-truth judges when the benchmark's geometry exists."""
    return ("detector_reach", "preservation_ssim_outside_mask") if has_geometry else ("target_reach", "preservation_ssim")


def validate_report(report: dict) -> None:
    """Raise ValueError naming the first key that is missing or of the wrong type."""
    for k, tp in REPORT_SCHEMA.items():
        if k not in report:
            if report.get("status") == "refused" and k in ("rows", "spearman", "recommended", "vae_ceiling"):
                continue
            if report.get("status") == "interrupted" and k in ("spearman", "recommended"):
                continue
            raise ValueError(f"report.json: missing key {k!r}")
        if not isinstance(report[k], tp):
            raise ValueError(f"report.json: {k!r} should be {tp.__name__}, got {type(report[k]).__name__}")
    if report["status"] not in ("ok", "refused", "interrupted"):
        raise ValueError(f"report.json: status {report['status']!r} is not 'ok', 'refused' or 'interrupted'")
    if not isinstance(report.get("classifier", {}), dict):
        raise ValueError(f"report.json: 'classifier' should be dict, got {type(report['classifier']).__name__}")
    if report["version"] != REPORT_VERSION:
        raise ValueError(f"report.json: version {report['version']}, this adapt reads version {REPORT_VERSION}")
    for i, row in enumerate(report.get("rows", [])):
        for k, tp in ROW_SCHEMA.items():
            if not isinstance(row.get(k), tp):
                raise ValueError(f"report.json: rows[{i}].{k} should be {tp.__name__}, got {row.get(k)!r}")
        if report.get("has_masks") and row.get("preservation_ssim_outside_mask") is None:
            raise ValueError(f"report.json: the benchmark's geometry exists but rows[{i}] lacks preservation_ssim_outside_mask")


def aggregate(strength: float, scale: float, mode: str, m: dict, tgt_feat, tgt_pix, has_geometry: bool) -> dict:
    """One row from per-output arrays m[k] of shape (seeds, N): means over seeds and images, CIs over
    images (seed-averaged, so the CI is about which images were drawn, not the noise)."""
    img = {k: v.mean(0) for k, v in m.items() if k not in ("feat", "pix")}  # (N,) per image
    row = {"strength": strength, "scale": scale, "mode": mode, "n_outputs": int(m["reach"].size),
           "target_reach": float(img["reach"].mean()), "target_reach_ci": metrics.bootstrap_ci(img["reach"]),
           "preservation_ssim": float(img["ssim"].mean()), "preservation_ssim_ci": metrics.bootstrap_ci(img["ssim"]),
           "preservation_psnr": float(img["psnr"].mean()), "preservation_l2": float(img["l2"].mean())}
    if "mask_area" in img:
        row["mask_area"] = float(img["mask_area"].mean())
    if has_geometry:
        row.update(detector_reach=float(img["detected"].mean()), detector_reach_ci=metrics.bootstrap_ci(img["detected"]),
                   shape_pass=float(img["shape"].mean()), shape_pass_ci=metrics.bootstrap_ci(img["shape"]),
                   lens_darkening=float(img["lens"].mean()),
                   preservation_ssim_outside_mask=float(img["ssim_out"].mean()),
                   preservation_ssim_outside_mask_ci=metrics.bootstrap_ci(img["ssim_out"]),
                   preservation_psnr_outside_mask=float(img["psnr_out"].mean()),
                   colour_drift_outside_mask=float(img["drift_out"].mean()))
        if "mask_outside_band" in img:
            row["mask_outside_band"] = float(img["mask_outside_band"].mean())
    feats = m["feat"].reshape(-1, m["feat"].shape[-1])
    row["kid_features"], row["kid_features_std"] = metrics.kid(feats, tgt_feat)
    row["kid_pixels"], row["kid_pixels_std"] = metrics.kid(m["pix"], tgt_pix)
    return row


def add_deltas(rows: list[dict]) -> None:
    """delta_vs_base: every numeric metric minus the base (scale 0, plain) at the same strength."""
    base = {r["strength"]: r for r in rows if r["scale"] == 0.0 and r["mode"] == "plain"}
    for r in rows:
        b = base.get(r["strength"])
        r["delta_vs_base"] = {k: r[k] - b[k] for k in NUMERIC if b is not None and isinstance(r.get(k), float) and k in b}


def frontier_metrics(has_geometry: bool) -> tuple[str, ...]:
    """What the frontier trades off: reach and preservation, and with the benchmark's geometry also the shape
    check, so a setting that draws real lenses (two lenses and a bridge) is not dominated by one that only
    darkens the eyes a little more."""
    rk, pk = keys(has_geometry)
    return (rk, "shape_pass", pk) if has_geometry else (rk, pk)


def pareto(rows: list[dict], ks: tuple[str, ...]) -> list[bool]:
    """Per row: no other row has at least as much of every metric in `ks` and more of one."""
    return [not any(all(o[k] >= r[k] for k in ks) and any(o[k] > r[k] for k in ks) for o in rows) for r in rows]


def mark_frontier(rows: list[dict], has_geometry: bool) -> None:
    """on_frontier: Pareto-optimal in the frontier metrics."""
    for r, on in zip(rows, pareto(rows, frontier_metrics(has_geometry))):
        r["on_frontier"] = on


def recommend(rows: list[dict], threshold: float, has_geometry: bool) -> dict:
    """The setting to use: among adapter rows on the frontier (any strength, scale and sampling mode)
    that keep preservation >= threshold, the highest reach; then the better shape check; then the
    better preservation; then the lower strength. Picking from the whole frontier, not the scale-1
    row, is what lets a lower scale or masked sampling win when it keeps more at the same reach, and a
    scale above 1 win when it draws the lenses' shape at the same reach."""
    rk, pk = keys(has_geometry)
    rule = (f"highest {rk} among adapter rows on the {' / '.join(frontier_metrics(has_geometry))} frontier with "
            f"{pk} >= {threshold}; ties (reach within 0.01): {'higher shape_pass, then ' if has_geometry else ''}higher {pk}, "
            "then lower strength")
    ok = [r for r in rows if r["scale"] > 0 and r["on_frontier"] and r[pk] >= threshold]
    if not ok:
        note = ("no adapter setting meets the preservation threshold" if any(r["scale"] > 0 for r in rows)
                else "no adapter rows were evaluated (scales: 0 only, the base)")
        return {"strength": None, "scale": None, "mode": None, "rule": rule, "reach_metric": rk, "preservation_metric": pk,
                "gain_over_base": None, "note": note}
    best = max(ok, key=lambda r: (round(r[rk], 2), r.get("shape_pass", 0.0), r[pk], -r["strength"]))
    rec = {"strength": best["strength"], "scale": best["scale"], "mode": best["mode"], "rule": rule,
           "reach_metric": rk, "preservation_metric": pk, "reach": best[rk], "preservation": best[pk],
           "target_reach": best["target_reach"], "gain_over_base": best["delta_vs_base"].get(rk)}
    if "shape_pass" in best:
        rec["shape_pass"] = best["shape_pass"]
    return rec


def spearman(strengths: list[float], per: dict, curves: list[tuple], has_geometry: bool) -> dict:
    """Per curve (scale, mode): Spearman ρ of strength vs per-image reach and vs preservation, with bootstrap CIs.
    Empty when fewer than two strengths were swept: ρ needs the strength to vary (it is not 0 then, it is undefined)."""
    reach_key, pres_key = ("lens", "ssim_out") if has_geometry else ("reach", "ssim")
    out = {}
    if len(set(strengths)) < 2:
        return out
    for scale, mode in curves:
        reach = np.stack([per[(s, scale, mode)][reach_key].mean(0) for s in strengths])  # (S, N)
        pres = np.stack([per[(s, scale, mode)][pres_key].mean(0) for s in strengths])
        r1, ci1 = metrics.spearman_ci(np.array(strengths), reach)
        r2, ci2 = metrics.spearman_ci(np.array(strengths), pres)
        out[f"{scale:g}/{mode}"] = {"reach_metric": "lens_darkening" if has_geometry else "classifier_reach",
                                    "preservation_metric": "ssim_outside_mask" if has_geometry else "ssim",
                                    "rho_strength_reach": r1, "rho_strength_reach_ci": ci1,
                                    "rho_strength_preservation": r2, "rho_strength_preservation_ci": ci2}
    return out


def versions() -> dict:
    import diffusers
    import peft
    import torch

    import adapt
    return {"adapt": adapt.__version__, "torch": torch.__version__, "diffusers": diffusers.__version__, "peft": peft.__version__}


def write(out: Path, report: dict) -> None:
    """report.json, report.csv (one line per row) and summary.md, each written atomically."""
    from adapt.plots import summary_markdown
    validate_report(report)
    rows = report.get("rows", [])
    atomic.write_text(out / "report.json", json.dumps(report, indent=1, default=float))
    flat = [{k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in r.items()} for r in rows]
    buf = io.StringIO(newline="")
    if flat:
        w = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for r in flat for k in r)))
        w.writeheader()
        w.writerows(flat)
    atomic.write_text(out / "report.csv", buf.getvalue())
    atomic.write_text(out / "summary.md", summary_markdown(report))


@dataclass(frozen=True)
class Recommendation:
    """The setting a report recommends for the adapter it evaluated, as `adapt sample --recommended` applies it.
    Read from a report of version REPORT_VERSION by `load_recommendation`, which checks everything below."""
    report: str                   # the report.json it came from
    base: str                     # the base the evaluation sampled with
    adapter: str                  # the adapter as given to `adapt eval`
    adapter_sha256: str | None    # sha256 of its weights file (None in reports written before it was recorded)
    strength: float
    scale: float
    mode: str                     # "plain" | "masked"
    steps: int
    scheduler: str
    guidance: float
    prompt: str                   # may hold '{caption}'
    mask: MaskSettings | None     # masked mode: the evaluation's mask settings; plain: None
    figures: str                  # what the evaluation measured at this setting, for the log
    decoder: str | None = None    # the tuned VAE folder the adapter's rows decoded with (adapt.decoder), if any


class RecommendationError(ValueError):
    """A report cannot give a setting; the message names the file and the reason."""


def load_recommendation(path: str | Path) -> Recommendation:
    p = Path(path)
    if p.is_dir():
        p = p / "report.json"
    try:
        report = json.loads(p.read_text())
    except FileNotFoundError:
        raise RecommendationError(f"{p}: not found (an `adapt eval` output folder or its report.json)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RecommendationError(f"{p}: not a readable report.json ({type(e).__name__}: {e})") from None
    try:
        validate_report(report)
    except ValueError as e:
        raise RecommendationError(f"{p}: {e}") from None
    if report["status"] != "ok":
        raise RecommendationError(f"{p}: the evaluation was {report['status']} ({report.get('reason', 'no reason recorded')}), "
                                  "so it recommends nothing")
    rec, st = report["recommended"], report["settings"]
    if rec.get("strength") is None:
        raise RecommendationError(f"{p}: recommends no setting ({rec.get('note', 'none met the rule')}; rule: {rec['rule']})")
    if rec["mode"] not in ("plain", "masked"):
        raise RecommendationError(f"{p}: recommended mode {rec['mode']!r} is neither 'plain' nor 'masked'")
    mask = None
    if rec["mode"] == "masked":
        if st.get("mask_blend") is False:
            raise RecommendationError(f"{p}: the evaluation masked without latent blending (mask_blend=false), which "
                                      "`adapt sample` does not do; evaluate with mask_blend=true")
        try:
            mask = MaskSettings(timestep=st["mask_timestep"], draws=st["mask_draws"], threshold=st["mask_threshold"],
                                close=st["mask_close"], dilate=st["mask_dilate"], blur=st["mask_blur"], paste=st["mask_paste"])
        except (KeyError, ValueError) as e:
            raise RecommendationError(f"{p}: settings hold no usable mask settings ({type(e).__name__}: {e})") from None
    figures = ", ".join(f"{name} {rec[k]:.3g}" for name, k in ((rec["reach_metric"], "reach"), ("shape_pass", "shape_pass"),
                                                                (rec["preservation_metric"], "preservation")) if k in rec)
    try:
        return Recommendation(report=str(p), base=str(st["base"]), adapter=str(st["adapter"]),
                              adapter_sha256=st.get("adapter_sha256"), strength=float(rec["strength"]),
                              scale=float(rec["scale"]), mode=rec["mode"], steps=int(st["steps"]),
                              scheduler=str(st["scheduler"]), guidance=float(st["guidance"]), prompt=str(st["prompt"]),
                              mask=mask, figures=figures, decoder=st.get("decoder"))
    except KeyError as e:
        raise RecommendationError(f"{p}: settings lack {e.args[0]!r}") from None
