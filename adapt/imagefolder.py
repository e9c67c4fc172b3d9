"""How a local image folder is laid out: its splits, its metadata files, kohya's N_name folders and mask images.

A folder prepared for Hugging Face `datasets` (`load_dataset("imagefolder", data_dir=...)`) must read the same
here: the same images in each split, the same captions. So the split of each file is what `datasets` itself
assigns (`datasets.data_files`: train/, test/, validation/ and their synonyms such as eval/ or val/, in folder
or file names), and captions come from any of the metadata files it reads (metadata.jsonl, .csv, .parquet),
each naming files relative to its own folder. `adapt.data.read_folder` uses this module; the images
themselves are decoded there, by adapt's tolerant reader.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch
from PIL import Image, ImageOps

if TYPE_CHECKING:
    from adapt.data import DataReport, Record

# The extensions datasets' imagefolder reads (ImageFolder.EXTENSIONS; a test keeps ours a superset), and AVIF,
# which Pillow decodes since 11.3. Files with one are images of the set: one that will not decode is skipped and named.
IMAGE_EXTS = {".apng", ".avif", ".blp", ".bmp", ".bufr", ".bw", ".cur", ".dcx", ".dds", ".dib", ".emf", ".eps", ".fit",
              ".fits", ".flc", ".fli", ".ftc", ".ftu", ".gbr", ".gif", ".grib", ".icb", ".icns", ".ico", ".iim", ".im",
              ".j2c", ".j2k", ".jfif", ".jp2", ".jpc", ".jpe", ".jpeg", ".jpf", ".jpg", ".jpx", ".mpeg", ".mpg", ".msp",
              ".pbm", ".pcd", ".pcx", ".pgm", ".png", ".pnm", ".ppm", ".ps", ".psd", ".pxr", ".ras", ".rgb", ".rgba",
              ".sgi", ".tga", ".tif", ".tiff", ".vda", ".vst", ".webp", ".wmf", ".xbm", ".xpm"}
# Photos in formats Pillow does not decode (phones' HEIC, JPEG XL, camera raw): not images of the set, but each is
# counted and named in the log, never passed over in silence. HEIC / HEIF (what iPhones shoot) are images of the set
# when pillow-heif is installed (`pip install "adapt[heif]"`), which adds the format to Pillow.
PHOTO_EXTS = {".heic", ".heif", ".hif", ".jxl", ".dng", ".cr2", ".cr3", ".nef", ".arw", ".raf", ".orf", ".rw2"}
HEIF_EXTS = {".heic", ".heif", ".hif"}
CAPTION_EXTS = (".txt", ".caption")  # sidecar captions: kohya GUIs write .txt, sd-scripts' default is .caption
METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")  # what datasets' imagefolder reads
# datasets.data_files.SPLIT_KEYWORDS (a test keeps them equal). Importing datasets costs about 1 s, and its
# resolver about 1 ms a file, which a folder that names at most one split never needs to pay.
SPLIT_KEYWORDS = {"train": ["train", "training"], "validation": ["validation", "valid", "dev", "val"],
                  "test": ["test", "testing", "eval", "evaluation"]}
KOHYA_FOLDER = re.compile(r"^(\d+)_(.+)$")  # sd-scripts' DreamBooth layout: <repeats>_<caption words>/


def kohya_folder(key: str) -> re.Match | None:
    """The first folder on an image's path (relative to the dataset root) named like kohya's N_name, if any.
    sd-scripts reads them directly under its train_data_dir; a kohya_ss project keeps that in img/."""
    return next((m for part in key.split("/")[:-1] if (m := KOHYA_FOLDER.match(part))), None)


def hidden(rel: Path) -> bool:
    """What `datasets` never reads unless asked by name: hidden files and folders (.x), and folders named __x
    (a zip made on a Mac holds __MACOSX/ with a ._name twin of every image, which is no image)."""
    return rel.name.startswith(".") or any(p.startswith((".", "__")) for p in rel.parts[:-1])


@functools.lru_cache(maxsize=1)
def heif_decoder() -> bool:
    """Whether HEIC / HEIF photos decode here: pillow-heif, when installed, registers its opener with Pillow (once).
    The image comes out with its stored rotation applied and its EXIF orientation reset, so nothing turns twice."""
    try:
        import pillow_heif
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


def is_image(path: Path) -> bool:
    ext = path.suffix.lower()
    return ext in IMAGE_EXTS or (ext in HEIF_EXTS and heif_decoder())


def in_masks(rel: Path) -> bool:
    """In a folder named masks/: mask images (`adapt data build` writes them beside its images), not images of the set."""
    return "masks" in rel.parts[:-1]


@dataclass
class SplitChoice:
    files: set[Path]  # every file (resolved) that `datasets` puts in the chosen split
    elsewhere: set[Path]  # the files of the other splits
    line: str  # for the log: which split of which


def canonical_split(name: str) -> str:
    """A split name as `datasets` files it: 'eval' -> 'test', 'val' -> 'validation', 'training' -> 'train'."""
    return next((split for split, words in SPLIT_KEYWORDS.items() if name == split or name in words), name)


def choose_split(root: Path, split: str, files: list[Path]) -> SplitChoice | None:
    """The files of `split` when the folder (whose files are `files`) holds two or more splits the way `datasets`
    recognises them, else None (one set). Raises adapt.data.MissingSplit when the folder has splits and none of
    them is `split` (or a synonym of it)."""
    # datasets' split patterns need a split's keyword between separators in some folder or file name, so a
    # folder whose names hold the words of fewer than two splits is one set whatever the resolver would say.
    words = {w for f in files for part in f.relative_to(root).parts for w in re.split(r"[-._ 0-9]+", part.lower())}
    if sum(bool(words & set(ws)) for ws in SPLIT_KEYWORDS.values()) < 2:
        return None
    from adapt.data import MissingSplit
    from datasets.data_files import DataFilesDict, EmptyDatasetError, get_data_patterns
    try:
        patterns = get_data_patterns(str(root))
    except EmptyDatasetError:
        return None
    by_split = {str(k): v for k, v in DataFilesDict.from_patterns(patterns, base_path=str(root)).items()}
    images = {f.resolve() for f in files if is_image(f) and not in_masks(f.relative_to(root))}
    sizes = {k: n for k, v in by_split.items() if (n := sum(Path(f).resolve() in images for f in v))}
    if len(sizes) < 2:  # one split with images (every file is train_*.png, or all sit in train/): one set, all of it
        return None
    by_split = {k: by_split[k] for k in sizes}
    found = ", ".join(f"{k} ({n} image{'s' * (n != 1)})" for k, n in sorted(sizes.items()))
    want = canonical_split(split)
    if want not in by_split:
        raise MissingSplit(f"{root} is split as Hugging Face datasets reads it ({found}: train/, test/, validation/ "
                           f"or a synonym in folder or file names) and has no split {split!r}; choose one of "
                           f"{sorted(by_split)} (data.split for training; source_split, target_split and "
                           "classifier_split for adapt eval)", sorted(by_split))
    alias = "" if want == split else f" ({split!r} is a synonym of {want!r})"
    other = {Path(f).resolve() for k, v in by_split.items() if k != want for f in v}
    return SplitChoice({Path(f).resolve() for f in by_split[want]}, other, f"split {want!r}{alias} of {found}")


def read_metadata(root: Path, files: list[Path], report: DataReport) -> dict[str, dict]:
    """key (the image's path relative to `root`) -> its row, from every metadata file in `files`.

    As in `datasets`' imagefolder, a row's file_name is relative to the metadata file's own folder. A row that
    cannot be used is skipped and named; a metadata file that cannot be read at all is an error (every caption
    in it would silently become the default)."""
    from adapt.data import DataError
    metas = sorted((f for f in files if f.name in METADATA_FILES), key=lambda f: (len(f.parts), str(f)))
    folders: dict[Path, Path] = {}
    for m in metas:
        if m.parent in folders:
            raise DataError(f"{m.parent} has two metadata files, {folders[m.parent].name} and {m.name}: "
                            "keep one (Hugging Face datasets refuses the folder too)")
        folders[m.parent] = m
    inside = root.resolve()
    rows: dict[str, dict] = {}
    for m in metas:
        name = m.relative_to(root).as_posix()
        for where, row in _rows(m, name, report):
            if not isinstance(row, dict) or not isinstance(row.get("file_name"), str) or not row["file_name"]:
                report.skip("metadata row without a 'file_name' string", where)
                continue
            fn = row["file_name"]
            target = (m.parent / fn).resolve()
            if Path(fn).is_absolute() or "://" in fn or not target.is_relative_to(inside):
                report.skip("file_name points outside the dataset folder", f"{where} ({fn})")
                continue
            key = target.relative_to(inside).as_posix()
            if key in rows:
                report.skip("duplicate file_name (first row kept)", f"{where} ({fn})")
                continue
            rows[key] = row
    return rows


def _text(m: Path, name: str, report: DataReport) -> str:
    content = m.read_bytes()
    if content.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark (Notepad, Excel) would hide the first row
        content = content[3:]
        report.note("UTF-8 byte-order mark at the start of a metadata file ignored", name)
    try:
        return content.decode("utf-8")
    except UnicodeDecodeError:
        report.note("non-UTF-8 bytes in metadata replaced with U+FFFD", name)
        return content.decode("utf-8", errors="replace")


def _rows(m: Path, name: str, report: DataReport) -> Iterator[tuple[str, object]]:
    """(where, row) for each row of one metadata file; `where` names the file and line (or row) for the log."""
    from adapt.data import DataError
    if m.name == "metadata.jsonl":
        for lineno, line in enumerate(_text(m, name, report).splitlines(), 1):
            if line.strip():
                try:
                    yield f"{name}:{lineno}", json.loads(line)
                except json.JSONDecodeError as e:
                    report.skip(f"metadata line is not JSON: {e.msg}", f"{name}:{lineno}")
    elif m.name == "metadata.csv":
        reader = csv.DictReader(io.StringIO(_text(m, name, report), newline=""))
        if "file_name" not in (reader.fieldnames or []):
            raise DataError(f"{m}: no 'file_name' column in the header line (columns: {reader.fieldnames})")
        for row in reader:
            yield f"{name}:{reader.line_num}", {k: v for k, v in row.items() if k is not None}
    else:
        import pyarrow.parquet as pq  # a dependency of datasets
        try:
            table = pq.read_table(m)
        except Exception as e:  # pyarrow raises several types for a damaged file
            raise DataError(f"{m}: not a readable parquet file ({type(e).__name__}: {e})") from None
        for i, row in enumerate(table.to_pylist()):
            yield f"{name}:row {i}", row


def captions_beside(images: list[Path], caption_column: str = "text") -> list[str | None]:
    """The caption the training reader would give each image from its own folder: its row in a metadata file there
    (any of the three formats), else its .txt / .caption sidecar; None when there is none. Each folder's metadata
    is read once, however many of its images are asked for."""
    from adapt.data import DataReport
    rows: dict[Path, dict] = {}
    for folder in {i.parent for i in images}:
        rows[folder] = read_metadata(folder, [folder / m for m in METADATA_FILES if (folder / m).is_file()], DataReport())
    out = []
    for image in images:
        caption = rows[image.parent].get(image.name, {}).get(caption_column)
        out.append(str(caption).strip() if caption is not None else sidecar_caption(image))
    return out


def sidecar_caption(image: Path) -> str | None:
    """The caption in the image's .txt (kohya GUIs) or .caption (sd-scripts' default) file, if there is one."""
    sidecar = next((c for e in CAPTION_EXTS if (c := image.with_suffix(e)).is_file()), None)
    return sidecar.read_text(errors="replace").strip() if sidecar else None


def mask_root(root: Path, masks: str) -> Path:
    """The folder of mask images: `masks` as given when absolute, else relative to the image folder."""
    p = Path(masks).expanduser()
    return p if p.is_absolute() else root / p


def load_masks(records: list[Record], masks: str, placements: list, crops: int = 1) -> list[torch.Tensor]:
    """(1, H, W) loss masks in [0, 1] per training entry (masked loss, as kohya's): 'alpha' = each image's alpha
    channel, else a mask image of the same relative name (any image extension) in the folder `masks`.
    Resized and cropped exactly as each entry's image was (`placements`, `crops` entries per record). A missing
    or unreadable mask is an error naming the files: training on some images without their mask would silently
    change the objective for them."""
    from adapt.data import DataError
    out, missing = [], []
    for i, r in enumerate(records):
        if r.path is None:
            raise DataError(f"data.masks: {r.name} is not a local file; masks need a local image folder")
        root = Path(str(r.path)[:-len(r.name)])
        try:
            if masks == "alpha":
                img = ImageOps.exif_transpose(Image.open(r.path))
                if "A" not in img.getbands() and img.info.get("transparency") is None:
                    raise ValueError("no alpha channel")
                m = img.convert("RGBA").getchannel("A")
            else:
                stem = mask_root(root, masks) / r.name
                found = [stem.with_suffix(e) for e in [stem.suffix] + sorted(IMAGE_EXTS) if stem.with_suffix(e).is_file()]
                if not found:
                    raise ValueError(f"no mask file {stem}")
                m = ImageOps.exif_transpose(Image.open(found[0])).convert("L")
        except (OSError, ValueError) as e:
            missing.append(f"{r.name} ({e})")
            continue
        for p in placements[i * crops:(i + 1) * crops]:
            out.append(torch.from_numpy(np.asarray(p.apply(m), dtype=np.float32) / 255.0)[None])
    if missing:
        raise DataError(f"data.masks={masks!r}: {len(missing)} of {len(records)} images have no usable mask: "
                        f"{'; '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    return out
