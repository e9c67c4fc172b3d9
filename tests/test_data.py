"""The bad-input corpus: every kind is either converted correctly or skipped with its name and a count."""

import io
import json
import struct
import zlib

import numpy as np
import pytest
from pathlib import Path
from PIL import Image

from adapt import cache, data
from adapt.tiny import build_tokenizer


def _png_with_declared_size(w, h) -> bytes:
    """A tiny PNG file whose header declares w x h pixels (a decompression bomb's signature)."""
    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def _bytes(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.fixture()
def corpus(tmp_path):
    """Write every bad-input kind into one imagefolder; returns (folder, expectations)."""
    d = tmp_path / "corpus"
    d.mkdir()
    ok = Image.new("RGB", (64, 64), (10, 200, 30))
    files = {
        "zero.png": b"",
        "trunc.png": _bytes(ok, "PNG")[:60],
        "trunc.jpg": _bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)), "JPEG")[:400],
        "text.png": b"hello, I am not an image\n",
        "gray.png": _bytes(Image.new("L", (64, 64), 77), "PNG"),
        "la.png": _bytes(Image.new("LA", (64, 64), (0, 0)), "PNG"),
        "rgba.png": _bytes(Image.new("RGBA", (64, 64), (255, 0, 0, 0)), "PNG"),
        "cmyk.jpg": _bytes(Image.new("CMYK", (64, 64), (0, 255, 255, 0)), "JPEG", quality=100),
        "sixteen.png": _bytes(Image.fromarray(np.full((64, 64), 65535, dtype=np.uint16)), "PNG"),
        "palette.png": _bytes(ok.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
        "tiny8.png": _bytes(Image.new("RGB", (8, 8), "blue"), "PNG"),
        "bomb.png": _png_with_declared_size(100_000, 100_000),
        "good.png": _bytes(ok, "PNG"),
        "nocaption.png": _bytes(ok, "PNG"),
        "badutf8.png": _bytes(ok, "PNG"),
        "longcap.png": _bytes(ok, "PNG"),
        "dup.png": _bytes(ok, "PNG"),
    }
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    rot = Image.new("RGB", (96, 64), "white")
    rot.paste((255, 0, 0), (0, 0, 48, 64))  # left half red
    files["exif.jpg"] = _bytes(rot, "JPEG", exif=exif.tobytes(), quality=95)
    for name, payload in files.items():
        (d / name).write_bytes(payload)
    (tmp_path / "outside.png").write_bytes(_bytes(ok, "PNG"))
    lines = [json.dumps({"file_name": n, "text": f"caption of {n}"}) for n in files if n not in ("nocaption.png", "badutf8.png", "longcap.png")]
    lines.append(json.dumps({"file_name": "nocaption.png"}))
    lines.append(b'{"file_name": "badutf8.png", "text": "caf\xe9 \xff"}'.decode("latin-1"))
    lines.append(json.dumps({"file_name": "longcap.png", "text": "a face " * 100}))
    lines.append(json.dumps({"file_name": "../outside.png", "text": "escape"}))
    lines.append(json.dumps({"file_name": str(tmp_path / "outside.png"), "text": "absolute"}))
    lines.append(json.dumps({"file_name": "dup.png", "text": "second row for dup"}))
    lines.append("{this is not json")
    raw = "\n".join(lines).encode("latin-1")
    (d / "metadata.jsonl").write_bytes(raw)
    return d


def test_bad_input_corpus(corpus, capsys):
    records, report = data.read_records(str(corpus), default_caption="a photo")
    pixels, kept = data.load_images(records, 64, report)
    names = {r.name for r in kept}
    skipped = {n.split(" ")[0] for v in report.skipped.values() for n in v}
    # skipped, each with its name
    for n in ("zero.png", "trunc.png", "trunc.jpg", "text.png", "tiny8.png", "bomb.png"):
        assert n in skipped and n not in names, n
    for where in ("metadata.jsonl:", ):
        assert any(s.startswith(where) for s in skipped)
    assert any("outside the dataset folder" in k for k in report.skipped) and len(report.skipped[next(k for k in report.skipped if "outside" in k)]) == 2
    assert any("duplicate file_name" in k for k in report.skipped)
    assert any("not JSON" in k for k in report.skipped)
    # converted, with the right pixels
    px = {r.name: ((p.permute(1, 2, 0).numpy() + 1) * 127.5).round() for r, p in zip(kept, pixels)}
    assert np.allclose(px["gray.png"], 77)
    assert np.allclose(px["la.png"], 255) and np.allclose(px["rgba.png"], 255)  # transparent -> white
    assert px["cmyk.jpg"][..., 0].mean() > 200 and px["cmyk.jpg"][..., 1:].mean() < 40  # CMYK red -> RGB red
    assert np.allclose(px["sixteen.png"], 255)  # 16-bit max -> 8-bit max, not clipped garbage
    assert np.allclose(px["palette.png"], px["good.png"], atol=2)
    e = px["exif.jpg"]  # rotated 90° cw: the red half is now on top
    assert e[:20, :, 0].mean() > 200 and e[:20, :, 1].mean() < 60 and e[-20:, :, 1].mean() > 200
    caps = {r.name: r.caption for r in kept}
    assert caps["nocaption.png"] == "a photo" and "nocaption.png" in sum(report.notes.values(), [])
    assert "\ufffd" in caps["badutf8.png"]
    assert caps["dup.png"] == "caption of dup.png"  # first row kept
    assert report.kept == len(kept) == 12 and report.num_skipped == 10  # 6 files + 4 metadata rows
    # captions over the tokenizer limit are counted (and truncated by the tokenizer)
    tok = build_tokenizer(["a", "face"], max_length=32)
    long_idx = cache.count_truncated(tok, [r.caption for r in kept])
    assert [kept[i].name for i in long_idx] == ["longcap.png"]
    s = report.summary()
    assert "12 images usable, 10 skipped" in s and "bomb.png" in s


def test_bomb_does_not_allocate(tmp_path):
    import resource
    p = tmp_path / "bomb.png"
    p.write_bytes(_png_with_declared_size(200_000, 200_000))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ValueError, match="bomb"):
        data.open_image(p)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # < 200 MB growth (KiB units)


def test_empty_and_missing_folders(tmp_path):
    with pytest.raises(data.DataError, match="no images found"):
        data.load(str(tmp_path), 64)
    with pytest.raises(data.DataError, match="not found"):
        data.load(str(tmp_path / "missing" / "x"), 64)
    (tmp_path / "only_bad.png").write_bytes(b"")
    with pytest.raises(data.DataError, match="(?s)no usable images.*only_bad.png"):
        data.load(str(tmp_path), 64)


def test_sidecar_captions_and_fit(tmp_path):
    Image.new("RGB", (128, 64), "red").save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a red thing\n")
    pixels, recs, rep = data.load(str(tmp_path), 32)
    assert recs[0].caption == "a red thing" and pixels.shape == (1, 3, 32, 32)


def test_definition_builds_once_and_fingerprints(tmp_path):
    from conftest import ROOT
    src = str(ROOT / "datasets" / "synth_sunglasses")
    p1, r1, _ = data.load(src, 64, split="train", num_images=4, cache_dir=tmp_path)
    p2, r2, _ = data.load(src, 64, split="train", num_images=4, cache_dir=tmp_path)
    assert data.fingerprint(r1, p1) == data.fingerprint(r2, p2)
    p3, r3, _ = data.load(src, 64, split="eval", num_images=4, cache_dir=tmp_path)
    assert not set(data.image_fingerprints(p1)) & set(data.image_fingerprints(p3))
    assert all(r.caption.endswith("wearing sunglasses") for r in r1)


def test_hub_dataset_rows_decoded_by_adapt(monkeypatch):
    """A hub dataset (what `datasets.load_dataset` returns after a download): our decoding, counts and errors."""
    import datasets as hf
    good = _bytes(Image.new("RGB", (48, 48), (200, 10, 10)), "PNG")
    ds = hf.Dataset.from_dict({"image": [{"bytes": good, "path": None}, {"bytes": b"not an image", "path": None},
                                         {"bytes": good, "path": None}],
                               "text": ["a face with sunglasses", "unreadable", None]}).cast_column("image", hf.Image())
    calls = []
    monkeypatch.setattr(hf, "load_dataset", lambda name, split: calls.append((name, split)) or ds)
    px, records, report = data.load("org/sunglasses", 32, split="train", default_caption="a photo")
    assert calls == [("org/sunglasses", "train")] and px.shape == (2, 3, 32, 32)
    assert [r.caption for r in records] == ["a face with sunglasses", "a photo"]  # missing caption -> default
    assert report.num_skipped == 1 and "train[1]" in report.summary()
    with pytest.raises(data.DataError, match="has no column 'img'.*'image', 'text'"):
        data.load("org/sunglasses", 32, image_column="img")


def test_the_repos_dataset_definitions_read_from_any_directory(tmp_path, monkeypatch):
    """The demo config names datasets/synth_faces: a run from another directory reads this checkout's definition
    (and says so) instead of asking the hub for a dataset called datasets/synth_faces."""
    monkeypatch.chdir(tmp_path)
    records, report = data.read_records("datasets/synth_faces", split="val", num_images=2, cache_dir=tmp_path / "c")
    assert len(records) == 2 and report.notes["read from adapt's repository (not found in the current directory)"] == [
        str(Path(data.__file__).resolve().parents[1] / "datasets" / "synth_faces")]


def test_a_relative_folder_missing_here_is_named_beside_the_hub_failure(tmp_path, monkeypatch):
    """A relative folder that is not here (org/photos, run from the wrong directory) reads as a hub id: say both."""
    import datasets as hf

    def offline(name, split):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (LocalEntryNotFoundError)")
    monkeypatch.setattr(hf, "load_dataset", offline)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(data.DataError, match=r"hub dataset 'data/photos' split 'train' could not be loaded "
                                             r"\(offline or not found\?\): ConnectionError: .*; nor is it a folder: no "
                                             + str(tmp_path / "data" / "photos")):
        data.load("data/photos", 32)


def test_kohya_folders_repeat_and_caption_only_when_asked(tmp_path):
    # sd-scripts' DreamBooth layout: <repeats>_<caption words>/ under the dataset folder.
    for sub, n in (("10_sks face", 2), ("1_face", 2), ("0_unused", 1)):
        (tmp_path / sub).mkdir()
        for i in range(n):
            Image.new("RGB", (16, 16), (40 * i, 90, 20)).save(tmp_path / sub / f"{i}.png")
    (tmp_path / "1_face" / "0.txt").write_text("a face, captioned")  # a caption file wins over the folder name
    recs, rep = data.read_folder(tmp_path, kohya_folders=True)
    got = {r.name: (r.caption, r.repeats) for r in recs}
    assert got == {"10_sks face/0.png": ("sks face", 10), "10_sks face/1.png": ("sks face", 10),
                   "1_face/0.png": ("a face, captioned", 1), "1_face/1.png": ("face", 1)}
    assert rep.skipped["in a kohya folder with 0 repeats"] == ["0_unused/0.png"]
    recs, rep = data.read_folder(tmp_path)  # off (the default): plain subfolders, each named in the log's note
    assert {r.repeats for r in recs} == {1} and len(recs) == 5 and {r.caption for r in recs} == {"", "a face, captioned"}
    assert len(next(v for k, v in rep.notes.items() if "kohya" in k)) == 5
