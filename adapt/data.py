"""Image-caption datasets: local imagefolders, Hugging Face hub datasets, and datasets/<name> definitions.

Nothing is dropped silently. Every image or metadata row that cannot be used is recorded in a
`DataReport` with its name and reason, logged as a count, and only an empty result is an error.
Local folders are read with our own tolerant reader (the `datasets` imagefolder builder stops at
the first corrupt file); hub datasets go through `datasets.load_dataset` with decoding left to us.
"""

from __future__ import annotations

import hashlib
import io
import logging
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image, ImageOps

from adapt import buckets, imagefolder

log = logging.getLogger("adapt.data")
MAX_PIXELS = 64 * 1024 * 1024  # declared sizes above this are refused before decoding (bomb guard)


class DataError(ValueError):
    """The dataset is unusable as a whole (missing, empty, nothing decodable); the message says why."""


class MissingSplit(DataError):
    """The folder is split (train/, test/, ...) but has no split of the name asked for; `found` lists its splits."""

    def __init__(self, message: str, found: list[str]):
        super().__init__(message)
        self.found = found


@dataclass
class Record:
    name: str  # file name relative to the dataset root, or "<split>[i]" for hub rows
    caption: str
    load: object  # () -> PIL.Image, raises on bad data
    extra: dict = field(default_factory=dict)  # other metadata columns (e.g. eye_boxes)
    path: Path | None = None  # the file, for local folders (masks are found beside it)
    repeats: int = 1  # how many times as often the sampler draws it (kohya's N_name folders, data.kohya_folders)


@dataclass
class DataReport:
    """What happened to every input: kept, converted, or skipped with a reason."""
    skipped: dict = field(default_factory=lambda: defaultdict(list))  # reason -> [names]
    notes: dict = field(default_factory=lambda: defaultdict(list))  # conversions, default captions, ...
    kept: int = 0
    split: str = ""  # which split of a split folder was read, for the log

    def skip(self, reason: str, name: str):
        self.skipped[reason].append(name)

    def note(self, what: str, name: str):
        self.notes[what].append(name)

    @property
    def num_skipped(self) -> int:
        return sum(len(v) for v in self.skipped.values())

    def summary(self) -> str:
        lines = [f"{self.kept} images usable, {self.num_skipped} skipped" + (f"; {self.split}" if self.split else "")]
        for reason, names in sorted(self.skipped.items()):
            lines.append(f"  skipped {len(names)} ({reason}): {', '.join(names[:10])}{' ...' if len(names) > 10 else ''}")
        for what, names in sorted(self.notes.items()):
            lines.append(f"  {what}: {len(names)} ({', '.join(names[:5])}{' ...' if len(names) > 5 else ''})")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"kept": self.kept, "skipped": {k: list(v) for k, v in self.skipped.items()},
                "notes": {k: list(v) for k, v in self.notes.items()}, **({"split": self.split} if self.split else {})}


def open_image(src) -> Image.Image:
    """Decode a path or bytes to an RGB image the way users expect, or raise ValueError naming the problem.

    EXIF orientation applied; transparency composited on white; CMYK and palette converted;
    16-bit scaled to 8-bit (not clipped); declared sizes over MAX_PIXELS refused before decoding.
    """
    if not imagefolder.heif_decoder() and isinstance(src, (str, Path)) and Path(src).suffix.lower() in imagefolder.HEIF_EXTS:
        raise ValueError(f'a {Path(src).suffix[1:].upper()} photo, which Pillow cannot decode without pillow-heif: '
                         'pip install "adapt[heif]", or convert it to JPEG or PNG')
    try:
        img = Image.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else src)
    except Image.DecompressionBombError as e:
        raise ValueError(f"declared size too large (decompression bomb guard): {e}") from None
    except (OSError, SyntaxError) as e:
        raise ValueError(f"not a readable image ({type(e).__name__}: {e})") from None
    w, h = img.size
    if w * h > MAX_PIXELS:
        raise ValueError(f"declared size {w}x{h} exceeds {MAX_PIXELS} pixels (decompression bomb guard)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
        img = ImageOps.exif_transpose(img)
    except Exception as e:  # truncated / corrupt data surfaces only at load()
        raise ValueError(f"corrupt or truncated image data ({type(e).__name__}: {e})") from None
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "RGB" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return img.convert("RGB")


def _decode_caption(raw, name: str, report: DataReport) -> str | None:
    if raw is None:
        return None
    if not isinstance(raw, str):
        report.note("non-string caption converted to text", name)
        raw = str(raw)
    return raw.strip()


def read_folder(root: str | Path, caption_column: str = "text", default_caption: str = "",
                report: DataReport | None = None, masks: str | None = None,
                kohya_folders: bool = False, split: str | None = None) -> tuple[list[Record], DataReport]:
    """Records of a local imagefolder: captions from its metadata files (adapt.imagefolder), else `<image>.txt`
    sidecars, else (with `kohya_folders`, for images in an `N_name` folder) the folder's name, else the default.
    With `kohya_folders` such an image is drawn N times as often (Record.repeats), as sd-scripts repeats it.
    A folder split the way Hugging Face datasets reads it (train/, test/, ...) gives only `split`'s images
    (None: every image). A mask folder inside `root` (data.masks) is not read as training images."""
    root = Path(root)
    report = report or DataReport()
    if not root.is_dir():
        raise DataError(f"dataset folder not found: {root}")
    every = sorted(p for p in root.rglob("*") if p.is_file())
    for p in [p for p in every if imagefolder.hidden(p.relative_to(root))]:  # macOS's ._x.jpg twins, __MACOSX/
        every.remove(p)
        if imagefolder.is_image(p):
            report.note("hidden, or in a hidden or __ folder (as __MACOSX/): left out, as Hugging Face datasets "
                        "leaves it out", p.relative_to(root).as_posix())
    chosen = imagefolder.choose_split(root, split, every) if split else None
    if chosen:
        report.split = chosen.line
        every = [p for p in every if p.resolve() not in chosen.elsewhere]  # metadata outside every split stays
    rows = imagefolder.read_metadata(root, every, report)
    has_column = any(caption_column in r for r in rows.values())
    # Mask images are not training images: the data.masks folder and any folder named masks/ (what
    # `adapt data build` writes beside its images, split folders included) are left out, and the log says how many.
    skips = [imagefolder.mask_root(root, masks).resolve()] if masks and masks != "alpha" else []
    files, masked_out = [], []
    for p in (p for p in every if p.suffix.lower() in imagefolder.PHOTO_EXTS and not imagefolder.is_image(p)):
        heif = p.suffix.lower() in imagefolder.HEIF_EXTS  # an iPhone's photos: pillow-heif reads them
        report.skip(f"a {p.suffix.lower()[1:].upper()} photo, which Pillow cannot decode: "
                    + ('pip install "adapt[heif]" (pillow-heif) to read it, or convert it to JPEG or PNG' if heif
                       else "convert it to JPEG or PNG"), p.relative_to(root).as_posix())
    for p in (p for p in every if imagefolder.is_image(p)):
        out = imagefolder.in_masks(p.relative_to(root)) or any(p.resolve().is_relative_to(d) for d in skips)
        (masked_out if out else files).append(p)
    for p in masked_out:
        report.note("mask files (masks/, data.masks) not read as images of the set", p.relative_to(root).as_posix())
    if chosen:  # `datasets` leaves out what no split names; so do we, counted
        for p in [p for p in files if p.resolve() not in chosen.files]:
            report.skip("in no split (the folder is split; Hugging Face datasets leaves such files out too)",
                        p.relative_to(root).as_posix())
            files.remove(p)
    inside = root.resolve()
    for p in [p for p in files if not p.resolve().is_relative_to(inside)]:  # a symlink to elsewhere: never trained on
        report.skip("symlink points outside the dataset folder", p.relative_to(root).as_posix())
        files.remove(p)
    listed = {p.relative_to(root).as_posix(): p for p in files}
    for key in rows:
        if not (root / key).exists():
            report.skip("metadata names a file that does not exist", key)
    records, defaulted = [], []
    for key, path in listed.items():
        row = rows.get(key, {})
        kohya = imagefolder.kohya_folder(key)
        if kohya and not kohya_folders:
            report.note("in a folder named like kohya's N_name, read as a plain subfolder (data.kohya_folders=true "
                        "repeats and captions it as kohya does)", key)
            kohya = None
        if kohya and int(kohya.group(1)) == 0:
            report.skip("in a kohya folder with 0 repeats", key)
            continue
        caption = _decode_caption(row.get(caption_column), key, report)
        if caption is None:
            caption = imagefolder.sidecar_caption(path)
        if caption is None and kohya:
            report.note("no caption: its kohya folder's name used", key)
            caption = kohya.group(2)
        if caption is None:
            if has_column:
                report.note(f"no '{caption_column}' caption, default used", key)
            defaulted.append(key)
            caption = default_caption.format(name=path.stem)
        extra = {k: v for k, v in row.items() if k not in ("file_name", caption_column)}
        records.append(Record(key, caption, (lambda p=path: open_image(p)), extra, path, int(kohya.group(1)) if kohya else 1))
    if rows and not has_column and defaulted:  # captions under another column's name: diffusers' scripts stop here too
        columns = sorted(set().union(*rows.values()) - {"file_name"})
        if not default_caption:
            raise DataError(f"{root}: its metadata has no {caption_column!r} column (its columns: {columns}), and "
                            f"{len(defaulted)} image(s) have no caption file either; name the captions' column "
                            "(data.caption_column, or caption_column for adapt eval), or give data.default_caption to "
                            "caption them alike")
        report.note(f"metadata without a {caption_column!r} column (its columns: {columns}): data.default_caption "
                    "used", f"{len(defaulted)} image(s)")
    return records, report


def read_hub(dataset_id: str, split: str, image_column: str, caption_column: str, default_caption: str,
             report: DataReport | None = None) -> tuple[list[Record], DataReport]:
    """Records of a Hugging Face hub dataset; images are decoded by `open_image`, not by `datasets`."""
    import datasets as hf
    report = report or DataReport()
    try:
        ds = hf.load_dataset(dataset_id, split=split)
    except Exception as e:
        raise DataError(f"hub dataset {dataset_id!r} split {split!r} could not be loaded "
                        f"(offline or not found?): {type(e).__name__}: {e}") from e
    for col in (image_column,) + (() if default_caption else (caption_column,)):
        if col not in ds.column_names:
            raise DataError(f"hub dataset {dataset_id!r} has no column {col!r}; columns: {ds.column_names}")
    ds = ds.cast_column(image_column, hf.Image(decode=False))
    records = []
    for i, row in enumerate(ds):
        name = f"{split}[{i}]"
        cell = row[image_column]
        src = cell.get("bytes") or cell.get("path")
        caption = _decode_caption(row.get(caption_column), name, report)
        if caption is None:
            report.note(f"no '{caption_column}' caption, default used", name)
            caption = default_caption.format(name=name)
        records.append(Record(name, caption, (lambda s=src: open_image(s))))
    return records, report


def read_definition(folder: Path, split: str, num_images: int | None, cache_dir: Path,
                    report: DataReport | None = None, masks: str | None = None) -> tuple[list[Record], DataReport]:
    """A datasets/<name>/ definition (dataset.yaml): built once into the cache, then read as a folder."""
    spec = yaml.safe_load((folder / "dataset.yaml").read_text()) or {}
    builder = spec.get("builder")
    if builder == "synth":
        from adapt import synth
        n = num_images or spec.get("default_n", {}).get(split) or 64
        shapes = {k: spec[k] for k in ("aspects", "scales") if k in spec}  # non-square photos (synth.make_photo)
        from adapt.cache import cache_key
        tag = "-" + cache_key(**shapes)[:8] if shapes else ""
        out = cache_dir / "datasets" / folder.name / f"{split}-{n}-{spec.get('size', 64)}{tag}-m"  # -m: with masks/
        if not (out / "metadata.jsonl").exists():  # several processes may build at once: last rename wins
            import os
            import shutil
            tmp = out.with_name(out.name + f".tmp{os.getpid()}")
            synth.build_imagefolder(spec["domain"], tmp, n=n, split=split, size=spec.get("size", 64), **shapes)
            try:
                tmp.rename(out)
            except OSError:
                shutil.rmtree(tmp, ignore_errors=True)
        return read_folder(out, "text", spec.get("default_caption", ""), report, masks)
    if builder == "hub":
        return read_hub(spec["id"], split, spec.get("image_column", "image"), spec.get("caption_column", "text"),
                        spec.get("default_caption", ""), report)
    if builder == "folder":
        return read_folder(folder / spec["path"].format(split=split), spec.get("caption_column", "text"),
                           spec.get("default_caption", ""), report, masks)
    raise DataError(f"{folder / 'dataset.yaml'}: unknown builder {builder!r} (expected synth, hub or folder)")


def default_cache_dir() -> Path:
    """$ADAPT_CACHE or ~/.cache/adapt, checked to be a writable folder (created if missing)."""
    import os
    return usable_cache_dir(Path(os.environ.get("ADAPT_CACHE", Path.home() / ".cache" / "adapt")),
                            "ADAPT_CACHE" if "ADAPT_CACHE" in os.environ else "the default cache")


def usable_cache_dir(path: Path, what: str) -> Path:
    """`path` as a writable folder, or an error naming `what` (the variable or key that set it)."""
    from adapt.atomic import writable_dir
    return writable_dir(path, what)


REPO = Path(__file__).resolve().parents[1]  # the checkout adapt runs from; its datasets/ holds the definitions


def definition(name: str) -> Path | None:
    """The datasets/<name> definition folder (with dataset.yaml) that `name` means: a folder path as given, else
    datasets/<name> in the current directory, else this repository's, from any directory; None when none exists."""
    given = Path(name).expanduser()
    rel = given if given.parts[:1] == ("datasets",) else Path("datasets") / given
    for folder in (given, rel, REPO / rel):
        if (folder / "dataset.yaml").is_file():
            return folder
    return None


def read_records(source: str, split: str = "train", image_column: str = "image", caption_column: str = "text",
                 default_caption: str = "", num_images: int | None = None, cache_dir: str | Path | None = None,
                 masks: str | None = None, kohya_folders: bool = False):
    """Dispatch on the source form; returns (records, report). Raises DataError when nothing is usable."""
    cache = usable_cache_dir(Path(cache_dir), "data.cache_dir") if cache_dir else default_cache_dir()
    p = Path(source).expanduser()
    ours = REPO / source  # datasets/<name> means this repository's (a checkout)
    if not p.exists() and source.startswith("datasets/") and (ours / "dataset.yaml").is_file():
        records, report = read_definition(ours, split, num_images, cache, masks=masks)
        report.note("read from adapt's repository (not found in the current directory)", str(ours))
    elif p.is_dir() and (p / "dataset.yaml").is_file():
        records, report = read_definition(p, split, num_images, cache, masks=masks)
    elif p.is_dir():
        records, report = read_folder(p, caption_column, default_caption, masks=masks, kohya_folders=kohya_folders,
                                      split=split)
    elif masks:
        raise DataError(f"data.masks={masks!r}: masks need a local image folder, not the hub dataset {source!r}")
    elif source.count("/") == 1 and not source.startswith((".", "/", "~")):
        try:
            records, report = read_hub(source, split, image_column, caption_column, default_caption)
        except DataError as e:  # "datasets/synth_faces" from outside the repo reads as a hub id: say both
            raise DataError(f"{e}; nor is it a folder: no {p.absolute()} (a relative path is read from the current "
                            "directory)") from None
    else:
        raise DataError(f"dataset not found: {source!r} is not a folder, a datasets/<name> definition or a hub id")
    if num_images is not None:
        records = records[:num_images]
    return records, report


def fit(img: Image.Image, resolution: int) -> tuple[Image.Image, tuple[int, int]]:
    """Resize the short side to `resolution` (bicubic) and centre-crop a square.

    Returns the crop and its (top, left) in resized pixels, which SDXL's micro-conditioning takes.
    """
    out, p = buckets.place(img, (resolution, resolution))
    return out, p.crop_top_left


def decode(records: list[Record], report: DataReport, min_size: int | None) -> tuple[list[Image.Image], list[Record]]:
    """Decode every record; an unreadable file, or one whose short side is below `min_size`, is skipped and named.
    Each kept record gets `extra['content_hash']`, a hash of its decoded pixels at their own size (the identity
    of an image whatever it is later resized or cropped to: evaluation checks it against the training set)."""
    images, kept = [], []
    for r in records:
        try:
            img = r.load()
        except (ValueError, OSError) as e:
            report.skip(str(e).split(" (")[0], r.name)
            continue
        if min_size and min(img.size) < min_size:
            report.skip(f"smaller than {min_size} px on the short side", f"{r.name} ({img.size[0]}x{img.size[1]})")
            continue
        r.extra["content_hash"] = hashlib.sha256(f"{img.size}".encode() + img.tobytes()).hexdigest()[:16]
        images.append(img)
        kept.append(r)
    first: dict[str, str] = {}
    for r in kept:  # a photo exported twice (IMG_1.jpg, IMG_1 (1).jpg) is drawn twice as often: kept, and said
        if (seen := first.setdefault(r.extra["content_hash"], r.name)) != r.name:
            report.note("the same pixels as an earlier image (kept: it is drawn that much more often)", f"{r.name} = {seen}")
    report.kept = len(kept)
    if not kept:
        raise DataError(f"no usable images: {report.summary()}")
    return images, kept


def load_images(records: list[Record], resolution: int, report: DataReport,
                min_size: int | None = None) -> tuple[torch.Tensor, list[Record]]:
    """Decode and centre-crop every record to a square: (N, 3, R, R) in [-1, 1] and the records kept.

    For evaluation and classifiers, which compare images of one shape. Images whose short side is below
    `min_size` (default resolution/2) are skipped: upscaling them would teach the classifiers blur.
    """
    images, kept = decode(records, report, resolution // 2 if min_size is None else min_size)
    arrays = []
    for r, img in zip(kept, images):
        fitted, crop = fit(img, resolution)
        arrays.append(np.asarray(fitted, dtype=np.uint8))
        r.extra["original_size"], r.extra["crop_top_left"] = (img.size[1], img.size[0]), crop  # (h, w), (top, left)
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x, kept


def fingerprint(records: list[Record], pixels, crops: int = 1) -> str:
    """sha256 over names, captions and decoded pixels (every crop of each image): identifies a training set."""
    h = hashlib.sha256()
    for i, r in enumerate(records):
        h.update(r.name.encode())
        h.update(r.caption.encode())
        for x in pixels[i * crops:(i + 1) * crops]:
            h.update(((x + 1) * 127.5).round().to(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def image_fingerprints(pixels: torch.Tensor) -> list[str]:
    """Per-image hashes of sized pixels (what adapters before 0.9 recorded; `decode` now records content hashes)."""
    return [hashlib.sha256(((x + 1) * 127.5).round().to(torch.uint8).numpy().tobytes()).hexdigest()[:16] for x in pixels]


def load_sized(source: str, sizing: buckets.Sizing, split: str = "train", image_column: str = "image",
               caption_column: str = "text", default_caption: str = "", num_images: int | None = None, cache_dir=None,
               logger=None, masks: str | None = None, kohya_folders: bool = False) -> tuple[buckets.Sized, list[Record], DataReport]:
    """Read and decode a training set and place each image in its aspect bucket (adapt.buckets).
    Images smaller than their bucket are upscaled and named in the log, unless `sizing.min_size` skips them."""
    say = logger or log.info
    records, report = read_records(source, split, image_column, caption_column, default_caption, num_images, cache_dir, masks,
                                   kohya_folders)
    if not records and not report.num_skipped:
        raise DataError(f"no images found in {source!r} (split {split!r})")
    images, kept = decode(records, report, sizing.min_size)
    sized = buckets.size_images(images, sizing)
    for r, p in zip(kept, sized.placements[::sized.crops]):
        r.extra["original_size"], r.extra["crop_top_left"] = p.original_size, p.crop_top_left
        if p.upscaled:
            report.note(f"upscaled to fit its bucket (set data.min_size to skip such images)",
                        f"{r.name} ({p.original_size[1]}x{p.original_size[0]} -> {p.bucket[0]}x{p.bucket[1]})")
    say(f"data {source}: {report.summary()}")
    upscaled = [r.name for r, p in zip(kept, sized.placements[::sized.crops]) if p.upscaled]
    if upscaled:
        say(f"WARNING: {len(upscaled)} image(s) smaller than their bucket were upscaled (soft detail teaches blur): "
            f"{', '.join(upscaled[:10])}{' ...' if len(upscaled) > 10 else ''}")
    return sized, kept, report


def load(source: str, resolution: int, split: str = "train", image_column: str = "image", caption_column: str = "text",
         default_caption: str = "", num_images: int | None = None, cache_dir=None,
         logger=None, masks: str | None = None) -> tuple[torch.Tensor, list[Record], DataReport]:
    """Read, decode and size a dataset; logs what was skipped or converted. Returns (pixels, records, report)."""
    records, report = read_records(source, split, image_column, caption_column, default_caption, num_images, cache_dir, masks)
    if not records and not report.num_skipped:
        raise DataError(f"no images found in {source!r} (split {split!r})")
    pixels, kept = load_images(records, resolution, report)
    (logger or log.info)(f"data {source}: {report.summary()}")
    return pixels, kept, report
