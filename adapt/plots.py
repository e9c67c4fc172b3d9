"""Figures and the human-readable summary of an evaluation report."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from adapt import atomic, sample  # noqa: E402


def _by_scale(rows):
    scales = sorted({r["scale"] for r in rows})
    return {s: sorted([r for r in rows if r["scale"] == s], key=lambda r: r["strength"]) for s in scales}


def _label(scale):
    return "base (scale 0)" if scale == 0 else f"adapter scale {scale:g}"


def curves(rows, ceiling: dict, path: Path, has_masks: bool) -> None:
    """Target reach and preservation vs strength, one line per scale, 95% CI bands."""
    pres = "preservation_ssim_outside_mask" if has_masks else "preservation_ssim"
    panels = [("target_reach", "target reach (classifier)")]
    if has_masks:
        panels.append(("detector_reach", "target reach (lens detector)"))
    panels.append((pres, "SSIM outside edit mask" if has_masks else "SSIM to input"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for ax, (key, title) in zip(axes, panels):
        for scale, rs in _by_scale(rows).items():
            x = [r["strength"] for r in rs]
            ax.plot(x, [r[key] for r in rs], marker="o", label=_label(scale), ls="--" if scale == 0 else "-")
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


def pareto(rows, path: Path, has_masks: bool) -> None:
    """Target reach vs preservation, one curve per scale (points labelled by strength)."""
    pres = "preservation_ssim_outside_mask" if has_masks else "preservation_ssim"
    reach = "detector_reach" if has_masks else "target_reach"
    fig, ax = plt.subplots(figsize=(4.8, 3.8))
    for scale, rs in _by_scale(rows).items():
        ax.plot([r[pres] for r in rs], [r[reach] for r in rs], marker="o", label=_label(scale), ls="--" if scale == 0 else "-")
        for r in rs:
            ax.annotate(f"{r['strength']:g}", (r[pres], r[reach]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(pres.replace("_", " "))
    ax.set_ylabel(reach.replace("_", " "))
    ax.set_title("reach vs preservation (labels: strength)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic.write_figure(fig, path, dpi=110)
    plt.close(fig)


def sweep_grid(inputs, outputs: dict, strengths, scale: float, path: Path) -> None:
    """Rows: inputs, each twice (base, then adapter at `scale`); columns: input then strengths."""
    rows = []
    for i, img in enumerate(inputs):
        rows.append([img] + [outputs[(s, 0.0)][i] for s in strengths if (s, 0.0) in outputs])
        rows.append([img] + [outputs[(s, scale)][i] for s in strengths])
    atomic.write_image(sample.grid(rows), path)


def summary_markdown(report: dict) -> str:
    s = report["settings"]
    lines = [f"# Domain-transfer evaluation: {Path(str(s['adapter'])).name}", ""]
    if report["status"] != "ok":
        lines += [f"**Report refused:** {report['reason']}", ""]
        return "\n".join(lines)
    masks = report.get("has_masks")
    lines += [f"Base `{s['base']}`, {s['n_source']} held-out source images x {s['seeds']} seeds, {s['steps']} {s['scheduler']} steps, "
              f"guidance {s['guidance']}. Domain classifier held-out accuracy: **{report['classifier_accuracy']:.3f}**.", ""]
    c = report["vae_ceiling"]
    lines += [f"VAE round-trip ceiling (encode-decode alone): SSIM {c['ssim']:.3f}" +
              (f", SSIM outside mask {c['ssim_out']:.3f}" if masks else ""), ""]
    head = ["strength", "scale", "reach (clf)"] + (["reach (detector)", "SSIM out-mask", "drift out-mask"] if masks else []) + \
           ["SSIM", "PSNR", "KID feat", "Δreach vs base"]
    names = {"fid": "FID", "intra_lpips": "Intra-LPIPS", "preservation_lpips": "LPIPS to input", "clip_score": "CLIP score",
             "clip_direction": "CLIP direction"}
    extra = [k for k in names if k in report["rows"][0]]  # the metrics whose weights were given
    head += [names[k] for k in extra]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["rows"]:
        cells = [f"{r['strength']:g}", f"{r['scale']:g}",
                 f"{r['target_reach']:.2f} [{r['target_reach_ci'][0]:.2f}, {r['target_reach_ci'][1]:.2f}]"]
        if masks:
            cells += [f"{r['detector_reach']:.2f}", f"{r['preservation_ssim_outside_mask']:.3f}", f"{r['colour_drift_outside_mask']:.1f}"]
        d = r["delta_vs_base"].get("target_reach")
        cells += [f"{r['preservation_ssim']:.3f}", f"{r['preservation_psnr']:.1f}", f"{r['kid_features']:.4f}",
                  "—" if r["scale"] == 0 or d is None else f"{d:+.2f}"]
        cells += [f"{r[k]:.3f}" for k in extra]
        lines.append("| " + " | ".join(cells) + " |")
    rec = report["recommended"]
    lines += ["", f"**Recommended:** strength {rec['strength']}, scale {rec['scale']} — rule: {rec['rule']}."]
    if rec.get("gain_over_base") is not None:
        lines.append(f"There the adapter reaches the target in {rec['target_reach']:.0%} of outputs, "
                     f"{rec['gain_over_base']:+.0%} over the base at the same strength.")
    lines += ["", "Spearman ρ (strength vs reach / vs preservation, 95% CI over images):"]
    for scale, sp in report["spearman"].items():
        lines.append(f"- {_label(float(scale))}: reach ρ={sp['rho_strength_reach']:.2f} {_ci(sp['rho_strength_reach_ci'])}, "
                     f"preservation ρ={sp['rho_strength_preservation']:.2f} {_ci(sp['rho_strength_preservation_ci'])}")
    opt = report["optional_metrics"]
    lines += [f"- {k}: {v}" for k, v in opt.items() if not v.startswith("not computed")]
    skipped = [k for k, v in opt.items() if v.startswith("not computed")]
    if skipped:
        lines.append(f"- not computed (their weights were not given; report.json says what to set): {', '.join(skipped)}")
    for w in report["warnings"]:
        lines.append(f"- WARNING: {w}")
    lines += ["", "Files: report.json, report.csv, curves.png, pareto.png, grid.png (rows: base, adapter; columns: input, strengths)."]
    return "\n".join(lines) + "\n"


def _ci(ci):
    return f"[{ci[0]:.2f}, {ci[1]:.2f}]"
