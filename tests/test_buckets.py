"""Aspect-ratio buckets (adapt/buckets.py): the bucket set, assignment, crops, and the deterministic sampler."""

import math

import pytest
import torch
from PIL import Image

from adapt import buckets


def test_bucket_set_keeps_budget_step_and_aspect_limits():
    bs = buckets.make_buckets(512, 64)
    assert (512, 512) in bs and (384, 640) in bs and (640, 384) in bs
    for w, h in bs:
        assert w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 and 1 / 2.5 <= w / h <= 2.5
    assert [w / h for w, h in bs] == sorted(w / h for w, h in bs)
    assert set(bs) == {(h, w) for w, h in bs}  # portrait and landscape alike
    assert buckets.make_buckets(64, 32) == [(64, 64)]  # the embedded 64 px base: square only
    with pytest.raises(ValueError, match="multiple"):
        buckets.make_buckets(500, 64)


def test_nearest_bucket_by_aspect():
    bs = buckets.make_buckets(512, 64)
    assert buckets.nearest(bs, 3000, 4000) == (448, 576)  # 3:4 portrait -> 0.778
    assert buckets.nearest(bs, 4000, 3000) == (576, 448)
    assert buckets.nearest(bs, 1000, 1000) == (512, 512)
    assert buckets.nearest(bs, 100, 1000) == min(bs, key=lambda b: b[0] / b[1])  # beyond 1:2.5: the narrowest


def test_place_covers_and_crops_with_recorded_offsets():
    img = Image.new("RGB", (4000, 3000))
    out, p = buckets.place(img, (576, 448))
    assert out.size == (576, 448) and p.original_size == (3000, 4000) and not p.upscaled
    assert p.crop_top_left == (0, (597 - 576) // 2)  # resized to 597x448 (cover), centred horizontally
    g = torch.Generator().manual_seed(0)
    offs = {buckets.place(img, (512, 512), g)[1].crop_top_left for _ in range(20)}
    assert len(offs) > 1 and all(t == 0 and 0 <= l <= 683 - 512 for t, l in offs)  # random crops move along the long side
    small = buckets.place(Image.new("RGB", (100, 80)), (576, 448))[1]
    assert small.upscaled
    assert buckets.kept_fraction(4000, 3000, (576, 448)) == pytest.approx(448 * 576 / (597 * 448), rel=1e-2)
    assert buckets.kept_fraction(4000, 3000, (512, 512)) == pytest.approx(0.75, rel=1e-3)


def test_sampler_is_deterministic_bucket_homogeneous_and_disjoint_across_ranks():
    bucket_of = [(512, 512)] * 20 + [(448, 576)] * 12 + [(640, 384)] * 3
    s = buckets.BucketSampler(bucket_of, batch_size=4, world=2, seed=0)
    seen = {k: 0 for k in s.keys}
    for step in range(200):
        k0, i0 = s.batch(step, 0)
        k1, i1 = s.batch(step, 1)
        assert k0 == k1 and all(bucket_of[i] == k0 for i in torch.cat([i0, i1]).tolist())
        if len(s.groups[k0]) >= 8:
            assert not set(i0.tolist()) & set(i1.tolist())  # disjoint images across ranks
        seen[k0] += 1
        again = buckets.BucketSampler(bucket_of, 4, 2, 0).batch(step, 1)
        assert again[0] == k1 and torch.equal(again[1], i1)  # a fresh sampler (a resumed run) draws the same
    assert seen[(640, 384)] > 0 and seen[(512, 512)] > seen[(448, 576)] > seen[(640, 384)]  # in proportion to size
    assert any("fewer than the 8 a step draws" in line for line in s.summary())
