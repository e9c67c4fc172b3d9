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


def test_sizing_is_validated_and_keys_the_cache():
    with pytest.raises(ValueError, match="not a multiple of the bucket step 64"):
        buckets.Sizing(520, 64)
    assert buckets.Sizing(520, 64, buckets=False).bucket_set() == [(520, 520)]  # a square needs no step
    with pytest.raises(ValueError, match="random_crop"):
        buckets.Sizing(512, 64, crops=2)
    a, b = buckets.Sizing(512, 64), buckets.Sizing(512, 64, random_crop=True)
    assert a.key() != b.key() and a.key() == buckets.Sizing(512, 64).key()
    assert a.key() == buckets.Sizing(512, 64, seed=7).key()  # centre crops: the seed changes nothing cached
    assert b.key() != buckets.Sizing(512, 64, random_crop=True, seed=7).key()


def test_size_images_places_each_image_in_its_bucket_with_seeded_crops():
    imgs = [Image.new("RGB", s) for s in ((4000, 3000), (3000, 4000), (1000, 1000), (300, 200))]
    sized = buckets.size_images(imgs, buckets.Sizing(512, 64, random_crop=True, crops=2, seed=5))
    assert len(sized) == 4 and len(sized.pixels) == 8
    assert sized.bucket_of() == [(576, 448), (448, 576), (512, 512), (640, 384)]
    for x, p in zip(sized.pixels, sized.placements):
        assert x.shape == (3, p.bucket[1], p.bucket[0])
    assert [p.upscaled for p in sized.placements[::2]] == [False, False, False, True]
    again = buckets.size_images(imgs, buckets.Sizing(512, 64, random_crop=True, crops=2, seed=5))
    assert [p.crop_top_left for p in again.placements] == [p.crop_top_left for p in sized.placements]
    other = buckets.size_images(imgs, buckets.Sizing(512, 64, random_crop=True, crops=2, seed=6))
    assert [p.crop_top_left for p in other.placements] != [p.crop_top_left for p in sized.placements]


def test_budget_size_keeps_aspect_within_the_pixel_budget():
    from adapt import sample
    assert sample.budget_size(4000, 3000, 512, 8) == (576, 432)  # exactly 4:3, 95% of the budget
    assert sample.budget_size(3000, 4000, 512, 8) == (432, 576)
    assert sample.budget_size(96, 128, 64, 8) == (56, 72)  # 3:4 at a tiny budget: 3.5% off (rounding each side: 11%)
    assert sample.budget_size(64, 64, 64, 4) == (64, 64)
    for w, h in ((4000, 3000), (1080, 1920), (500, 200), (64, 64)):
        bw, bh = sample.budget_size(w, h, 512, 8)
        assert bw % 8 == 0 and bh % 8 == 0 and bw * bh <= 512 * 512 and abs(bw / bh - w / h) / (w / h) < 0.03 and bw * bh >= 0.8 * 512 * 512


def test_grid_pads_instead_of_squashing():
    from adapt import sample
    tall, wide = Image.new("RGB", (40, 80), "red"), Image.new("RGB", (80, 40), "blue")
    g = sample.grid([[tall, wide]], pad=2)
    assert g.size == (2 * 82 + 2, 82 + 2)
    px = g.load()
    assert px[2 + 20 + 5, 2 + 40] == (255, 0, 0) and px[2 + 5, 2 + 40] == (255, 255, 255)  # tall image centred, white beside it
    assert px[84 + 40, 2 + 5] == (255, 255, 255) and px[84 + 40, 2 + 40] == (0, 0, 255)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """10 mixed-aspect photos (portraits, landscapes, squares; some smaller than the budget)."""
    from adapt import synth
    return synth.build_imagefolder("sunglasses", tmp_path_factory.mktemp("ph") / "train", n=10, split="train",
                                   aspects=[0.75, 1.333, 0.5, 1.0, 2.0], scales=[1.0, 2.0, 0.75])


def test_load_sized_names_upscaled_images_and_min_size_skips_them(photos):
    from adapt import data
    lines = []
    sized, recs, report = data.load_sized(str(photos), buckets.Sizing(64, 16), logger=lines.append)
    assert {b for b in sized.bucket_of()} == {(64, 64), (80, 48), (48, 80)}
    small = [r.name for r, p in zip(recs, sized.placements) if p.upscaled]
    assert small and any("upscaled" in l and small[0] in l for l in lines)
    sized2, recs2, report2 = data.load_sized(str(photos), buckets.Sizing(64, 16, min_size=60), logger=lambda m: None)
    assert len(recs2) < len(recs) and report2.num_skipped == len(recs) - len(recs2)
    assert all(r.name not in {x.name for x in recs2} for r in recs if min(r.extra["original_size"]) < 60)


def test_resume_with_buckets_random_crops_and_flips_is_exact(tiny_base, photos, tmp_path):
    """SIGKILL after step 4 of 6, resume from checkpoint-3: the same losses (to 1e-6), batches and weights."""
    import numpy as np
    from adapt import lora
    from conftest import read_log, recipe_args, run_recipe
    full, part = tmp_path / "full", tmp_path / "part"
    common = ["train.max_steps=6", "train.checkpointing_steps=3", "data.num_images=null", "data.random_crop=true",
              "data.crops_per_image=2", "data.random_flip=true", f"data.cache_dir={tmp_path / 'cache'}"]
    r = run_recipe(recipe_args(tiny_base, photos, full, *common), launcher="python")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "sizing: buckets at 64² px (step 16), random crops x 2" in r.stdout and "bucket 48x80: 4 images" in r.stdout
    r = run_recipe(recipe_args(tiny_base, photos, part, *common), launcher="python", env_extra={"ADAPT_FAULT": "sigkill_after_step:4"})
    assert r.returncode == -9, (r.returncode, r.stderr[-2000:])
    r = run_recipe(recipe_args(tiny_base, photos, part, *common, "train.resume_from_checkpoint=latest"), launcher="python")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "latents loaded from cache" in r.stdout  # the bucketed cache is reused, not re-encoded
    a, b = read_log(full), read_log(part)
    assert [x["step"] for x in b] == list(range(1, 7)) and [x["images"] for x in b] == [x["images"] for x in a]
    assert len({x["bucket"] for x in a}) > 1  # several buckets were trained on
    np.testing.assert_allclose([x["loss"] for x in b], [x["loss"] for x in a], rtol=0, atol=1e-6)
    ta, _ = lora.read(full)
    tb, _ = lora.read(part)
    assert ta.keys() == tb.keys() and all(torch.allclose(ta[k], tb[k], atol=1e-6) for k in ta)


@pytest.mark.integration  # two processes: `make test-integration`
def test_two_process_ddp_with_buckets_draws_disjoint_images(tiny_base, photos, tmp_path):
    from conftest import read_log, recipe_args, run_recipe
    out = tmp_path / "ddp"
    r = run_recipe(recipe_args(tiny_base, photos, out, "train.max_steps=6", "data.num_images=null"), nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "all 2 ranks hold identical LoRA weights" in r.stdout
    sizes = {"64x64": 2, "80x48": 4, "48x80": 4}  # images per bucket in this set
    rows = read_log(out)
    assert len(rows) == 6 and len({x["bucket"] for x in rows}) > 1
    for x in rows:
        r0, r1 = x["images"]
        assert len(r0) == len(r1) == 2
        if sizes[x["bucket"]] >= 4:  # enough images for both ranks: no image on two ranks in one step
            assert not set(r0) & set(r1), x


def test_sampler_draws_an_image_in_proportion_to_its_repeats():
    s = buckets.BucketSampler([(64, 64)] * 3 + [(48, 80)], batch_size=2, repeats=[6, 1, 1, 2])
    counts = torch.zeros(4)
    for step in range(3000):
        counts += torch.bincount(s.batch(step)[1], minlength=4)
    share = counts / counts.sum()
    assert torch.allclose(share, torch.tensor([0.6, 0.1, 0.1, 0.2]), atol=0.02), share  # 6 : 1 : 1 : 2
    assert s.summary()[1].startswith("bucket 64x64: 3 images (8 with repeats)")  # buckets in sorted order: 48x80 first
    with pytest.raises(ValueError, match="repeats"):
        buckets.BucketSampler([(64, 64)] * 2, 2, repeats=[1, 0])
