"""Does the strength window matter? Train the demo adapter with objective.window=img2img_exact and
=full (same steps, seed and data), checkpointing as it goes, and measure at each checkpoint how far
it reaches at a sampling setting (by default the adapter's strength at scale 1; --strength / --scale for the
setting the evaluation recommends), masked or plain.

    python recipes/compare_windows.py [--out runs/compare_windows] [--every 250] [--mode masked]
                                      [--strength S] [--scale C] [--measure-only] [--alignment STEP] [key=value ...]
    python recipes/compare_windows.py --out DIR --measure-only --checkpoints 125 --adapter-timesteps 0:161 ...

Reported per window: lens-detector reach, shape check and SSIM outside the eye band at every
checkpoint (32 held-out faces x 2 seeds), and the first step at which detector reach >= 0.9 and the shape
check >= 0.8. A run that ships a tuned decoder (decoder.steps) is measured with it.
With masked sampling (the input pasted back outside the adapter's own mask) preservation is matched
by construction; with plain sampling the table shows it beside reach.
--adapter-timesteps LO:HI measures the trained checkpoints with the adapter on only at those sampling steps
(which steps of img2img the edit comes from); it prints and leaves summary.json alone.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

import adapt
from adapt import atomic, checkpoint, decoder, lora, masking, metrics, model, sample, synth, synthbench

ROOT = Path(__file__).resolve().parents[1]


def set_lora(pipe, name: str, tensors: dict) -> None:
    """Copy checkpoint LoRA tensors (peft names: '<module>.lora_A.weight') into the loaded adapter `name`."""
    modules = dict(pipe.unet.named_modules())
    for k, v in tensors.items():
        mod, kind = k.rsplit(".lora_", 1)
        getattr(modules[mod], "lora_" + kind.split(".")[0])[name].weight.data.copy_(v)


@contextlib.contextmanager
def active_only(pipe, name: str, scale: float, timesteps: tuple[int, int] | None):
    """The adapter at `scale` only while the UNet runs at a timestep in [lo, hi], weighted 0 elsewhere (None: always).

    Asks which img2img steps the edit comes from. Needs the adapter unfused (lora.applied(fuse=False)): a forward
    pre-hook reads each call's timestep and sets every LoRA layer's scale (peft's LoraLayer.set_scale) before it runs.
    """
    if timesteps is None:
        yield
        return
    lo, hi = timesteps
    layers = [m for m in pipe.unet.modules() if hasattr(m, "set_scale") and name in getattr(m, "scaling", {})]

    def gate(module, args, kwargs):
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        t = float(torch.as_tensor(t).flatten()[0])
        for m in layers:
            m.set_scale(name, scale if lo <= t <= hi else 0.0)

    handle = pipe.unet.register_forward_pre_hook(gate, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def judge(pipe, name, strength, mode, scale=1.0, n=32, seeds=2, vae=None, mask=None, only_t=None) -> dict:
    """vae: the run's tuned decoder (adapt.decoder), or None for the base's; mask: MaskSettings (default: sample's);
    only_t: (lo, hi), the adapter active only at those sampling timesteps (the mask is still read with it on)."""
    imgs, faces, prompts = [], [], []
    for i in range(n):
        im, cap, f = synth.make("faces", "eval", i)
        imgs.append(im)
        faces.append(f)
        prompts.append(cap + " wearing sunglasses")
    masks = synthbench.Masks.of(faces, 64)
    x = np.stack([sample.to_array(i) for i in imgs])
    edit = masking.auto_mask(pipe, imgs, prompts, [name], mask or masking.MaskSettings()) if mode == "masked" else None
    res = {"detected": [], "shape": [], "ssim_out": []}
    for seed in range(seeds):
        with lora.applied(pipe, [name], [scale], fuse=only_t is None), active_only(pipe, name, scale, only_t), \
                decoder.swapped(pipe, vae):
            outs = sample.img2img(pipe, imgs, prompts, strength, 25, 1.0, 1000 * seed, "ddim", batch_size=32,
                                  mask=edit, paste_blur=1.0 if edit is not None else None)
        for i, o in enumerate(outs):
            o = sample.to_array(o)
            j = synthbench.judge(o, x[i], metrics.ssim_map(o, x[i]), faces[i], masks, i)
            for k in res:
                res[k].append(j[k])
    return {k: float(np.mean(v)) for k, v in res.items()}


def alignment(run_dir: Path, step: int, batches: int = 32) -> dict:
    """Why the window is not 2x faster: how far a full-range batch's LoRA gradient points along the window's.

    At checkpoint `step` of a run (its config: preset, rank, strength, scheduler, Min-SNR, caption dropout), the
    expected gradient of the window objective G_w is estimated from `batches` batches; then, for fresh batches drawn
    from the window, from the full range and from t above the window, the mean cosine of one batch's gradient with
    G_w. Progress per step along G_w goes roughly with that cosine (Adam normalises the length), so the full range's
    cosine over the window's predicts its relative speed; 0.5 would need the out-of-window half to point nowhere.
    """
    from adapt import buckets, cache, config, objective, trainstep
    cfg = config.load(config.RunConfig, run_dir / "config.yaml")
    pipe, facts = model.load_base(cfg.model.base)
    lora.attach(pipe.unet, cfg.lora.preset, cfg.lora.rank, cfg.lora.alpha)
    set_lora(pipe, "default", load_file(str(run_dir / f"checkpoint-{step}" / checkpoint.WEIGHTS) + ".safetensors"))
    made = [synth.make("sunglasses", "train", i) for i in range(cfg.data.num_images or 32)]  # the synthetic set's images
    sizing = buckets.Sizing(cfg.data.resolution, facts.size_multiple, buckets=False)
    sized = buckets.size_images([m[0] for m in made], sizing)
    caps = [m[1] for m in made]
    post = cache.encode_entries(pipe.vae, sized.pixels)
    o = cfg.objective
    win = objective.window_timesteps(sample.make_scheduler(pipe.scheduler, o.scheduler), o.inference_steps, o.strength, "img2img_exact")
    td = trainstep.build(pipe, facts, caps, win, post, sized, cfg.train.batch_size)
    params = [p for p in pipe.unet.parameters() if p.requires_grad]

    def grad(window, i):
        td.window = window
        b = trainstep.draw(td, cfg.train.batch_size, trainstep.step_generator(7, i), cfg.data.caption_dropout, at=i)
        g = torch.autograd.grad(trainstep.forward_loss(pipe.unet, b, td, o.min_snr_gamma).mean(), params)
        return torch.cat([x.flatten() for x in g])

    cos = lambda a, b: float(torch.nn.functional.cosine_similarity(a, b, dim=0))
    g_w = torch.stack([grad(win, i) for i in range(batches)]).mean(0)
    T = pipe.scheduler.config.num_train_timesteps
    above = torch.arange(int(win.max()) + 1, T)
    out = {}
    for name, window, base in (("window", win, 10_000), ("full", torch.arange(T), 20_000), ("above", above, 30_000)):
        gs = [grad(window, base + i) for i in range(batches)]
        out[f"cos_batch_{name}"] = sum(cos(g, g_w) for g in gs) / batches
        out[f"cos_mean_{name}"] = cos(torch.stack(gs).mean(0), g_w)
    out["predicted_steps_ratio"] = out["cos_batch_full"] / out["cos_batch_window"]  # window steps / full-range steps
    return out


def crossings(curve: dict, level: float = 0.9, metric: str = "detected") -> tuple[int | None, int | None]:
    """(first checkpoint step with detector reach >= level, first step from which every later checkpoint stays >= level).
    64 judged outputs per checkpoint make reach noisy (about +-0.04): a curve can cross once and dip again, so both are
    reported."""
    steps = sorted(curve)
    first = next((s for s in steps if curve[s][metric] >= level), None)
    held = next((s for i, s in enumerate(steps) if all(curve[t][metric] >= level for t in steps[i:])), None)
    return first, held


def _read(summary: Path) -> dict:
    """Results already in summary.json, curve steps back to ints (JSON keys are strings)."""
    if not summary.is_file():
        return {}
    results = json.loads(summary.read_text())
    for r in results.values():
        r["curve"] = {int(k): v for k, v in r["curve"].items()}
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/compare_windows")
    ap.add_argument("--config", default=str(ROOT / "recipes/configs/tiny_sunglasses.yaml"))
    ap.add_argument("--every", type=int, default=250, help="checkpoint and measure every N steps")
    ap.add_argument("--mode", default="masked", choices=["masked", "plain"])
    ap.add_argument("--strength", type=float, default=None, help="img2img strength measured (default: the adapter's)")
    ap.add_argument("--scale", type=float, default=1.0, help="adapter scale measured")
    ap.add_argument("--mask-timestep", type=int, default=None, help="masked mode: the timestep the mask is read at "
                    "(default: MaskSettings', 441)")
    ap.add_argument("--adapter-timesteps", default=None, metavar="LO:HI", help="with --measure-only: the adapter active only "
                    "at sampling timesteps LO..HI (which img2img steps the edit comes from)")
    ap.add_argument("--checkpoints", default=None, metavar="S1,S2", help="with --measure-only: measure only these steps")
    ap.add_argument("--windows", default="img2img_exact,full", help="windows trained (one per process runs them in parallel; "
                    "the comparison is printed when both are in --out)")
    ap.add_argument("--measure-only", action="store_true", help="measure the runs already trained in --out (e.g. at "
                    "another --strength) instead of training them again")
    ap.add_argument("--alignment", type=int, default=None, metavar="STEP", help="instead of training or measuring: at "
                    "checkpoint STEP of --out's img2img_exact run, how well one full-range batch's gradient points along "
                    "the window's expected one, against one window batch's (the predicted steps ratio)")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_intermixed_args(argv)  # key=value overrides may sit between flags
    adapt.quiet()
    torch.set_num_threads(1)
    out = Path(a.out)
    if a.alignment is not None:
        r = alignment(out / "img2img_exact", a.alignment)
        print(f"step {a.alignment}: mean cosine of one batch's gradient with the window's expected gradient: window "
              f"{r['cos_batch_window']:.3f}, full range {r['cos_batch_full']:.3f}, above the window {r['cos_batch_above']:.3f} "
              f"(of 32-batch means: {r['cos_mean_window']:.3f} / {r['cos_mean_full']:.3f} / {r['cos_mean_above']:.3f}); "
              f"predicted steps ratio window/full {r['predicted_steps_ratio']:.2f}")
        return
    partial = a.adapter_timesteps is not None or a.checkpoints is not None  # a side measurement: printed, not the curves
    if partial and not a.measure_only:
        sys.exit("error: --adapter-timesteps and --checkpoints measure trained runs; add --measure-only")
    only_t = wanted = None
    try:
        if a.adapter_timesteps is not None:
            only_t = tuple(int(v) for v in a.adapter_timesteps.split(":"))
        if a.checkpoints is not None:
            wanted = {int(v) for v in a.checkpoints.split(",")}
    except ValueError as e:
        sys.exit(f"error: --adapter-timesteps / --checkpoints: {e}; expected LO:HI and S1,S2,... (integers)")
    if only_t is not None and (len(only_t) != 2 or only_t[0] > only_t[1]):
        sys.exit(f"error: --adapter-timesteps {a.adapter_timesteps!r}: expected LO:HI, two integers with LO <= HI")
    summary = out / "summary.json"
    results = _read(summary)  # a window measured by another process stays in the file
    for window in a.windows.split(","):
        run_dir = out / window
        cmd = [sys.executable, str(ROOT / "recipes/lora_img2img.py"), "--config", a.config, f"out_dir={run_dir}",
               f"objective.window={window}", "train.overwrite=true", "validation.steps=0",
               f"train.checkpointing_steps={a.every}", "train.checkpoints_total_limit=1000", *a.overrides]
        if a.measure_only:
            if not checkpoint.list_checkpoints(run_dir):
                sys.exit(f"error: --measure-only: no checkpoints in {run_dir}; train it first (drop --measure-only)")
        else:
            subprocess.run(cmd, check=True)
        facts = lora.facts(run_dir)
        pipe, bf = model.load_base(facts.base)
        name = lora.load_into(pipe, run_dir, 1.0, adapter_name="w", base_resolved=bf.resolved, log=lambda m: None)
        vae = decoder.load(run_dir, pipe.vae)  # the same for both windows (a function of base, data and its settings)
        curve = {}
        for ck in checkpoint.list_checkpoints(run_dir):
            step = int(ck.name.split("-")[1])
            if wanted is not None and step not in wanted:
                continue
            set_lora(pipe, name, load_file(str(ck / checkpoint.WEIGHTS) + ".safetensors"))
            curve[step] = judge(pipe, name, a.strength or facts.strength, a.mode, a.scale, vae=vae,
                                mask=masking.MaskSettings(timestep=a.mask_timestep) if a.mask_timestep else None,
                                only_t=only_t)
            gated = f" (adapter only at t in {only_t[0]}..{only_t[1]})" if only_t else ""
            print(f"{window} step {step}{gated}: {curve[step]}", flush=True)
        if wanted is not None and not wanted <= curve.keys():
            have = [int(c.name.split("-")[1]) for c in checkpoint.list_checkpoints(run_dir)]
            sys.exit(f"error: --checkpoints: {run_dir} has no checkpoint at step(s) {sorted(wanted - curve.keys())}; it has {have}")
        if partial:
            continue
        first, held = crossings(curve)
        shape_first, shape_held = crossings(curve, 0.8, "shape")
        results[window] = {"strength": a.strength or facts.strength, "scale": a.scale, "mode": a.mode, "curve": curve, "first_step_reach_0.9": first,
                           "held_from_step_reach_0.9": held, "first_step_shape_0.8": shape_first,
                           "held_from_step_shape_0.8": shape_held, "decoder": vae is not None}
    if partial:
        return
    out.mkdir(parents=True, exist_ok=True)
    results = {**_read(summary), **{w: results[w] for w in a.windows.split(",")}}  # the other may have finished meanwhile
    atomic.write_text(summary, json.dumps(results, indent=1))
    if not {"img2img_exact", "full"} <= results.keys():
        return
    steps = sorted(results["full"]["curve"])
    print(f"\n{'step':>6} | {'exact: det, shape, SSIM-out':>28} | {'full: det, shape, SSIM-out':>27}")
    for s in steps:
        e, f = results["img2img_exact"]["curve"].get(s), results["full"]["curve"][s]
        cell = lambda r: f"{r['detected']:6.2f} {r['shape']:6.2f} {r['ssim_out']:8.3f}" if r else " " * 22
        print(f"{s:6d} | {cell(e):>28} | {cell(f):>27}")
    for key, what in (("first_step_reach_0.9", "detector reach 0.9, first"), ("held_from_step_reach_0.9", "detector reach 0.9, held"),
                      ("first_step_shape_0.8", "shape check 0.8, first"), ("held_from_step_shape_0.8", "shape check 0.8, held")):
        fe, ff = results["img2img_exact"].get(key), results["full"].get(key)
        print(f"steps to {what}: exact {fe}, full {ff}" + (f" (ratio {fe / ff:.2f})" if fe and ff else ""))


if __name__ == "__main__":
    main()
