"""The synthetic sunglasses benchmark's judges: what `adapt eval` can measure when the source
images carry face geometry (`face_box`, `eye_boxes` in metadata.jsonl, as `adapt data build` writes).

A user's own domain needs none of this: without geometry the evaluation falls back to the domain
classifier and whole-image preservation. Here live
  - the eye band (where the edit belongs) and the lens / skin masks, rebuilt from metadata;
  - the lens detector: how much darker the lens boxes became, against the input;
  - the shape check: two separate lenses and the bridge between them, so a dark smudge over the
    eyes does not pass for sunglasses.
All judges compare an output with its own input (arrays (H, W, 3) in [0, 1]).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from adapt import synth
from adapt.metrics import luminance

SUNGLASSES_THRESHOLD = 0.35  # lens darkening between real sources (0) and real targets (min 0.66 on 500 pairs)
BRIDGE_THRESHOLD = 0.23      # bridge darkening: real targets >= 0.238 on 300 pairs (a 1.2 px line), sources 0
GAP_RATIO = 0.5              # the gap above/below the bridge must stay lighter than half the lenses' darkening


def faces_of(records) -> list[synth.Face] | None:
    """Face geometry of each record, from its metadata; None when any record lacks it (a user's own data)."""
    if not all("eye_boxes" in r.extra and "face_box" in r.extra for r in records):
        return None
    return [synth.Face(seed=r.extra.get("seed", 0), background="", skin=0, hair_colour="", hair_style="", lens_tint="",
                       lens_shape="", face_box=r.extra["face_box"], eye_boxes=r.extra["eye_boxes"]) for r in records]


@dataclass
class Masks:
    """Per-image boolean (H, W) masks of the benchmark."""
    band: list[np.ndarray]  # eye band: lens boxes, bridge, temples (where the edit belongs)
    lens: list[np.ndarray]  # the two lens boxes
    skin: list[np.ndarray]  # bare cheek skin (the reference luma)

    @classmethod
    def of(cls, faces: list[synth.Face], size: int) -> "Masks":
        return cls([synth.eye_mask(f, size) for f in faces], [synth.lens_mask(f, size) for f in faces],
                   [synth.skin_mask(f, size) for f in faces])


def darkening(out: np.ndarray, inp: np.ndarray, skin_mask: np.ndarray) -> np.ndarray:
    """(H, W): how much darker each pixel of `out` is than in `inp`, beyond what the bare skin darkened, in units
    of the *input's* skin luma (> 0 where darker).

    Against the input's skin, not the output's, so an output that lightens the whole face cannot inflate the
    score; minus the skin's own darkening (when it darkened), so an output that darkens the whole face, as the
    base does at high strength when it re-draws a medium skin darker, cannot pass for sunglasses either: lenses
    are dark against the face they sit on. Global shifts show up as colour drift outside the mask, reported beside.
    """
    lum_in, lum_out = luminance(inp), luminance(out)
    skin_in = max(float(np.median(lum_in[skin_mask])), 1e-3)
    skin_shift = max(0.0, (skin_in - float(np.median(lum_out[skin_mask]))) / skin_in)
    return (lum_in - lum_out) / skin_in - skin_shift


def lens_darkening(out: np.ndarray, inp: np.ndarray, lens_mask: np.ndarray, skin_mask: np.ndarray) -> float:
    """How much darker the lens boxes of `out` are than those of `inp` (`darkening`). Real pairs of the benchmark:
    0 for a face against itself, >= 0.66 for the same face wearing sunglasses."""
    return float(darkening(out, inp, skin_mask)[lens_mask].mean())


def shape(out: np.ndarray, inp: np.ndarray, face: synth.Face, skin_mask: np.ndarray) -> dict:
    """Two lenses and a bridge, each measured as `darkening` against the input.

    left, right  mean darkening inside each lens box (each must pass, not only their mean)
    bridge       median over the gap's inner columns of the darkest change within ±2 px of the bridge
                 line (the renderer draws it 1.2 px wide at 30% of the lens height)
    gap          mean darkening of the gap below the bridge line, where a target shows bare skin: a smudge
                 that darkens the whole band fails here
    passed       all of: left, right >= SUNGLASSES_THRESHOLD; bridge − gap >= BRIDGE_THRESHOLD (a line, darker
                 than the gap below it, not a fill); gap < GAP_RATIO x min(left, right) (two lenses, not one blob)
    """
    dark = darkening(out, inp, skin_mask)  # (H, W), > 0 where darker than the skin's own change
    h, w = dark.shape
    (lx0, ly0, lx1, ly1), (rx0, ry0, rx1, ry1) = face.eye_boxes

    def box(x0, y0, x1, y1):
        return dark[max(int(np.ceil(y0)), 0):min(int(np.floor(y1)), h), max(int(np.ceil(x0)), 0):min(int(np.floor(x1)), w)]

    left, right = float(box(lx0, ly0, lx1, ly1).mean()), float(box(rx0, ry0, rx1, ry1).mean())
    c0, c1 = int(np.ceil(lx1)) + 1, int(np.floor(rx0)) - 1  # inner gap columns, clear of the lens edges
    if c1 <= c0:  # lenses nearly touch: use the one or two columns between them
        c0, c1 = int(np.floor(lx1)), int(np.ceil(rx0))
    by = ly0 + 0.3 * (ly1 - ly0)
    rows = dark[max(int(np.floor(by - 2)), 0):int(np.ceil(by + 2)) + 1, c0:c1]
    bridge = float(np.median(rows.max(axis=0))) if rows.size else 0.0
    below = dark[int(np.ceil(by + 2.5)):int(np.floor(max(ly1, ry1))), c0:c1]
    gap = float(below.mean()) if below.size else 0.0
    passed = (min(left, right) >= SUNGLASSES_THRESHOLD and bridge - gap >= BRIDGE_THRESHOLD
              and gap < GAP_RATIO * min(left, right))
    return {"left": left, "right": right, "bridge": bridge, "gap": gap, "passed": bool(passed)}


def outside_band_share(mask: np.ndarray, band: np.ndarray) -> float:
    """Share of an edit mask's area (boolean (H, W)) that falls outside the eye band."""
    area = mask.sum()
    return float((mask & ~band).sum() / area) if area else 0.0


def judge(out: np.ndarray, inp: np.ndarray, ssim_map: np.ndarray, face: synth.Face, masks: Masks, i: int) -> dict:
    """Every benchmark metric of one output against its input (image `i` of `masks`)."""
    from adapt import metrics
    outside = ~masks.band[i]
    lens = lens_darkening(out, inp, masks.lens[i], masks.skin[i])
    return {"ssim_out": float(ssim_map[outside].mean()), "psnr_out": metrics.psnr(out, inp, outside),
            "drift_out": metrics.colour_drift(out, inp, outside), "lens": lens,
            "detected": float(lens >= SUNGLASSES_THRESHOLD), "shape": float(shape(out, inp, face, masks.skin[i])["passed"])}
