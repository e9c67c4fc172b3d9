"""`adapt bench`: training and sampling throughput, compute efficiency, memory, and the levers tried.

Every case runs in its own subprocess (peak RSS is per process), with an explicit thread count, and
reports the median of >= 10 timed steps after warm-up. Compute efficiency = FLOPs of one step
(torch.utils.flop_counter, forward + backward) / step time, divided by a dense fp32 torch.mm rate
measured in the same process at the same thread count. Compare only ratios within one run. The reference trainer's
cases (diffusers' LoRA example, side by side) are in adapt/bench_reference.py.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from adapt import bench_reference

CASES = {
    # name: (arch, latent side, batch, cache, extra)
    "train-tiny-cache": ("tiny", None, 8, True, {}),
    "train-tiny-nocache": ("tiny", None, 8, False, {}),
    "train-sd15-8-cache": ("sd15", 8, 4, True, {}),
    "train-sd15-8-nocache": ("sd15", 8, 4, False, {}),
    "train-sd15-32-cache": ("sd15", 32, 1, True, {"profile": True}),
    "train-sd15-32-nocache": ("sd15", 32, 1, False, {}),
    "train-sd15-32-cache-gc": ("sd15", 32, 1, True, {"gradient_checkpointing": True}),
    "train-tiny-cache-gc": ("tiny", None, 8, True, {"gradient_checkpointing": True}),
    "train-sd15-8-cache-gc": ("sd15", 8, 4, True, {"gradient_checkpointing": True}),
    # aspect-ratio buckets on mixed-aspect photos (datasets/synth_sunglasses_photos' shapes), cached, at the same
    # pixel budget as the square case above it
    "train-tiny-buckets": ("tiny", None, 8, True, {"mixed": True}),
    "train-sd15-32-buckets": ("sd15", 32, 1, True, {"mixed": True}),
    # levers on the SD1.5 32x32 cached step
    "lever-batch4": ("sd15", 32, 4, True, {}),
    "lever-classic-attention": ("sd15", 32, 1, True, {"attn": "classic"}),
    "lever-channels-last": ("sd15", 32, 1, True, {"channels_last": True}),
    "lever-adamw-forloop": ("sd15", 32, 1, True, {"adamw": "forloop"}),
    "lever-adamw-fused": ("sd15", 32, 1, True, {"adamw": "fused"}),
    "lever-compile-tiny": ("tiny", None, 8, True, {"compile": True}),  # inductor compile of SD1.5 fwd+bwd takes too long here
    "lever-compile-regional-tiny": ("tiny", None, 8, True, {"compile": "regional"}),  # diffusers' compile_repeated_blocks
    "lever-channels-last-tiny": ("tiny", None, 8, True, {"channels_last": True}),
    "lever-adamw-fused-tiny": ("tiny", None, 8, True, {"adamw": "fused"}),
    "lever-batch16-tiny": ("tiny", None, 16, True, {}),
    # issue 16's P1 / P6 cases: adapt's cached step against the reference trainer (diffusers'
    # train_text_to_image_lora.py, run from --reference-venv / --reference-script) at the same sizes
    "p1-tiny": ("tiny", None, 8, True, {}),
    "p1-sd15": ("sd15", 32, 4, True, {}),
    "p1-sd15-regional": ("sd15", 32, 4, True, {"compile": "regional"}),  # train.compile=regional, against the same reference
    # bf16 where the CPU has native bf16 dot products (avx512_bf16 / AMX): model.dtype=bfloat16, train.mixed_precision=bf16
    "p1-tiny-bf16": ("tiny", None, 8, True, {"bf16": True}),
    "p1-sd15-bf16": ("sd15", 32, 4, True, {"bf16": True}),
    # the same with attention left to PyTorch's bf16 CPU kernel (what adapt/cpu_attention.py replaces at short lengths)
    "lever-bf16-attention-tiny": ("tiny", None, 8, True, {"bf16": True, "bf16_attention": True}),
    "lever-bf16-attention-sd15": ("sd15", 32, 4, True, {"bf16": True, "bf16_attention": True}),
    "ref-tiny": ("tiny", None, 8, False, {"reference": True}),
    "ref-sd15": ("sd15", 32, 4, False, {"reference": True}),
    "ref-tiny-bf16": ("tiny", None, 8, False, {"reference": True, "bf16": True}),  # --mixed_precision bf16: all in bf16
    "ref-sd15-bf16": ("sd15", 32, 4, False, {"reference": True, "bf16": True}),
    "sample-tiny": ("tiny", None, 1, True, {"sample": True}),
    "sample-sd15-8": ("sd15", 8, 1, True, {"sample": True}),
}
QUICK = ["train-tiny-cache", "train-tiny-nocache", "train-tiny-cache-gc", "train-tiny-buckets", "sample-tiny"]
# P1 / P2 / P6 against the reference (with --reference-venv/--reference-script), interleaved: adapt, reference, ...
PERF = ["p1-tiny", "ref-tiny", "p1-sd15", "ref-sd15", "p1-sd15-bf16", "ref-sd15-bf16", "p1-tiny-bf16", "ref-tiny-bf16"]
PHOTO_ASPECTS = [0.75, 1.333, 0.5, 1.0, 1.778, 0.5625, 2.0]  # as datasets/synth_sunglasses_photos
PHOTO_SCALES = [1.0, 2.0, 0.75, 4.0, 1.5]


def matmul_rate(n: int = 1024, reps: int = 20, dtype: torch.dtype = torch.float32) -> float:
    """Dense torch.mm FLOP/s (fp32 unless `dtype`) at the current thread count (best of `reps`)."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def bf16_speed(n: int = 512, reps: int = 5, dtype: torch.dtype = torch.bfloat16) -> float:
    """This CPU's bf16 (or `dtype`) torch.mm rate over its fp32 rate at the current thread count: ~2.3 with native
    bf16 dot products (AMD EPYC Zen 4, avx512_bf16), 0.64 on a Xeon whose torch build took no bf16 fast path."""
    return matmul_rate(n, reps, dtype) / matmul_rate(n, reps)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _pipeline(arch: str, dtype: torch.dtype = torch.float32):
    """The case's base in `dtype`, every part created in it (as the recipe loads model.dtype=bfloat16): peak RSS
    then never holds an fp32 copy."""
    from adapt import model
    if arch == "sd15":
        from adapt.archs import build_sd15_pipeline
        from adapt.model import facts_of
        pipe = build_sd15_pipeline(dtype=dtype)
        return pipe, facts_of(pipe, "sd15-random", "sd15-random")
    try:
        return model.load_base("tiny-faces", torch_dtype=dtype)
    except model.ModelError:  # a checkout without the embedded base: the tiny random pipeline
        import tempfile
        from adapt.tiny import save_tiny_pipeline
        return model.load_base(str(save_tiny_pipeline(Path(tempfile.mkdtemp()) / "tiny")), torch_dtype=dtype)


def _images(n: int, size: int, facts=None, mixed: bool = False):
    """(Sized, captions): n synthetic sunglasses images at a `size`² pixel budget: squares, or (mixed) photos of
    several aspects and sizes placed in aspect buckets. Also the share of each photo's pixels a square centre
    crop would keep, and the share its bucket keeps."""
    from adapt import buckets, synth
    imgs, caps = [], []
    for i in range(n):
        img, cap, _ = synth.make_photo("sunglasses", "train", i, 64, PHOTO_ASPECTS[i % 7], PHOTO_SCALES[i % 5]) if mixed \
            else synth.make("sunglasses", "train", i)
        imgs.append(img)
        caps.append(cap)
    sizing = buckets.Sizing(size, facts.size_multiple if facts else 8, buckets=mixed)
    sized = buckets.size_images(imgs, sizing)
    kept = {"kept_square_crop": sum(buckets.kept_fraction(*im.size, (size, size)) for im in imgs) / n,
            "kept_buckets": sum(buckets.kept_fraction(*im.size, p.bucket) for im, p in zip(imgs, sized.placements)) / n,
            "buckets": sorted({f"{w}x{h}" for w, h in sized.bucket_of()})} if mixed else {}
    return sized, caps, kept


def train_case(name: str, steps: int = 10, warmup: int = 3) -> dict:
    from torch.utils.flop_counter import FlopCounterMode
    from adapt import cache, cpu_attention, lora, objective, sample, trainstep
    arch, side, batch, use_cache, extra = CASES[name]
    bf16 = extra.get("bf16", False)  # as model.dtype=bfloat16 + train.mixed_precision=bf16: frozen weights bf16, LoRA fp32
    pipe, facts = _pipeline(arch, torch.bfloat16 if bf16 else torch.float32)
    size = (side or pipe.unet.config.sample_size) * facts.vae_factor
    sized, caps, kept = _images(16, size, facts, extra.get("mixed", False))
    unet = pipe.unet
    if extra.get("attn") == "classic":
        from diffusers.models.attention_processor import AttnProcessor
        unet.set_attn_processor(AttnProcessor())
    lora.attach(unet, "cross_attn", rank=8)
    if bf16 and not extra.get("bf16_attention"):  # as the recipe does on a CPU
        cpu_attention.apply(unet, "cpu", torch.bfloat16)
    if extra.get("gradient_checkpointing"):
        unet.enable_gradient_checkpointing()
    if extra.get("channels_last"):
        unet.to(memory_format=torch.channels_last)
    window = objective.window_timesteps(sample.make_scheduler(pipe.scheduler, "ddim"), 50, 0.6, "img2img_exact")
    post = cache.encode_entries(pipe.vae, sized.pixels) if use_cache else None
    encoders_flops = bench_reference.encoder_flops(pipe, sized, caps, batch) if name.startswith("p1-") else None
    td = trainstep.build(pipe, facts, caps, window, post, sized, batch)
    if use_cache:  # as the recipe does when no validation needs them: the training peak runs without them
        pipe.vae = pipe.text_encoder = None
        import gc
        gc.collect()
    params = [p for p in unet.parameters() if p.requires_grad]
    kind = extra.get("adamw", "foreach")
    opt = torch.optim.AdamW(params, lr=1e-4, foreach=kind == "foreach", fused=kind == "fused" or None)
    if extra.get("compile") == "regional":  # compile one BasicTransformerBlock graph, reused by every block
        unet.compile_repeated_blocks(fullgraph=False)
    fwd = torch.compile(unet) if extra.get("compile") is True else unet
    unet.train()

    def step(i: int):
        b = trainstep.draw(td, batch, trainstep.step_generator(0, i), pipe=pipe, at=i)
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            loss = trainstep.forward_loss(fwd, b, td, dtype=torch.bfloat16 if bf16 else torch.float32).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t_compile = time.perf_counter()
    for i in range(warmup):
        step(i)
    t_compile = time.perf_counter() - t_compile
    times = []
    for i in range(steps):
        t = time.perf_counter()
        step(warmup + i)
        times.append(time.perf_counter() - t)
    step_s = sorted(times)[len(times) // 2]
    with FlopCounterMode(display=False) as fc:
        step(10_000)
    flops = fc.get_total_flops()
    profile = None
    if extra.get("profile"):  # where the time goes: top operators by self CPU time over 2 steps
        from torch.profiler import ProfilerActivity, profile as prof
        with prof(activities=[ProfilerActivity.CPU]) as p:
            step(10_001)
            step(10_002)
        ev = sorted(p.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:10]
        total = sum(e.self_cpu_time_total for e in p.key_averages())
        profile = [{"op": e.key, "self_cpu_share": round(e.self_cpu_time_total / total, 4), "calls": e.count} for e in ev]
    rate = matmul_rate(2048 if torch.get_num_threads() > 1 else 1024)
    peak = peak_rss_mb()  # before the reference's count below, which adds a second adapter
    ref_flops = encoders_flops + bench_reference.unet_flops(unet, trainstep.draw(td, batch, trainstep.step_generator(0, 0), at=0)) \
        if encoders_flops is not None else None
    return {"name": name, "kind": "train", "arch": arch, "latent": side or pipe.unet.config.sample_size, "batch": batch,
            "cache": use_cache, **{k: v for k, v in extra.items()}, **kept, "samples_per_s": batch / step_s, "step_s": step_s,
            "warmup_s": t_compile, "peak_rss_mb": peak, "flops_per_step": flops, "achieved_flops": flops / step_s,
            "matmul_flops": rate, "matmul_fraction": flops / step_s / rate, **({"profile_top": profile} if profile else {}),
            **({"reference_flops_per_step": ref_flops} if ref_flops else {})}


def sample_case(name: str, reps: int = 3) -> list[dict]:
    from adapt import lora, sample
    arch, side, _, _, _ = CASES[name]
    pipe, facts = _pipeline(arch)
    size = (side or pipe.unet.config.sample_size) * facts.vae_factor
    sized, caps, _ = _images(1, size)
    from PIL import Image
    src = Image.fromarray(((sized.pixels[0].permute(1, 2, 0).numpy() + 1) * 127.5).clip(0, 255).astype("uint8"))
    steps = 20

    def timed(fn):
        fn()
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            out = fn()
            ts.append(time.perf_counter() - t)
        return sorted(ts)[len(ts) // 2], out

    rows, outs = [], {}
    variants = ["base", "unfused", "fused"]
    for v in variants:
        if v == "unfused":
            lora.attach(pipe.unet, "cross_attn", rank=8)
            g = torch.Generator().manual_seed(0)
            for n, p in pipe.unet.named_parameters():
                if "lora_B" in n:
                    p.data = torch.randn(p.shape, generator=g) * 0.01
        if v == "fused":
            pipe.unet.fuse_lora(lora_scale=1.0)
        for mode in ("txt2img", "img2img"):
            fn = (lambda: sample.txt2img(pipe, caps[0], 1, steps, 1.0, 0, size=size)) if mode == "txt2img" else \
                 (lambda: sample.img2img(pipe, [src], caps[0], 0.5, steps, 1.0, 0))
            s, out = timed(fn)
            outs[(v, mode)] = torch.tensor(list(out[0].getdata()), dtype=torch.float32)
            rows.append({"name": f"{name}-{mode}-{v}", "kind": "sample", "arch": arch, "image_s": s, "steps": steps,
                         "samples_per_s": 1 / s, "step_s": s / steps, "peak_rss_mb": peak_rss_mb()})
    for r in rows:
        base = next(b for b in rows if b["name"] == r["name"].rsplit("-", 1)[0] + "-base")
        r["overhead_vs_base"] = r["image_s"] / base["image_s"] - 1
    for mode in ("txt2img", "img2img"):  # fused must equal unfused (8-bit images: identical or off by 1 level)
        d = (outs[("fused", mode)] - outs[("unfused", mode)]).abs().max().item()
        next(r for r in rows if r["name"].endswith(f"{mode}-fused"))["max_abs_diff_vs_unfused_0_255"] = d
    return rows


def machine() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import diffusers
    return {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "python": platform.python_version()}


def run(cases: list[str], threads: int, out: str | None, reference: tuple | None = None) -> dict:
    results = []
    for c in cases:
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        if reference:
            env.update(ADAPT_REF_VENV=str(reference[0]), ADAPT_REF_SCRIPT=str(reference[1]))
        t = time.time()
        r = subprocess.run([sys.executable, "-m", "adapt.bench", "--case", c, "--threads", str(threads)], env=env,
                           capture_output=True, text=True)
        lines = [l for l in r.stdout.splitlines() if l.startswith("{")]
        if r.returncode != 0 or not lines:
            results.append({"name": c, "error": (r.stderr.strip().splitlines() or ["?"])[-1]})
        for l in lines:
            results.append(json.loads(l))
        print(f"  {c}: {time.time() - t:.0f}s", file=sys.stderr)
    torch.set_num_threads(threads)
    report = {"machine": machine(), "results": results}
    _speedups(report)
    report["defaults"] = bench_reference.at_defaults(report)
    if out:
        from adapt import atomic
        atomic.write_text(out, json.dumps(report, indent=1))
    print(table(report))
    prof = next((r.get("profile_top") for r in results if r.get("profile_top")), None)
    if prof:
        print("\ntop operators (self CPU share), SD1.5 32x32 cached step:")
        for p in prof:
            print(f"  {p['self_cpu_share']:6.1%}  {p['op']} x{p['calls']}")
    return report


def _speedups(report: dict) -> None:
    by = {r["name"]: r for r in report["results"]}
    for name, r in by.items():
        if name.endswith("-cache") and name.replace("-cache", "-nocache") in by and "step_s" in by[name.replace("-cache", "-nocache")]:
            r["speedup_vs_nocache"] = by[name.replace("-cache", "-nocache")]["step_s"] / r["step_s"]
        base_case = "train-tiny-cache" if name.endswith("-tiny") else "train-sd15-32-cache"
        ref = by.get("ref-" + name[3:].removesuffix("-regional"), {}) if name.startswith("p1-") else {}
        if "samples_per_s" in ref and "samples_per_s" in r:  # issue 16: P1 throughput and P6 memory vs the reference
            r["P1_vs_reference"] = r["samples_per_s"] / ref["samples_per_s"]  # at equal precision
            r["P6_rss_vs_reference"] = r["peak_rss_mb"] / ref["peak_rss_mb"]
        ref_default = by.get("ref-" + name[3:].removesuffix("-bf16"), {}) if name.startswith("p1-") and name.endswith("-bf16") else {}
        if "samples_per_s" in ref_default and "samples_per_s" in r:  # against the reference's default precision (fp32)
            r["P1_vs_reference_fp32"] = r["samples_per_s"] / ref_default["samples_per_s"]
        if name.startswith("p1-") and "matmul_fraction" in r:
            r["P2_matmul_fraction"] = r["matmul_fraction"]
        if "reference_flops_per_step" in r:  # the P1 that doing less work alone gives, both trainers at one FLOP rate
            r["P1_at_equal_flop_rate"] = r["reference_flops_per_step"] / r["flops_per_step"]
        square = name.replace("-buckets", "-cache")
        if name.endswith("-buckets") and "samples_per_s" in by.get(square, {}):
            r["throughput_vs_square"] = r["samples_per_s"] / by[square]["samples_per_s"]
        if name.startswith("lever-") and "step_s" in r and "step_s" in by.get(base_case, {}):
            # batch changes the work per step: compare throughput, not step time
            r["speedup_vs_default"] = r["samples_per_s"] / by[base_case]["samples_per_s"]


def table(report: dict) -> str:
    m = report["machine"]
    lines = [f"{m['cpu']} | {m['threads']} thread(s) | torch {m['torch']}", "",
             f"{'case':32s} {'samples/s':>10s} {'step s':>9s} {'peak MB':>8s} {'GFLOP/step':>11s} {'mm frac':>8s}  notes"]
    for r in report["results"]:
        if "error" in r:
            lines.append(f"{r['name']:32s} ERROR {r['error']}")
            continue
        notes = []
        for k in ("P1_vs_reference", "P1_vs_reference_fp32", "P1_at_equal_flop_rate", "P6_rss_vs_reference", "P2_matmul_fraction", "warmup_s", "wall_s",
                  "speedup_vs_nocache", "speedup_vs_default", "throughput_vs_square", "kept_square_crop", "kept_buckets",
                  "overhead_vs_base", "max_abs_diff_vs_unfused_0_255", "image_s"):
            if k in r:
                notes.append(f"{k}={r[k]:.3f}")
        gf = f"{r['flops_per_step'] / 1e9:11.2f}" if "flops_per_step" in r else " " * 11
        fr = f"{r['matmul_fraction']:8.3f}" if "matmul_fraction" in r else " " * 8
        lines.append(f"{r['name']:32s} {r['samples_per_s']:10.2f} {r['step_s']:9.4f} {r['peak_rss_mb']:8.0f} {gf} {fr}  {' '.join(notes)}")
    for arch, d in report.get("defaults", {}).items():
        lines.append(f"P1 at each trainer's default, {arch}: {d['P1']:.3f} ({d['adapt_case']}: train.mixed_precision=auto "
                     f"-> {d['adapt_precision']}, {d['why']}; {d['reference_case']}: the reference's fp32)")
    return "\n".join(lines)


def add_parser(sub):
    p = sub.add_parser("bench", help="training/sampling throughput, FLOP efficiency and memory; prints a table, writes JSON")
    p.add_argument("--config", default="quick", help=f"'quick' ({', '.join(QUICK)}), 'p1' ({', '.join(PERF)}: needs "
                   f"--reference-*), 'all' (every adapt case), or comma-separated case names: {', '.join(CASES)}")
    p.add_argument("--out", default=None, help="JSON output file")
    p.add_argument("--reference-venv", default=None, help="ref-* cases: a venv that runs diffusers' LoRA example (with torchvision)")
    p.add_argument("--reference-script", default=None, help="ref-* cases: examples/text_to_image/train_text_to_image_lora.py "
                   "from a diffusers checkout")
    p.set_defaults(func=cmd_bench)


def cmd_bench(a) -> int:
    from adapt.cli import CliError
    cases = QUICK if a.config == "quick" else PERF if a.config == "p1" else \
        [c for c in CASES if not c.startswith("ref-")] if a.config == "all" else a.config.split(",")
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        raise CliError(f"unknown bench case(s) {unknown}; known: {list(CASES)}")
    refs = [c for c in cases if c.startswith("ref-")]
    if refs and not (a.reference_venv and a.reference_script):
        raise CliError(f"{refs} need --reference-venv and --reference-script")
    reference = (Path(a.reference_venv).resolve(), Path(a.reference_script).resolve()) if refs else None
    # Checked before any case runs: a p1 round spends minutes on adapt's cases before the first reference one.
    if reference and not (reference[0] / "bin" / "accelerate").is_file():
        raise CliError(f"--reference-venv {a.reference_venv}: no bin/accelerate in it (a venv with diffusers, accelerate "
                       "and torchvision that runs diffusers' LoRA example)")
    if reference and not reference[1].is_file():
        raise CliError(f"--reference-script {a.reference_script}: no such file (examples/text_to_image/"
                       "train_text_to_image_lora.py from a diffusers checkout)")
    run(cases, torch.get_num_threads() if a.threads is None else a.threads, a.out, reference)
    return 0


def main():
    import argparse
    import adapt
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", required=True)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    adapt.quiet()
    torch.manual_seed(0)
    kind = CASES[a.case][4]
    rows = sample_case(a.case) if kind.get("sample") else [bench_reference.case(a.case)] if kind.get("reference") else [train_case(a.case)]
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
