"""Procedural source/target domains: 64x64 "faces" and the same faces wearing sunglasses.

Everything is a pure function of an integer seed, so the same seed rendered with and
without glasses is a ground-truth pair, and each image comes with its eye boxes (the
region the target domain is allowed to change). Splits are disjoint seed ranges.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from dataclasses import replace as with_fields
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# Disjoint seed ranges per split; a split holds at most SPLIT_SIZE images.
SPLIT_SIZE = 1_000_000
SPLITS = {"pretrain": 0, "train": 1, "classifier": 2, "eval": 3, "val": 4}
DOMAINS = ("faces", "sunglasses")

BACKGROUNDS = {
    "teal": (40, 150, 150), "yellow": (230, 200, 60), "pink": (235, 150, 180),
    "blue": (70, 110, 210), "green": (90, 170, 80), "grey": (150, 150, 150),
    "orange": (235, 140, 50), "purple": (140, 90, 180),
}
SKINS = [(250, 220, 190), (240, 195, 160), (210, 160, 120), (170, 120, 85),
         (130, 90, 60), (95, 65, 45)]
HAIR_COLOURS = {
    "black": (25, 25, 25), "brown": (110, 70, 35), "blond": (230, 200, 110),
    "red": (190, 60, 30), "white": (235, 235, 235), "blue": (50, 80, 200),
}
HAIR_STYLES = ("short", "long", "curly", "spiky")
LENS_TINTS = {"black": (15, 15, 20), "navy": (20, 25, 70), "green": (20, 55, 35),
              "brown": (60, 35, 20)}
LENS_SHAPES = ("round", "square", "aviator")
SCALE = 4  # render at 4x and downsample, for anti-aliased edges


@dataclass
class Face:
    """Attributes of one face; `eye_boxes` are [x0, y0, x1, y1] in output pixels."""
    seed: int
    background: str
    skin: int
    hair_colour: str
    hair_style: str
    lens_tint: str
    lens_shape: str
    face_box: list
    eye_boxes: list

    def caption(self, sunglasses: bool) -> str:
        text = f"a face with {self.hair_colour} {self.hair_style} hair on a {self.background} background"
        return text + (" wearing sunglasses" if sunglasses else "")


def split_seed(split: str, index: int) -> int:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLITS)}")
    if not 0 <= index < SPLIT_SIZE:
        raise ValueError(f"index {index} outside [0, {SPLIT_SIZE})")
    return SPLITS[split] * SPLIT_SIZE + index


def sample_face(seed: int, size: int = 64) -> Face:
    """Draw the attributes of face `seed` (glasses attributes too, used only if worn)."""
    rng = np.random.default_rng(seed)
    cx = size / 2 + rng.uniform(-3, 3)
    cy = size / 2 + 2 + rng.uniform(-2, 2)
    rx = size * rng.uniform(0.26, 0.31)
    ry = size * rng.uniform(0.32, 0.37)
    eye_y = cy - ry * rng.uniform(0.12, 0.22)
    eye_dx = rx * rng.uniform(0.40, 0.48)
    ew, eh = size * 0.085, size * 0.06  # half-extent of the lens box around an eye
    eyes = [[cx + s * eye_dx - ew, eye_y - eh, cx + s * eye_dx + ew, eye_y + eh] for s in (-1, 1)]
    return Face(
        seed=seed,
        background=str(rng.choice(list(BACKGROUNDS))),
        skin=int(rng.integers(len(SKINS))),
        hair_colour=str(rng.choice(list(HAIR_COLOURS))),
        hair_style=str(rng.choice(HAIR_STYLES)),
        lens_tint=str(rng.choice(list(LENS_TINTS))),
        lens_shape=str(rng.choice(LENS_SHAPES)),
        face_box=[round(v, 2) for v in (cx - rx, cy - ry, cx + rx, cy + ry)],
        eye_boxes=[[round(v, 2) for v in b] for b in eyes],
    )


def render(face: Face, sunglasses: bool, size: int = 64) -> Image.Image:
    """Render `face` as an RGB image of `size` px; deterministic for a given Face."""
    s = SCALE
    img = Image.new("RGB", (size * s, size * s), BACKGROUNDS[face.background])
    d = ImageDraw.Draw(img)
    x0, y0, x1, y1 = [v * s for v in face.face_box]
    cx, w, h = (x0 + x1) / 2, x1 - x0, y1 - y0
    hair = HAIR_COLOURS[face.hair_colour]
    skin = SKINS[face.skin]
    rng = np.random.default_rng(face.seed + 7)  # hair texture, independent of attributes

    if face.hair_style == "long":  # hair behind the face, down to the shoulders
        d.rounded_rectangle([x0 - 0.12 * w, y0 - 0.1 * h, x1 + 0.12 * w, y1 + 0.05 * h], radius=0.3 * w, fill=hair)
    d.ellipse([x0, y0, x1, y1], fill=skin)
    if face.hair_style in ("short", "long"):
        d.chord([x0 - 0.04 * w, y0 - 0.08 * h, x1 + 0.04 * w, y0 + 0.55 * h], 180, 360, fill=hair)
    elif face.hair_style == "curly":
        for k in range(9):
            a = np.pi * (1 + k / 8)
            px, py = cx + 0.5 * w * np.cos(a), y0 + 0.22 * h + 0.3 * h * np.sin(a)
            r = 0.13 * w * rng.uniform(0.85, 1.15)
            d.ellipse([px - r, py - r, px + r, py + r], fill=hair)
    elif face.hair_style == "spiky":
        for k in range(7):
            bx = x0 + 0.1 * w + k * 0.8 * w / 6
            tip = y0 - 0.12 * h * rng.uniform(0.7, 1.3)
            d.polygon([(bx - 0.09 * w, y0 + 0.18 * h), (bx + 0.09 * w, y0 + 0.18 * h), (bx, tip)], fill=hair)
        d.chord([x0, y0, x1, y0 + 0.45 * h], 180, 360, fill=hair)

    # Eyes: white, dark pupil. Mouth: a red arc.
    for ex0, ey0, ex1, ey1 in face.eye_boxes:
        ecx, ecy = (ex0 + ex1) / 2 * s, (ey0 + ey1) / 2 * s
        er = 0.045 * size * s
        d.ellipse([ecx - er, ecy - 0.7 * er, ecx + er, ecy + 0.7 * er], fill=(250, 250, 250))
        pr = 0.5 * er
        d.ellipse([ecx - pr, ecy - pr * 0.9, ecx + pr, ecy + pr * 0.9], fill=(40, 30, 30))
    my = y0 + 0.72 * h
    d.arc([cx - 0.2 * w, my - 0.1 * h, cx + 0.2 * w, my + 0.06 * h], 20, 160, fill=(170, 40, 50), width=int(1.6 * s))

    if sunglasses:
        tint = LENS_TINTS[face.lens_tint]
        boxes = [[v * s for v in b] for b in face.eye_boxes]
        for bx0, by0, bx1, by1 in boxes:
            if face.lens_shape == "round":
                d.ellipse([bx0, by0, bx1, by1], fill=tint)
            elif face.lens_shape == "square":
                d.rounded_rectangle([bx0, by0, bx1, by1], radius=0.2 * (bx1 - bx0), fill=tint)
            else:  # aviator: wider at the top
                d.polygon([(bx0, by0), (bx1, by0), (bx1 - 0.15 * (bx1 - bx0), by1), (bx0 + 0.15 * (bx1 - bx0), by1)], fill=tint)
        (lx0, ly0, lx1, ly1), (rx0, ry0, rx1, ry1) = boxes
        by = ly0 + 0.3 * (ly1 - ly0)
        d.line([(lx1, by), (rx0, by)], fill=tint, width=int(1.2 * s))  # bridge
        d.line([(lx0, by), (x0 + 0.01 * w, by)], fill=tint, width=int(1.0 * s))  # temples
        d.line([(rx1, by), (x1 - 0.01 * w, by)], fill=tint, width=int(1.0 * s))
    return img.resize((size, size), Image.LANCZOS)


def eye_mask(face: Face, size: int | tuple[int, int] = 64, margin: float = 1.0) -> np.ndarray:
    """Boolean (H, W) mask of the eye band: both lens boxes plus the bridge between them. `size`: the side of a
    square image, or (W, H)."""
    (lx0, ly0, lx1, ly1), (rx0, ry0, rx1, ry1) = face.eye_boxes
    w, h = (size, size) if isinstance(size, int) else size
    m = np.zeros((h, w), dtype=bool)
    y0, y1 = int(np.floor(min(ly0, ry0) - margin)), int(np.ceil(max(ly1, ry1) + margin))
    x0, x1 = int(np.floor(face.face_box[0] - margin)), int(np.ceil(face.face_box[2] + margin))
    m[max(y0, 0):min(y1, h), max(x0, 0):min(x1, w)] = True
    return m


def lens_mask(face: Face, size: int = 64) -> np.ndarray:
    """Boolean mask of the two lens boxes (where the lenses of a target image are)."""
    m = np.zeros((size, size), dtype=bool)
    for x0, y0, x1, y1 in face.eye_boxes:
        m[int(np.ceil(y0)):int(np.floor(y1)), int(np.ceil(x0)):int(np.floor(x1))] = True
    return m


def skin_mask(face: Face, size: int = 64) -> np.ndarray:
    """Boolean mask of bare cheek skin: below the eye band, above the mouth, inside the face."""
    x0, y0, x1, y1 = face.face_box
    (_, _, _, ly1), (_, _, _, ry1) = face.eye_boxes
    top = max(ly1, ry1) + 1.5
    bottom = y0 + 0.62 * (y1 - y0)
    m = np.zeros((size, size), dtype=bool)
    cx, w = (x0 + x1) / 2, x1 - x0
    m[int(np.ceil(top)):int(np.floor(bottom)), int(np.ceil(cx - 0.3 * w)):int(np.floor(cx + 0.3 * w))] = True
    return m


def make(domain: str, split: str, index: int, size: int = 64) -> tuple[Image.Image, str, Face]:
    """(image, caption, face) for image `index` of `split` in `domain` ("faces" or "sunglasses")."""
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; expected one of {DOMAINS}")
    face = sample_face(split_seed(split, index), size)
    glasses = domain == "sunglasses"
    return render(face, glasses, size), face.caption(glasses), face


def make_photo(domain: str, split: str, index: int, size: int = 64, aspect: float = 1.0,
               scale: float = 1.0) -> tuple[Image.Image, str, Face]:
    """A non-square "photo": face `index` (rendered at `size`) on a canvas of aspect `aspect` (width / height;
    the short side is `size`) in its background colour, then resized by `scale`. The face sits at a seeded
    place: anywhere along a landscape, in the upper third of a portrait (where phone portraits put it, and
    where a centre crop cuts). The returned Face's boxes are in the photo's pixels."""
    img, caption, face = make(domain, split, index, size)
    w, h = (round(size * aspect), size) if aspect >= 1 else (size, round(size / aspect))
    rng = np.random.default_rng(face.seed + 11)
    left, top = int(rng.integers(0, w - size + 1)), int(rng.integers(0, (h - size) // 3 + 1))
    canvas = Image.new("RGB", (w, h), BACKGROUNDS[face.background])
    canvas.paste(img, (left, top))
    move = lambda b: [round((b[0] + left) * scale, 2), round((b[1] + top) * scale, 2),
                      round((b[2] + left) * scale, 2), round((b[3] + top) * scale, 2)]
    face = with_fields(face, face_box=move(face.face_box), eye_boxes=[move(b) for b in face.eye_boxes])
    if scale != 1.0:
        canvas = canvas.resize((round(w * scale), round(h * scale)), Image.LANCZOS)
    return canvas, caption, face


def build_imagefolder(domain: str, out: str | Path, n: int, split: str, size: int = 64, start: int = 0,
                      replace: bool = False, aspects: list | None = None, scales: list | None = None) -> Path:
    """Write `n` images of `split` as an imagefolder: PNGs plus metadata.jsonl.

    `aspects` / `scales` (cycled over the images) make non-square photos of several sizes (`make_photo`);
    None = squares of `size`. Each metadata row holds `file_name`, `text`, `seed`, `face_box` and `eye_boxes`, so
    evaluation can rebuild the eye-band mask of every image; `masks/` holds that mask as a PNG per image
    (white = the eye band, where sunglasses go), for masked-loss training (`data.masks=masks`). The folder is built beside `out` and renamed
    into place, so a failure (a full disk) leaves no half-built dataset; a non-empty `out` is refused
    unless `replace`.
    """
    import shutil

    from adapt.atomic import WriteError, fsync_dir
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not replace:
        raise ValueError(f"{out} exists and is not empty")
    tmp = out.with_name(f".{out.name}.building-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        rows = []
        (tmp / "masks").mkdir()
        for i in range(start, start + n):
            if aspects or scales:
                k = i - start
                img, caption, face = make_photo(domain, split, i, size, (aspects or [1.0])[k % len(aspects or [1])],
                                                (scales or [1.0])[k % len(scales or [1])])
            else:
                img, caption, face = make(domain, split, i, size)
            name = f"{split}_{i:06d}.png"
            img.save(tmp / name)
            Image.fromarray(eye_mask(face, img.size).astype(np.uint8) * 255).save(tmp / "masks" / name)
            rows.append({"file_name": name, "text": caption, "seed": face.seed,
                         "face_box": face.face_box, "eye_boxes": face.eye_boxes,
                         "attributes": {k: v for k, v in asdict(face).items() if k not in ("seed", "face_box", "eye_boxes")}})
        (tmp / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        tmp.rename(out)
        fsync_dir(out.parent)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise WriteError(f"could not build {out}: {e.strerror or e}; nothing was written there") from e
    return out


def vocabulary() -> list[str]:
    """Every word a synthetic caption can contain (for the embedded base's tokenizer)."""
    words = {"a", "face", "with", "hair", "on", "background", "wearing", "sunglasses",
             "photo", "of", "person", "the", "and", "glasses"}
    words |= set(BACKGROUNDS) | set(HAIR_COLOURS) | set(HAIR_STYLES)
    return sorted(words)


def clutter(img: Image.Image, seed: int, size: int = 64) -> Image.Image:
    """`img` overdrawn with random primitives: thin lines, filled ellipses and rounded boxes in random colours
    at random places (drawn at SCALE x and downsampled, like the renders).

    For training the embedded base's *VAE* only: a real LDM's autoencoder learns a broad image
    distribution (OpenImages for SD's), so it can encode and decode shapes its diffusion model never saw.
    A VAE trained on clean faces alone cannot represent a thin dark line (its round trip of real
    sunglasses renders is a smudge). The clutter is never arranged as glasses, and the UNet never sees it.
    """
    rng = np.random.default_rng(seed + 1_000_000_007)
    s = SCALE
    big = img.resize((size * s, size * s), Image.NEAREST)
    d = ImageDraw.Draw(big)
    for _ in range(int(rng.integers(2, 7))):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3)) if rng.random() < 0.5 else \
            tuple(int(c) for c in rng.integers(0, 80, 3))  # half dark: dark thin features are what the face set lacks
        kind = rng.integers(3)
        x0, y0 = rng.uniform(0, size, 2) * s
        if kind == 0:
            x1, y1 = rng.uniform(0, size, 2) * s
            d.line([(x0, y0), (x1, y1)], fill=colour, width=max(1, int(rng.uniform(0.8, 2.5) * s)))
        else:
            w, h = rng.uniform(2, 14, 2) * s
            box = [x0, y0, x0 + w, y0 + h]
            if kind == 1:
                d.ellipse(box, fill=colour)
            else:
                d.rounded_rectangle(box, radius=rng.uniform(0, 0.4) * min(w, h), fill=colour)
    return big.resize((size, size), Image.LANCZOS)
