"""The procedural benchmark: deterministic, ground-truth pairs, masks, disjoint splits."""

import json

import numpy as np
import pytest

from adapt import synth


def test_deterministic_and_paired():
    a1, c1, f1 = synth.make("faces", "train", 3)
    a2, c2, f2 = synth.make("faces", "train", 3)
    g, cg, fg = synth.make("sunglasses", "train", 3)
    assert np.array_equal(np.asarray(a1), np.asarray(a2)) and c1 == c2 and f1 == f2
    assert f1 == fg and cg == c1 + " wearing sunglasses"
    diff = np.abs(np.asarray(a1, np.int16) - np.asarray(g, np.int16)).sum(-1) > 30
    mask = synth.eye_mask(f1)
    assert diff.any()
    assert diff[~mask].sum() <= 0.02 * diff.sum() + 20, "glasses must stay inside the eye band (temples excepted)"
    assert diff[mask].sum() > 0.8 * diff.sum()


def test_glasses_darken_the_eye_boxes():
    for i in range(20):
        face_img, _, f = synth.make("faces", "eval", i)
        glass_img, _, _ = synth.make("sunglasses", "eval", i)
        m = synth.eye_mask(f, margin=0)
        a, b = np.asarray(face_img, float).mean(-1), np.asarray(glass_img, float).mean(-1)
        assert b[m].mean() < a[m].mean() - 15


def test_splits_are_disjoint_seed_ranges():
    seeds = {s: {synth.split_seed(s, i) for i in (0, 1, 999_999)} for s in synth.SPLITS}
    all_seeds = [x for v in seeds.values() for x in v]
    assert len(all_seeds) == len(set(all_seeds))
    with pytest.raises(ValueError):
        synth.split_seed("test", 0)
    with pytest.raises(ValueError):
        synth.split_seed("train", synth.SPLIT_SIZE)


def test_build_imagefolder(tmp_path):
    out = synth.build_imagefolder("sunglasses", tmp_path / "sg", n=4, split="train")
    rows = [json.loads(l) for l in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all((out / r["file_name"]).is_file() for r in rows)
    assert all(r["text"].endswith("wearing sunglasses") and len(r["eye_boxes"]) == 2 for r in rows)
    assert rows[0]["seed"] == synth.split_seed("train", 0)


def test_vocabulary_covers_captions():
    vocab = set(synth.vocabulary())
    for i in range(50):
        _, cap, _ = synth.make("sunglasses", "pretrain", i)
        assert set(cap.split()) <= vocab
