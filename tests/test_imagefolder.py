"""Folders prepared for Hugging Face datasets read the same in adapt: the same images in each split, the same
captions, from every metadata format `load_dataset("imagefolder")` takes. datasets itself is the oracle."""

import csv
import json

import numpy as np
import pytest
from PIL import Image

from adapt import data, evaluate, imagefolder


def _png(path, shade):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), (shade, 80, 160)).save(path)


def _write_metadata(folder, rows, kind):
    """rows: [(file_name, text)] as metadata.<kind>, the way users make each: a script (jsonl), Excel (csv with a
    byte-order mark), pandas/pyarrow (parquet)."""
    if kind == "jsonl":
        (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": t, "source": "cam"}) + "\n"
                                                       for n, t in rows))
    elif kind == "csv":
        with open(folder / "metadata.csv", "w", newline="", encoding="utf-8-sig") as f:
            w = csv.writer(f)
            w.writerow(["file_name", "text", "source"])
            w.writerows([n, t, "cam"] for n, t in rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.table({"file_name": [n for n, _ in rows], "text": [t for _, t in rows],
                                 "source": ["cam"] * len(rows)}), folder / "metadata.parquet")


@pytest.fixture(params=["jsonl", "csv", "parquet"])
def split_folder(tmp_path, request):
    """train/, test/ (images one folder down, captions with a comma, quotes and a line break) and val/, each with
    its own metadata file, and one image at the top that no split names."""
    root = tmp_path / "faces"
    for i in range(3):
        _png(root / "train" / f"{i}.png", 10 * i)
    _write_metadata(root / "train", [(f"{i}.png", f"train face {i}") for i in range(3)], request.param)
    for i in range(2):
        _png(root / "test" / "people" / f"{i}.jpg", 100 + i)
    _write_metadata(root / "test", [("people/0.jpg", 'a face, "smiling"'), ("people/1.jpg", "a face\nover two lines")],
                    request.param)
    for i in range(2):
        _png(root / "val" / f"v{i}.png", 200 + i)
    _write_metadata(root / "val", [(f"v{i}.png", f"val face {i}") for i in range(2)], request.param)
    _png(root / "stray.png", 5)
    (root / "__MACOSX" / "train").mkdir(parents=True)  # what unzipping a Mac's zip leaves: no images
    (root / "__MACOSX" / "train" / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (root / "train" / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    expected = {"train": {(root / "train" / f"{i}.png", f"train face {i}") for i in range(3)},
                "test": {(root / "test" / "people" / "0.jpg", 'a face, "smiling"'),
                         (root / "test" / "people" / "1.jpg", "a face\nover two lines")},
                "validation": {(root / "val" / f"v{i}.png", f"val face {i}") for i in range(2)}}
    return root, request.param, {k: {(str(p.resolve()), t) for p, t in v} for k, v in expected.items()}


def _hf_reads(kind: str) -> bool:
    """Whether the installed datasets reads metadata.<kind> (parquet since datasets 3.x; the floor, 3.0, does not)."""
    from datasets.packaged_modules.folder_based_builder.folder_based_builder import FolderBasedBuilder
    return f"metadata.{kind}" in FolderBasedBuilder.METADATA_FILENAMES


def _hf(root, tmp_path) -> dict[str, set] | None:
    """How datasets reads the folder; None where the installed datasets cannot read it at all (datasets 3.0, the
    floor, refuses every metadata.csv under pandas 3, whose strings it does not take as strings)."""
    import datasets
    try:
        ds = datasets.load_dataset("imagefolder", data_dir=str(root), cache_dir=str(tmp_path / "hf-cache"))
    except ValueError as e:
        if "`file_name` key must be a string" in str(e) and int(datasets.__version__.split(".")[0]) < 4:
            return None
        raise
    out = {}
    for split, d in ds.items():
        d = d.cast_column("image", datasets.Image(decode=False))
        out[str(split)] = {(str(__import__("pathlib").Path(r["image"]["path"]).resolve()), r["text"]) for r in d}
    return out


def _adapt(root, split) -> set:
    records, _ = data.read_records(str(root), split=split)
    return {(str(r.path.resolve()), r.caption) for r in records}


def test_a_split_folder_reads_as_datasets_reads_it(split_folder, tmp_path):
    split_folder, kind, expected = split_folder
    hf = (_hf(split_folder, tmp_path) if _hf_reads(kind) else None) or expected
    assert hf == expected  # datasets itself reads the layout as written
    for split, ours in (("train", "train"), ("test", "test"), ("test", "eval"), ("validation", "val"),
                        ("validation", "validation")):
        assert _adapt(split_folder, ours) == hf[split], (split, ours)
    records, report = data.read_records(str(split_folder), split="eval")
    assert "split 'test' ('eval' is a synonym of 'test') of test (2 images), train (3 images), validation (2 images)" \
        in report.summary()
    assert report.skipped["in no split (the folder is split; Hugging Face datasets leaves such files out too)"] == ["stray.png"]
    assert {r.extra["source"] for r in records} == {"cam"}  # other columns travel with the record, as before
    records, report = data.read_records(str(split_folder), split="train")
    assert report.notes["hidden, or in a hidden or __ folder (as __MACOSX/): left out, as Hugging Face datasets "
                        "leaves it out"] == ["__MACOSX/train/._0.png", "train/._0.png"] and report.num_skipped == 1


def test_a_flat_folder_with_metadata_csv_or_parquet_keeps_its_captions(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    for kind in ("csv", "parquet"):
        root = tmp_path / kind
        for i in range(3):
            _png(root / f"{i}.png", 30 * i)
        names, texts = [f"{i}.png" for i in range(3)], [f"{kind} caption {i}" for i in range(3)]
        if kind == "csv":
            (root / "metadata.csv").write_text("file_name,text\n" + "".join(f"{n},{t}\n" for n, t in zip(names, texts)))
        else:
            pq.write_table(pa.table({"file_name": names, "text": texts}), root / "metadata.parquet")
        hf = _hf(root, tmp_path / f"{kind}-cache") if _hf_reads(kind) else None
        if hf is not None:
            assert _adapt(root, "train") == hf["train"]
        assert {c for _, c in _adapt(root, "train")} == set(texts)


def test_a_folder_naming_one_split_is_one_set(tmp_path):
    """`adapt data build` names files train_000000.png: evaluating such a folder (split 'eval') reads all of it."""
    for i in range(2):
        _png(tmp_path / "d" / f"train_{i:06d}.png", i)
    _png(tmp_path / "d" / "train" / "x.png", 9)
    assert len(data.read_records(str(tmp_path / "d"), split="eval")[0]) == 3


def test_a_missing_split_names_the_folder_and_the_splits_it_has(split_folder):
    split_folder = split_folder[0]
    with pytest.raises(data.MissingSplit, match=r"faces is split .*has no split 'classifier'; choose one of "
                                                r"\['test', 'train', 'validation'\]") as e:
        data.read_records(str(split_folder), split="classifier")
    assert e.value.found == ["test", "train", "validation"]


def test_the_domain_classifier_learns_from_train_when_the_folder_has_no_classifier_split(split_folder):
    split_folder = split_folder[0]
    said = []
    px = evaluate._classifier_images(str(split_folder), 32, "classifier", 10, said.append)
    assert len(px) == 3 and said == [f"domain classifier: {split_folder} has no 'classifier' split "
                                     "(splits: test, train, validation); it learns from 'train'"]


def test_metadata_files_that_cannot_be_read_are_errors_naming_them(tmp_path):
    root = tmp_path / "d"
    _png(root / "0.png", 1)
    (root / "metadata.csv").write_text("name,text\n0.png,a face\n")
    with pytest.raises(data.DataError, match=r"metadata.csv: no 'file_name' column in the header line \(columns: \['name', 'text'\]\)"):
        data.read_records(str(root))
    (root / "metadata.csv").unlink()
    (root / "metadata.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(data.DataError, match=r"metadata.parquet: not a readable parquet file"):
        data.read_records(str(root))
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "0.png", "text": "a face"}) + "\n")
    with pytest.raises(data.DataError, match=r"has two metadata files, metadata.jsonl and metadata.parquet: keep one"):
        data.read_records(str(root))


def test_split_keywords_are_the_ones_datasets_uses():
    from datasets.data_files import SPLIT_KEYWORDS
    assert {str(k): v for k, v in SPLIT_KEYWORDS.items()} == imagefolder.SPLIT_KEYWORDS


def test_kohya_folders_are_found_below_a_project_folder(tmp_path):
    """kohya_ss keeps its folders in <project>/img/N_name/; pointing adapt at the project finds them."""
    _png(tmp_path / "img" / "20_sks face" / "a.png", 1)
    (records, report) = data.read_folder(tmp_path, kohya_folders=True)
    assert [(r.name, r.caption, r.repeats) for r in records] == [("img/20_sks face/a.png", "sks face", 20)]


def test_every_photo_is_read_or_counted_and_captions_come_from_txt_or_caption_sidecars(tmp_path, monkeypatch):
    """A phone's export: a Windows-saved .jfif, an .avif, iPhone HEICs (which Pillow alone cannot decode) and
    sd-scripts' default .caption sidecars. Before, the .jfif and .avif were not read and the HEICs were passed over in
    silence. Here without pillow-heif: the HEICs are named, with how to read them."""
    monkeypatch.setattr(imagefolder, "heif_decoder", lambda: False)
    root = tmp_path / "phone"
    root.mkdir()
    from PIL import features
    img = Image.new("RGB", (40, 32), (120, 60, 30))
    img.save(root / "a.jfif", "JPEG")
    avif = features.check("avif")  # Pillow 11.3+; the floor, 10.0, has no AVIF: the file is then skipped and named
    (img.save(root / "b.avif", "AVIF") if avif else (root / "b.avif").write_bytes(b"\x00\x00\x00\x1cftypavif"))
    img.save(root / "c.png")
    for name in ("IMG_0001.HEIC", "IMG_0002.heic"):
        (root / name).write_bytes(b"\x00\x00\x00\x18ftypheic")
    (root / "a.caption").write_text("a face, sd-scripts' sidecar\n")
    (root / "c.txt").write_text("a face, kohya GUI's sidecar")
    (root / "c.caption").write_text("not read: .txt comes first")
    px, records, report = data.load(str(root), 32)
    assert [(r.name, r.caption) for r in records] == [("a.jfif", "a face, sd-scripts' sidecar")] + \
        [("b.avif", "")] * avif + [("c.png", "a face, kohya GUI's sidecar")]
    why = 'a HEIC photo, which Pillow cannot decode: pip install "adapt[heif]" (pillow-heif) to read it, or convert it to JPEG or PNG'
    assert report.skipped[why] == ["IMG_0001.HEIC", "IMG_0002.heic"]
    with pytest.raises(ValueError, match=r'a HEIC photo, which Pillow cannot decode without pillow-heif: pip install "adapt\[heif\]"'):
        data.open_image(root / "IMG_0001.HEIC")  # as `adapt sample --image IMG_0001.HEIC` opens it
    assert f"{2 + avif} images usable, {3 - avif} skipped" in report.summary()


def test_iphone_heic_photos_read_with_pillow_heif_upright_and_a_broken_one_is_named(tmp_path):
    """With pillow-heif (the heif extra; the test extras install it) HEIC photos are images of the set, as the libheif
    that phones' photos decode with writes them: the pixels of the original within the codec's loss, and a photo
    stored rotated (EXIF orientation 6) upright, turned once, as its JPEG twin is. A file that is no HEIC is named."""
    pytest.importorskip("pillow_heif")
    imagefolder.heif_decoder()  # registers the format with Pillow, so Image.save can write HEIF below
    img = Image.new("RGB", (48, 32), (150, 110, 90))
    img.paste((20, 30, 200), (0, 0, 8, 32))  # a blue band on the left: where it ends up shows the rotation
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera held upright: stored landscape, shown rotated 90 degrees clockwise
    img.save(tmp_path / "IMG_0001.HEIC", "HEIF", quality=95)
    img.save(tmp_path / "IMG_0002.heic", "HEIF", quality=95, exif=exif.tobytes())
    img.save(tmp_path / "IMG_0003.jpg", "JPEG", quality=95, exif=exif.tobytes())
    (tmp_path / "IMG_0004.heic").write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(64))
    _, records, report = data.load(str(tmp_path), 32)
    assert [r.name for r in records] == ["IMG_0001.HEIC", "IMG_0002.heic", "IMG_0003.jpg"]
    assert [why for why, names in report.skipped.items() if names == ["IMG_0004.heic"]], report.skipped
    plain, rotated, jpeg = (np.asarray(data.open_image(tmp_path / r.name), dtype=float) for r in records)
    assert plain.shape == (32, 48, 3) and np.abs(plain - np.asarray(img, dtype=float)).mean() < 4
    assert rotated.shape == jpeg.shape == (48, 32, 3) and np.abs(rotated - jpeg).mean() < 6
    assert rotated[:8, :, 2].mean() > 150 and rotated[-8:, :, 2].mean() < 120  # the band is on top: turned once


def test_image_extensions_cover_the_ones_datasets_reads():
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder
    # datasets 3.x also listed HDF5 (.h5, .hdf), which Pillow does not decode; later releases dropped them
    assert set(ImageFolder.EXTENSIONS) - {".h5", ".hdf"} <= imagefolder.IMAGE_EXTS


def test_an_image_saved_twice_is_kept_and_named(tmp_path):
    for name in ("IMG_0001.png", "IMG_0001 (1).png", "IMG_0002.png"):
        _png(tmp_path / name, 7 if name.startswith("IMG_0001") else 9)
    _, records, report = data.load(str(tmp_path), 32)
    assert len(records) == 3 and report.notes["the same pixels as an earlier image (kept: it is drawn that much more "
                                               "often)"] == ["IMG_0001.png = IMG_0001 (1).png"]


def test_metadata_whose_captions_are_in_another_column_is_refused_naming_the_columns(tmp_path):
    """{"file_name", "caption"} rows with data.caption_column left at "text" trained every image on the default
    caption before, one note among many; diffusers' scripts refuse it too."""
    _png(tmp_path / "0.png", 1)
    (tmp_path / "metadata.csv").write_text("file_name,caption\n0.png,a face\n")
    with pytest.raises(data.DataError, match=r"has no 'text' column \(its columns: \['caption'\]\), and 1 image\(s\) have "
                                             r"no caption file either; name the captions' column \(data.caption_column, "
                                             r"or caption_column for adapt eval\)"):
        data.read_records(str(tmp_path))
    assert [r.caption for r in data.read_records(str(tmp_path), caption_column="caption")[0]] == ["a face"]
    records, report = data.read_records(str(tmp_path), default_caption="a photo")  # one caption for all, said once
    assert [r.caption for r in records] == ["a photo"] and len(report.notes) == 1
    (tmp_path / "0.txt").write_text("a face from its sidecar")  # metadata for other columns, captions in .txt: fine
    assert [r.caption for r in data.read_records(str(tmp_path))[0]] == ["a face from its sidecar"]


def test_adapt_sample_finds_a_caption_where_training_would(tmp_path):
    """`adapt sample --prompt '{caption} ...'` read only metadata.jsonl beside the image before."""
    from adapt import imagefolder
    for name in ("a.png", "b.png", "c.png"):
        _png(tmp_path / name, 3)
    (tmp_path / "metadata.csv").write_text("file_name,text\na.png,a face from csv\n")
    (tmp_path / "b.caption").write_text("a face from a sidecar\n")
    assert imagefolder.captions_beside([tmp_path / n for n in ("a.png", "b.png", "c.png")]) == [
        "a face from csv", "a face from a sidecar", None]
