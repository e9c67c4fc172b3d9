"""Figures and the human-readable summary of an evaluation report."""

from __future__ import annotations

import shlex
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from adapt import atomic, sample  # noqa: E402
from adapt import report as rep  # noqa: E402


def _by_curve(rows):
    """{(scale, mode): rows sorted by strength}: one line per curve."""
    curves = sorted({(r["scale"], r["mode"]) for r in rows}, key=lambda c: (c[1] != "plain", c[0]))
    return {c: sorted([r for r in rows if (r["scale"], r["mode"]) == c], key=lambda r: r["strength"]) for c in curves}


def _label(curve):
    scale, mode = curve
    return "base (scale 0)" if scale == 0 else f"adapter scale {scale:g}" + ("" if mode == "plain" else f", {mode}")




def curves(rows, ceiling: dict, path: Path, has_masks: bool) -> None:
    """Target reach and preservation vs strength, one line per scale, 95% CI bands."""
    pres = "preservation_ssim_outside_mask" if has_masks else "preservation_ssim"
    panels = [("target_reach", "target reach (classifier)")]
    if has_masks:
        panels += [("detector_reach", "target reach (lens detector)"), ("shape_pass", "shape check (2 lenses + bridge)")]
    panels.append((pres, "SSIM outside eye band" if has_masks else "SSIM to input"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for ax, (key, title) in zip(axes, panels):
        for curve, rs in _by_curve(rows).items():
            x = [r["strength"] for r in rs]
            ax.plot(x, [r[key] for r in rs], marker="o" if curve[1] == "plain" else "s", label=_label(curve),
                    ls="--" if curve[0] == 0 else "-")
            ci = key + "_ci"
            if ci in rs[0]:
                ax.fill_between(x, [r[ci][0] for r in rs], [r[ci][1] for r in rs], alpha=0.2)
        if key == pres:
            ceil = ceiling.get("ssim_out" if has_masks else "ssim")
            if ceil is not None:
                ax.axhline(ceil, color="grey", lw=1, ls=":", label="VAE round-trip ceiling")
        ax.set_xlabel("img2img strength")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    atomic.write_figure(fig, path, dpi=110)
    plt.close(fig)


def pareto(rows, path: Path, has_masks: bool, recommended: dict | None = None) -> None:
    """Reach vs preservation, one curve per (scale, mode), points labelled by strength; the frontier
    (rows no other row beats on both) as a grey step line, the recommended setting circled."""
    pres = "preservation_ssim_outside_mask" if has_masks else "preservation_ssim"
    reach = "detector_reach" if has_masks else "target_reach"
    fig, ax = plt.subplots(figsize=(5.4, 4.2))
    for curve, rs in _by_curve(rows).items():
        ax.plot([r[pres] for r in rs], [r[reach] for r in rs], marker="o" if curve[1] == "plain" else "s",
                label=_label(curve), ls="--" if curve[0] == 0 else "-")
        for r in rs:
            ax.annotate(f"{r['strength']:g}", (r[pres], r[reach]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    # the 2-D envelope drawn here; the report's on_frontier also counts the shape check when it exists
    front = sorted((r for r, on in zip(rows, rep.pareto(rows, (reach, pres))) if on), key=lambda r: r[pres])
    if front:
        ax.step([r[pres] for r in front], [r[reach] for r in front], where="post", color="grey", lw=3, alpha=0.3, label="frontier")
    if recommended and recommended.get("strength") is not None:
        best = [r for r in rows if (r["strength"], r["scale"], r["mode"]) ==
                (recommended["strength"], recommended["scale"], recommended["mode"])]
        ax.scatter([best[0][pres]], [best[0][reach]], s=160, facecolors="none", edgecolors="red", label="recommended")
    ax.set_xlabel(pres.replace("_", " "))
    ax.set_ylabel(reach.replace("_", " "))
    ax.set_title("reach vs preservation (labels: strength)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic.write_figure(fig, path, dpi=110)
    plt.close(fig)


def sweep_grid(inputs, outputs: dict, strengths, curves: list, path: Path) -> None:
    """Rows: each input once per curve shown (the base, then the largest scale in each mode); columns: input, strengths."""
    top = max(c[0] for c in curves)
    shown = [c for c in curves if c[0] == 0] + [c for c in curves if c[0] == top and top > 0]
    rows = []
    for i, img in enumerate(inputs):
        for scale, mode in shown:
            rows.append([img] + [outputs[(s, scale, mode)][i] for s in strengths])
    atomic.write_image(sample.grid(rows), path)


def _classifier_line(report: dict) -> str:
    c = report.get("classifier")  # reports before it was recorded give the accuracy alone
    if c is None:
        return f"Domain classifier held-out accuracy: **{report['classifier_accuracy']:.3f}**."
    kind = {"scratch": "a CNN trained from scratch", "base_features": "logistic regression on the base UNet's features"}[c["kind"]]
    lo, hi = c["accuracy_ci"]
    return (f"Domain classifier ({kind}): accuracy **{report['classifier_accuracy']:.3f}** [{lo:.2f}, {hi:.2f}] by "
            f"{c['validation']} on {c['n_heldout']} real images ({c['n_source']} source, {c['n_target']} target).")


def summary_markdown(report: dict) -> str:
    s = report["settings"]
    lines = [f"# Domain-transfer evaluation: {Path(str(s['adapter'])).name}", ""]
    if report["status"] == "refused":
        lines += [f"**Report refused:** {report['reason']}", ""]
        return "\n".join(lines)
    partial = report["status"] == "interrupted"
    if partial:
        lines += [f"**Partial sweep:** {report['reason']}.", ""]
    masks = report.get("has_masks")
    lines += [f"Base `{s['base']}`, {s['n_source']} held-out source images x {s['seeds']} seeds, {s['steps']} {s['scheduler']} steps, "
              f"guidance {s['guidance']}. " + _classifier_line(report), ""]
    if s.get("decoder"):
        lines += [f"The adapter ships a VAE decoder tuned on its domain (`{s['decoder']}`): adapter rows decode with it, "
                  "base rows (scale 0) with the base's.", ""]
    c = report["vae_ceiling"]
    lines += [f"VAE round-trip ceiling (encode-decode alone): SSIM {c['ssim']:.3f}" +
              (f", SSIM outside the eye band {c['ssim_out']:.3f} (masked mode pastes the input back, so it can pass this)" if masks else ""), ""]
    if "adapter_vae_ceiling" in report:
        t = report["adapter_vae_ceiling"]
        lines += [f"Through the adapter's tuned decoder: SSIM {t['ssim']:.3f}, PSNR {t['psnr']:.1f} dB" +
                  (f", SSIM outside the eye band {t['ssim_out']:.3f}" if masks else "") +
                  f" (base VAE: PSNR {c['psnr']:.1f} dB).", ""]
    if masks:
        lines += ["Reach (detector) is the ground-truth lens detector; shape = two lenses and the bridge between them "
                  "(adapt/synthbench.py); reach (clf) is the domain classifier, a second opinion.", ""]
    head = ["strength", "scale", "mode", "reach (clf)"] + \
        (["reach (detector)", "shape", "SSIM out-band", "drift out-band", "mask area (out-band)"] if masks else ["mask area"]) + \
        ["SSIM", "PSNR", "KID feat", "Δreach vs base", "frontier"]
    names = {"fid": "FID", "intra_lpips": "Intra-LPIPS", "preservation_lpips": "LPIPS to input", "clip_score": "CLIP score",
             "clip_direction": "CLIP direction"}
    extra = [k for k in names if report["rows"] and k in report["rows"][0]]  # the metrics whose weights were given
    head += [names[k] for k in extra]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rk = "detector_reach" if masks else "target_reach"  # the reach the deltas are shown for
    for r in report["rows"]:
        cells = [f"{r['strength']:g}", f"{r['scale']:g}", r["mode"],
                 f"{r['target_reach']:.2f} [{r['target_reach_ci'][0]:.2f}, {r['target_reach_ci'][1]:.2f}]"]
        area = f"{r['mask_area']:.0%}" if "mask_area" in r else "—"
        if masks:
            area += f" ({r['mask_outside_band']:.0%})" if "mask_outside_band" in r else ""
            cells += [f"{r['detector_reach']:.2f} {_ci(r['detector_reach_ci'])}", f"{r['shape_pass']:.2f}",
                      f"{r['preservation_ssim_outside_mask']:.3f}", f"{r['colour_drift_outside_mask']:.1f}", area]
        else:
            cells.append(area)
        d = r["delta_vs_base"].get(rk)
        cells += [f"{r['preservation_ssim']:.3f}", f"{r['preservation_psnr']:.1f}", f"{r['kid_features']:.4f}",
                  "—" if r["scale"] == 0 or d is None else f"{d:+.2f}", "●" if r["on_frontier"] else ""]
        cells += [f"{r[k]:.3f}" for k in extra]
        lines.append("| " + " | ".join(cells) + " |")
    if partial:
        return "\n".join(lines + ["", "Files: report.json, report.csv (the finished settings)."]) + "\n"
    rec = report["recommended"]
    if rec["strength"] is None:
        lines += ["", f"**Recommended:** none — {rec['note']}. Rule: {rec['rule']}."]
    else:
        lines += ["", f"**Recommended:** strength {rec['strength']:g}, scale {rec['scale']:g}, mode {rec['mode']} — "
                  f"{_NAMES.get(rk, rk)} {rec['reach']:.2f}" + (f", shape check {rec['shape_pass']:.2f}" if "shape_pass" in rec else "")
                  + f", {_NAMES.get(rec['preservation_metric'], rec['preservation_metric'])} {rec['preservation']:.3f}"
                  + (f", {rec['gain_over_base']:+.2f} reach over the base at the same strength" if rec.get("gain_over_base") is not None else "")
                  + ".", "", f"Rule: {rec['rule']}.", "",
                  f"Sample at it: `adapt sample --adapter {shlex.quote(str(report['settings']['adapter']))} --recommended "
                  f"{shlex.quote(str(report['settings']['out']))} --image YOUR_IMAGES`"]
    lines += ["", "Spearman ρ (strength vs reach / vs preservation, 95% CI over images):"]
    if not report["spearman"]:
        lines.append("- not computed: one strength was swept (ρ needs two or more)")
    for curve, sp in report["spearman"].items():
        scale, mode = curve.split("/")
        lines.append(f"- {_label((float(scale), mode))}: reach ρ={sp['rho_strength_reach']:.2f} {_ci(sp['rho_strength_reach_ci'])}, "
                     f"preservation ρ={sp['rho_strength_preservation']:.2f} {_ci(sp['rho_strength_preservation_ci'])}")
    opt = report["optional_metrics"]
    lines += [f"- {k}: {v}" for k, v in opt.items() if not v.startswith("not computed")]
    skipped = [k for k, v in opt.items() if v.startswith("not computed")]
    if skipped:
        lines.append(f"- not computed (their weights were not given; report.json says what to set): {', '.join(skipped)}")
    for w in report["warnings"]:
        lines.append(f"- WARNING: {w}")
    lines += ["", "Files: report.json, report.csv, curves.png, pareto.png (frontier and recommendation), grid.png "
              "(rows: base, adapter per mode; columns: input, strengths)."]
    return "\n".join(lines) + "\n"


_NAMES = {"detector_reach": "detector reach", "target_reach": "classifier reach",
          "preservation_ssim_outside_mask": "SSIM outside the eye band", "preservation_ssim": "SSIM to the input"}


def _ci(ci):
    return f"[{ci[0]:.2f}, {ci[1]:.2f}]"
