"""Adapt a latent diffusion model to a target domain with cross-attention LoRA, for img2img at strength s.

    accelerate launch -q --config_file accelerate_config.yaml recipes/lora_img2img.py \
        --config recipes/configs/tiny_sunglasses.yaml [key=value ...]

(-q: on an error, accelerate's launcher adds its own CalledProcessError trace after adapt's one-line
`error: ...`; -q keeps only adapt's line.) Ctrl-C or SIGTERM finishes the current step, writes a checkpoint
and says how to resume; `train.resume_from_checkpoint=latest` continues exactly.

Reads top to bottom: config -> base -> data -> cached latents and prompts -> strength window ->
LoRA -> loop (loss, checkpoints, validation) -> adapter files. Training draws timesteps only from
the window img2img at strength s visits for the configured scheduler and step count (SDEdit,
Meng et al. 2022), and the adapter records that strength so sampling matches it.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import shlex
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

T_LAUNCH = time.time()  # before torch and diffusers import: "first step after N s" counts what a user waits for

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

import adapt
from adapt import (atomic, buckets, cache, checkpoint, config, cpu_attention, data, decoder, imagefolder, lora, model, objective,
                   precision, runguard, sample, trainstep, warmstart)
from adapt import facts as facts_mod
from adapt import resume as resume_mod
from adapt import validation
from adapt.card import write_model_card
from adapt.facts import AdapterFacts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=config.keys_help(config.RunConfig))
    ap.add_argument("--config", help="YAML run config (recipes/configs/*.yaml)")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.max_steps=100 lora.rank=4")
    args = ap.parse_intermixed_args(argv)  # key=value overrides may sit before, between or after flags
    cfg = config.load(config.RunConfig, args.config, args.overrides)
    adapt.quiet()
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)

    out = Path(cfg.out_dir)
    atomic.writable_dir(out, "out_dir")
    cfg, chosen = _precision(cfg, out)
    trackers = _trackers(cfg.train.report_to)
    acc = Accelerator(mixed_precision=cfg.train.mixed_precision, log_with=trackers, project_dir=str(out))
    say = _printer(acc, out)
    lock = runguard.OutDirLock(out)
    _together(acc, lambda: lock.acquire(say) if acc.is_main_process else None)
    stopper = runguard.Stopper(say)
    try:
        return train(cfg, acc, out, say, stopper, trackers, chosen)
    finally:
        stopper.close()
        lock.release()


def train(cfg, acc, out: Path, say, stopper, trackers, chosen: precision.Precision) -> int:
    resume, saved = _together(acc, lambda: _preflight(cfg, out, say, acc.is_main_process))
    set_seed(cfg.train.seed)
    t_start = time.time()

    # 1. Base model: frozen VAE, text encoder and UNet.
    m = cfg.model
    pipe, facts = model.load_base(m.base, m.revision, m.variant, m.dtype, m.vae, m.architecture, m.config)
    pipe.to(acc.device)
    unet = pipe.unet
    say(f"base {cfg.model.base}: {facts.architecture}, {facts.prediction_type}, scaling_factor {facts.scaling_factor}, "
        f"{facts.num_train_timesteps} train timesteps, latent factor {facts.vae_factor}")
    # An adapter to start from (lora.init_from), read and checked against this UNet before any data work.
    init = warmstart.read(cfg.lora.init_from, unet, cfg.lora.preset, say) if cfg.lora.init_from else None

    # 2. Data: decode, convert, place each image in its aspect bucket; every skipped file is named in the log.
    d = cfg.data
    sizing = _sizing(cfg, facts)
    sized, records, report = data.load_sized(d.source, sizing, d.split, d.image_column, d.caption_column,
                                             d.default_caption, d.num_images, d.cache_dir, logger=say, masks=d.masks,
                                             kohya_folders=d.kohya_folders)
    fingerprint = data.fingerprint(records, sized.pixels, sized.crops)
    repeats = [r.repeats for r in records]
    if max(repeats) > 1:  # kohya's N_name folders: part of what a resume must match
        fingerprint = cache.cache_key(images=fingerprint, repeats=repeats)[:16]
        folders = [m.group(0) for r in records if (m := imagefolder.kohya_folder(r.name))]
        say("kohya folders (repeats x images): " + ", ".join(f"{k}: {k.split('_')[0]} x {folders.count(k)}"
                                                             for k in sorted(set(folders))))
    loss_masks = None
    if d.masks:  # masked loss: the masks are part of the data a resume must match
        masks = imagefolder.load_masks(records, d.masks, sized.placements, sized.crops)
        fingerprint = cache.cache_key(images=fingerprint, masks=hashlib.sha256(b"".join(m.numpy().tobytes() for m in masks)).hexdigest())[:16]
        loss_masks = trainstep.latent_loss_masks(masks, facts.vae_factor, cfg.objective.mask_outside_weight)
        say(f"masked loss: {len(masks)} masks ({d.masks}), mean area {float(torch.cat([m.flatten() for m in masks]).mean()):.1%}; "
            f"weight outside {cfg.objective.mask_outside_weight}" + ("" if cfg.objective.mask_outside_weight else
            " (nothing holds the image in place outside the masks: sample with masks of your own rather than "
            "--mask auto, which reads where the adapter changes the image, or give the outside a weight)"))
    vae_fingerprint = cache.module_fingerprint(pipe.vae)
    run = {"config": facts_mod.flat(config.to_dict(cfg)), "data_fingerprint": fingerprint,  # what a resume must match
           "base_fingerprint": cache.module_fingerprint(pipe.unet) + vae_fingerprint,
           "init_fingerprint": init.sha256 if init else None}
    resumes = list(saved["run"]["resumes"]) if saved else []
    if saved is not None:
        changes = resume_mod.check_fingerprints(cfg, saved, run, resume)
        resumes.append({"step": saved["step"], "checkpoint": resume.name, "changed": changes})
    if acc.is_main_process:
        if resume is not None:
            checkpoint.abandon_newer(out, resume, log=say)
        checkpoint.remove_stale_tmp(out)
        config.dump(cfg, out / "config.yaml", resume_mod.notes(resumes))
    captions = [r.caption for r in records]
    too_long = cache.count_truncated(pipe.tokenizer, captions)
    if too_long:
        say(f"{len(too_long)} captions exceed {pipe.tokenizer.model_max_length} tokens and are truncated: "
            f"{[records[i].name for i in too_long[:5]]}")

    # 3. Cache posteriors (and flipped ones, if flipping) and prompt embeddings once.
    # The key covers the sizing (buckets, crops, their seed): the pixels themselves are in the data fingerprint.
    key = cache.cache_key(base=facts.resolved, vae=vae_fingerprint, dtype=cfg.model.dtype, data=fingerprint,
                          sizing=sizing.key(), flip=cfg.data.random_flip, layout=2)

    def encode():
        # Encoding is a one-off, frozen forward pass: it gets this machine's cores (shared among the local ranks)
        # even when training runs on fewer threads (train.num_threads), then training's count is restored.
        train_threads, threads = torch.get_num_threads(), _cache_threads(cfg, acc)
        torch.set_num_threads(threads)
        t = time.time()
        try:
            post = cache.encode_entries(pipe.vae, sized.pixels, log=say)
            if cfg.data.random_flip:
                flipped = cache.encode_entries(pipe.vae, sized.pixels, flip=True, log=say)
                post.update(mean_flip=flipped["mean"], std_flip=flipped["std"])
        finally:
            torch.set_num_threads(train_threads)
        flips = 2 if cfg.data.random_flip else 1
        n, dt = len(sized.pixels) * flips, time.time() - t
        # the cost of crops and flips: encoding time and cache size scale with the number of latents
        say(f"encoded {n} latents ({len(sized)} images x {sized.crops} crop(s) x {flips} flip(s)) in {dt:.1f}s on "
            f"{threads} thread(s) ({n / max(dt, 1e-9):.1f}/s)")
        return cache.pack(post)

    t0 = time.time()
    cache_file = _cache_root(cfg) / "latents" / f"{key}.safetensors" if cfg.data.cache else None
    reused = cache_file is not None and cache_file.is_file()
    post = cache.unpack(cache.load_or_compute(cache_file, encode, log=say))
    t0_cache_s = time.time() - t0
    stats = cache.latent_stats(post, facts.scaling_factor, facts.shift_factor)
    say(f"latents {'loaded from cache' if reused else 'encoded'} ({time.time() - t0:.1f}s{', ' + str(cache_file) if cache_file else ''}): scaled per-channel mean {_r(stats['channel_mean'])}, "
        f"std {_r(stats['channel_std'])}, overall std {stats['overall_std']:.3f}")
    if warning := cache.check_stats(stats):
        say("WARNING: " + warning)

    # 3b. Optional: the VAE decoder tuned on the target images (adapt.decoder), before the LoRA so that the
    # validation grids show it. Main process only; a saved one with the same key (e.g. on resume) is reused.
    validator = validation.Validator(cfg, pipe, pipe.unet, out, acc, say) if cfg.validation.source else None
    dec_figures = {}
    if cfg.decoder.steps:
        if validator:  # the grids' base column decodes with the base's decoder, so it runs before the tuning
            validator.draw_base()
        dec_figures = _together(acc, lambda: _decoder_phase(cfg, pipe, sized, vae_fingerprint, fingerprint, out, stopper, say)
                                if acc.is_main_process else {})
        if (sig := stopper.requested(acc)) is not None:
            say(f"{signal.Signals(sig).name} during the decoder fine-tuning: it was not saved and no LoRA step ran; "
                "rerun the same command to start again")
            return _finish(acc, 128 + sig)

    if init and init.te_tensors:  # frozen, and part of the conditioning the UNet layers train under (adapt.warmstart)
        if validator and validator.base is None:
            validator.draw_base()  # the grids' base column is the base's: drawn before the text encoder changes
        parts = warmstart.fuse_text_encoders(pipe, init)
        say(f"lora.init_from's text-encoder layers ({', '.join(f'{c}: {n}' for c, n in init.text_encoders.items())}) are "
            f"fused into {' and '.join(parts)} for the captions, not trained, and saved unchanged with the adapter")

    # 4. The strength window: the timesteps img2img at this strength visits.
    sampler = sample.make_scheduler(pipe.scheduler, cfg.objective.scheduler)
    window = objective.window_timesteps(sampler, cfg.objective.inference_steps, cfg.objective.strength, cfg.objective.window)
    say(f"window {cfg.objective.window} at strength {cfg.objective.strength} ({cfg.objective.scheduler}, "
        f"{cfg.objective.inference_steps} steps): {len(window)} timesteps in [{int(window.min())}, {int(window.max())}]")
    td = trainstep.build(pipe, facts, captions, window, post if cfg.data.cache else None, sized, cfg.train.batch_size,
                         acc.device, acc.num_processes, cfg.train.seed, repeats if max(repeats) > 1 else None)
    say(f"sizing: {'buckets' if d.buckets else 'square'} at {d.resolution}² px (step {sizing.step}), "
        f"{'random' if d.random_crop else 'centre'} crops x {d.crops_per_image}; " + "; ".join(td.sampler.summary()))
    td.loss_masks = loss_masks

    # 5. LoRA on the UNet (cross-attention by default); everything else stays frozen.
    pipe.vae.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    rank_pattern, alpha_pattern = warmstart.patterns(init, cfg.lora.rank, cfg.lora.alpha or cfg.lora.rank) if init else ({}, {})
    audit = lora.attach(unet, cfg.lora.preset, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.init,
                        rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    say(f"LoRA {cfg.lora.preset}: {audit['num_modules']} modules, {audit['trainable_params']:,} trainable params "
        f"({100 * audit['trainable_fraction']:.3f}%), rank {cfg.lora.rank}, alpha {cfg.lora.alpha or cfg.lora.rank}")
    if init:
        fresh = warmstart.load(unet, init)
        say(f"started from {init.resolved} (lora.init_from, sha256 {init.sha256[:12]}): {len(init.down)} layers with their "
            f"own ranks {sorted(set(init.ranks.values()))} and alphas {sorted(set(init.alphas.values()))}"
            + (f"; {fresh} more at zero with rank {cfg.lora.rank}" if fresh else ""))
    if cfg.train.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet_params = sum(p.numel() for p in unet.parameters())
    compiled, why = _compile_decision(cfg.train.compile, acc.device, cfg.train.max_steps - (saved["step"] if saved else 0),
                                      unet_params)
    if compiled:
        unet.compile_repeated_blocks(fullgraph=False)  # in place: module names and state-dict keys are unchanged
    say(f"compile: {'regional' if compiled else 'off'} ({why})")
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.mixed_precision, model.DTYPES[cfg.model.dtype])
    if not compiled and (line := cpu_attention.apply(unet, acc.device, half)):  # inductor makes its own attention
        say(line)
    if acc.device.type == "cuda":
        say(precision.gpu_note(chosen, precision.cuda_native_bf16(acc.device)))
    elif acc.device.type != "cpu":
        say(precision.describe(chosen))
    elif acc.is_main_process:  # with this CPU's bf16/fp32 matmul ratio, measured once, where it is logged
        from adapt.bench import bf16_speed
        fp16 = bf16_speed(dtype=torch.float16) if chosen.mixed_precision == "fp16" else None
        say(precision.cpu_note(chosen, bf16_speed(), fp16))
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                                  weight_decay=cfg.optim.weight_decay)
    from diffusers.optimization import get_scheduler
    lr_sched = get_scheduler(cfg.optim.schedule, optimizer, num_warmup_steps=cfg.optim.warmup_steps,
                             num_training_steps=cfg.train.max_steps)
    if cfg.optim.warmup_steps >= cfg.train.max_steps:  # a short trial run of a config made for a long one
        say(f"WARNING: optim.warmup_steps ({cfg.optim.warmup_steps}) >= train.max_steps ({cfg.train.max_steps}): the "
            f"learning rate never reaches optim.lr ({cfg.optim.lr:g}); lower optim.warmup_steps for a short run")
    unet, optimizer = acc.prepare(unet, optimizer)
    base_unet = acc.unwrap_model(unet)

    start = 0
    if resume is not None:
        lora_sd, opt_t, state = checkpoint.load(resume)
        from peft import set_peft_model_state_dict
        set_peft_model_state_dict(base_unet, lora_sd)
        opt = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
        checkpoint.restore_optimizer(opt, opt_t, state["optimizer"])
        lr_sched.load_state_dict(state["lr_scheduler"])
        resume_mod.apply_optim_settings(opt, lr_sched, cfg)  # the settings in force now (identical unless resume_allow changed them)
        start = state["step"]
        say(f"resumed from {resume} at step {start}" + (f"; changed: {resumes[-1]['changed']}" if resumes[-1]["changed"] else ""))

    def adapter_facts(steps: int, figures: dict) -> AdapterFacts:
        """The record stored with the adapter: the final one, and each checkpoint's (as of `steps`)."""
        return AdapterFacts(
            base=cfg.model.base, base_revision=cfg.model.revision, base_resolved=facts.resolved, architecture=facts.architecture,
            base_probe=lora.base_probe(base_unet),
            prediction_type=facts.prediction_type, preset=cfg.lora.preset, rank=cfg.lora.rank,
            alpha=cfg.lora.alpha or cfg.lora.rank, strength=cfg.objective.strength, window=cfg.objective.window,
            window_range=[int(window.min()), int(window.max())], scheduler=cfg.objective.scheduler,
            inference_steps=cfg.objective.inference_steps, steps_trained=steps, resolution=cfg.data.resolution,
            seed=cfg.train.seed, dataset=cfg.data.source, dataset_split=cfg.data.split, dataset_fingerprint=fingerprint,
            image_fingerprints=[r.extra["content_hash"] for r in records], num_images=len(records),
            example_prompt=captions[0] if captions else "", latent_stats=stats,
            audit={k: v for k, v in audit.items() if k != "modules"}, figures=figures, optim=config.to_dict(cfg.optim),
            resumes=resumes, adapt_version=adapt.__version__,
            decoder={"folder": decoder.VAE_DIR, **dec_figures} if dec_figures else {},
            init_from=init.to_record() if init else {})

    log_path = out / "logs" / "train_log.jsonl"
    if acc.is_main_process:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        resume_mod.truncate_log(log_path, start)
        if trackers:
            acc.init_trackers("adapt", config={k: str(v) for k, v in facts_mod.flat(config.to_dict(cfg)).items()})
            where = f" in {out / 'adapt'} (tensorboard --logdir {shlex.quote(str(out))})" if "tensorboard" in trackers else ""
            say(f"tracking {'loss, lr and validation grids' if validator else 'loss and lr'} with {', '.join(trackers)}{where}"
                + (" (train.report_to=auto; none turns it off)" if cfg.train.report_to == "auto" else ""))
    if cfg.data.cache and not cfg.validation.source:
        # Nothing reads the VAE or the text encoder(s) again: free them before the training peak (SD1.5: ~830 MB
        # fp32). With validation they stay (img2img encodes its sources and prompts).
        freed = _free_encoders(pipe)
        say(f"freed the VAE and text encoder(s) after caching ({freed / 2**20:.0f} MB of weights; no validation needs them)")

    # 6. Loop. Batch, noise and t come from (seed, step, micro, rank): resume and DDP stay exact.
    world, rank = acc.num_processes, acc.process_index
    hist = torch.zeros(facts.num_train_timesteps, dtype=torch.long)
    dtype = torch.float32 if cfg.model.dtype == "float32" else model.DTYPES[cfg.model.dtype]
    if (sig := stopper.requested(acc)) is not None:
        say(f"{signal.Signals(sig).name} before the first step: nothing trained, nothing to resume")
        return 128 + sig
    say(f"training {cfg.train.max_steps - start} steps, {world} process(es) x batch {cfg.train.batch_size} x accum {cfg.train.grad_accum}")
    unet.train()
    progress = _progress(acc, start, cfg.train.max_steps)
    t_loop = time.time()
    say(f"first step starts {t_loop - T_LAUNCH:.1f}s after launch ({t0_cache_s:.1f}s of it reading or encoding the latent cache)")
    # Host syncs: each step's loss stays on the device until the next sync point (every train.log_every steps, a
    # checkpoint, a validation, the last step), where one gather reads back the pending losses and stop signals of
    # every rank and one more their images. A per-step .item() would stall a GPU's kernel queue every step, and
    # under DDP cost collectives per step. The log still gets one row per step; a non-finite loss still names
    # its step, and no checkpoint is written before the losses since the previous one were read back.
    pending: list[dict] = []

    def sync() -> int | None:
        """Flush the pending steps to the log; returns the stop signal agreed across ranks, or None."""
        n = len(pending)
        own = torch.cat([torch.stack([r["loss"] for r in pending]).float(),
                         torch.tensor([float(stopper.signum or 0)], device=acc.device)])
        vals = acc.gather(own).view(world, n + 1).cpu()  # the one host sync of the losses
        # a row's time is when the host finished queueing its step; the device has caught up only at a sync point
        pending[-1]["time"] = round(time.time(), 3)
        losses, sig = vals[:, :n].mean(dim=0).tolist(), int(vals[:, n].max())
        images = acc.gather(torch.stack([r["images"] for r in pending]).to(acc.device)).view(world, n, -1).transpose(0, 1).tolist()
        for r, loss, imgs in zip(pending, losses, images):
            if not math.isfinite(loss):
                last = [c for c in checkpoint.list_checkpoints(out) if int(c.name.split("-")[1]) < r["step"]]
                raise FloatingPointError(f"loss is {loss} at step {r['step']}; stopping. Last good checkpoint: "
                                         f"{last[-1] if last else 'none'}. Lower optim.lr, or use fp32/bf16 instead of fp16.")
            if acc.is_main_process:  # which images each rank trained on (the last micro-batch): ranks' draws are disjoint
                row = {"step": r["step"], "loss": loss, "lr": r["lr"], "timesteps": r["t"], "bucket": r["bucket"],
                       "images": imgs, "time": r["time"]}
                atomic.append_line(log_path, json.dumps(row))
                if trackers:
                    acc.log({"loss": loss, "lr": r["lr"]}, step=r["step"])
        progress(pending[-1]["step"], losses[-1])
        pending.clear()
        return sig or None

    for step in range(start, cfg.train.max_steps):
        total = torch.zeros((), device=acc.device)
        for micro in range(cfg.train.grad_accum):
            g = trainstep.step_generator(cfg.train.seed, step, micro, rank)
            batch = trainstep.draw(td, cfg.train.batch_size, g, cfg.data.caption_dropout, cfg.data.random_flip,
                                   cfg.objective.noise_offset, pipe=pipe, at=step * cfg.train.grad_accum + micro, rank=rank)
            hist += torch.bincount(batch["t"], minlength=len(hist))
            with acc.autocast():
                loss = trainstep.forward_loss(unet, batch, td, cfg.objective.min_snr_gamma, acc.device, dtype).mean()
            sync_grads = micro == cfg.train.grad_accum - 1
            with (acc.no_sync(unet) if not sync_grads and world > 1 else nullcontext()):
                acc.backward(loss / cfg.train.grad_accum)
            total += loss.detach() / cfg.train.grad_accum
        if cfg.optim.max_grad_norm:
            acc.clip_grad_norm_(params, cfg.optim.max_grad_norm)
        optimizer.step()
        lr_sched.step()
        optimizer.zero_grad(set_to_none=True)
        pending.append({"step": step + 1, "loss": total, "lr": lr_sched.get_last_lr()[0], "t": batch["t"].tolist(),
                        "bucket": f"{batch['z0'].shape[-1] * facts.vae_factor}x{batch['z0'].shape[-2] * facts.vae_factor}",
                        "images": batch["images"], "time": round(time.time(), 3)})
        last = step + 1 == cfg.train.max_steps
        ckpt = cfg.train.checkpointing_steps and (step + 1) % cfg.train.checkpointing_steps == 0
        validate = validator and cfg.validation.steps and (step + 1) % cfg.validation.steps == 0
        # a signal on a single process is seen at once; ranks of a DDP run agree on it at the next sync point
        sig = None
        if last or ckpt or validate or (step + 1) % cfg.train.log_every == 0 or (world == 1 and stopper.signum):
            sig = sync()
        else:
            progress(step + 1, None)
        if last or ckpt:
            _save_checkpoint(acc, cfg, out, step + 1, base_unet, optimizer, lr_sched, run, resumes, adapter_facts, init)
        if validate:
            validator(step + 1)
        if not last and sig is not None:
            if not ckpt:
                _save_checkpoint(acc, cfg, out, step + 1, base_unet, optimizer, lr_sched, run, resumes, adapter_facts, init)
            say(f"interrupted at step {step + 1}; checkpoint-{step + 1} written. Resume with the same command plus "
                f"train.resume_from_checkpoint=latest")
            unet = optimizer = None  # see _finish
            return _finish(acc, 128 + sig)
    train_s = time.time() - t_loop
    # DDP keeps ranks in lockstep; prove it: every rank's LoRA weights must have the same checksum.
    checksum = torch.stack([p.detach().double().sum() for p in params]).sum().reshape(1).to(acc.device)
    sums = acc.gather(checksum).tolist()
    if len(set(sums)) != 1:
        raise RuntimeError(f"LoRA weights differ across ranks after training: checksums {sums}")

    # 7. Outputs: adapter (diffusers format + adapt facts), model card, final validation grid.
    if validator and not (cfg.validation.steps and cfg.train.max_steps % cfg.validation.steps == 0):
        validator(cfg.train.max_steps)  # (not twice when the last periodic validation fell on the last step)
    if acc.is_main_process:
        steps_run = max(cfg.train.max_steps - start, 0)
        figures = {"train_seconds": round(train_s, 1), "steps_per_s": round(steps_run / max(train_s, 1e-9), 3),
                   "samples_per_s": round(steps_run * cfg.train.batch_size * cfg.train.grad_accum * world / max(train_s, 1e-9), 2),
                   "total_seconds": round(time.time() - t_start, 1)}
        if acc.device.type == "cuda":
            figures["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(acc.device) / 2**20)
        fx = adapter_facts(cfg.train.max_steps, figures)
        try:
            path = lora.save(out, base_unet, fx, te_tensors=init.te_tensors if init else None, te_meta=init.te_meta if init else None)
        except atomic.WriteError as e:
            raise atomic.WriteError(f"{e}. Training is not lost: checkpoint-{cfg.train.max_steps} is intact; free space and "
                                    "rerun with train.resume_from_checkpoint=latest to write the adapter") from e
        hist_all = hist.nonzero().flatten()
        drawn = f"timesteps drawn in [{int(hist_all.min())}, {int(hist_all.max())}]" if len(hist_all) else "no steps trained"
        atomic.write_text(out / "logs" / "data_report.json", json.dumps(report.to_dict(), indent=1))
        write_model_card(out, fx, cfg)
        if world > 1:
            say(f"all {world} ranks hold identical LoRA weights (checksum {sums[0]:.10g})")
        say(f"adapter: {path} ({path.stat().st_size / 1e3:.1f} kB); {drawn}; "
            f"{figures['steps_per_s']} steps/s, {figures['samples_per_s']} samples/s")
    unet = optimizer = None  # see _finish
    return _finish(acc, 0)


def _finish(acc, code: int) -> int:
    """Every rank ends here together. The caller drops its DDP wrapper first and free_memory() frees it while the
    process group still exists: torn down after end_training() destroyed the group, gloo hung one rank at exit
    (about one DDP run in five)."""
    acc.wait_for_everyone()
    acc.free_memory()
    acc.end_training()
    return code


def _preflight(cfg, out: Path, say, main: bool) -> tuple[Path | None, dict | None]:
    """(checkpoint to resume from, its state.json) or (None, None) for a new run, after every check that needs no
    model loaded."""
    resume = checkpoint.resolve(out, cfg.train.resume_from_checkpoint, log=say)
    saved = json.loads((resume / "state.json").read_text()) if resume else None
    if resume is None:
        finished = (out / lora.WEIGHTS_NAME).exists() or checkpoint.list_checkpoints(out)
        if finished and not cfg.train.overwrite:
            raise config.ConfigError(f"out_dir {out} already holds a run ({lora.WEIGHTS_NAME} or checkpoints); "
                                     "pass train.overwrite=true to replace it or train.resume_from_checkpoint=latest to continue")
        if finished and main:  # overwrite: the old run's checkpoints must not mix with this one's
            for p in checkpoint.list_checkpoints(out):
                shutil.rmtree(p)
        if main and not cfg.decoder.steps and (out / decoder.VAE_DIR).is_dir():  # a tuned VAE from an earlier run
            shutil.rmtree(out / decoder.VAE_DIR)                                # must not ship with this adapter
    else:
        resume_mod.check_config(cfg, saved, resume)
    if cfg.data.cache:
        _cache_root(cfg)
    return resume, saved


def _sizing(cfg, facts) -> buckets.Sizing:
    """The data section's sizing settings, with the bucket step the base needs (its VAE factor x UNet downsampling)."""
    d = cfg.data
    step = d.bucket_step or facts.size_multiple
    if d.bucket_step and d.bucket_step % facts.size_multiple:
        raise config.ConfigError(f"data.bucket_step={d.bucket_step} is not a multiple of {facts.size_multiple} (this base's "
                                 f"VAE factor {facts.vae_factor} x UNet downsampling): its latents would need padding")
    try:
        return buckets.Sizing(d.resolution, step, d.buckets, d.max_aspect, d.random_crop, d.crops_per_image,
                              cfg.train.seed, d.min_size)
    except ValueError as e:
        raise config.ConfigError(str(e)) from None


def _cache_threads(cfg, acc) -> int:
    """Threads for encoding the cache: data.cache_threads, else this machine's cores shared by its local ranks."""
    import os
    if cfg.data.cache_threads:
        return cfg.data.cache_threads
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))  # ranks on this machine (set by accelerate launch / torchrun)
    return max(1, (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1) // local)


def _compile_decision(mode: str, device: torch.device, steps_left: int, unet_params: int) -> tuple[bool, str]:
    """(compile the repeated blocks?, why) for train.compile.

    Measured (adapt bench, recipes/gpu_check.py): regional compilation ran 0.78x steady on an H200 (SD 1.5, 512 px,
    bf16); on one CPU thread 1.08x, 1.22x, 1.04x and 0.92x on SD 1.5 at 256 px in four alternated pairs (about
    100 s of compiling, and inductor needs a C++ compiler on CPU) and 1.01x on the embedded base. Nothing there is
    a reliable gain, so auto compiles nothing and says why; train.compile=regional is there to try."""
    if mode != "auto":
        return mode == "regional", f"train.compile={mode}"
    if device.type == "cuda":
        return False, (f"auto: cuda, {steps_left} steps left; regional compile measured 0.78x steady on an H200 (SD 1.5, "
                       "512 px, bf16, torch 2.11); train.compile=regional forces it")
    return False, (f"auto: {device.type}, UNet {unet_params / 1e6:.0f}M parameters; regional compile measured 0.92-1.22x "
                   "on SD 1.5 and 1.01x on the embedded base on CPU; train.compile=regional forces it")


def _precision(cfg, out: Path) -> tuple:
    """(cfg with model.dtype and train.mixed_precision concrete, the Precision chosen): auto resolved for the device
    accelerate will use (adapt/precision.py), before the Accelerator fixes its autocast. A resume whose precision is
    auto keeps what its checkpoint trained in."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env
    trained_in = None
    if "auto" in (cfg.train.mixed_precision, cfg.model.dtype) and cfg.train.resume_from_checkpoint:
        try:
            found = checkpoint.resolve(out, cfg.train.resume_from_checkpoint, log=lambda *_: None)
            run = json.loads((found / "state.json").read_text())["run"]["config"]
            trained_in = (run["train.mixed_precision"], run["model.dtype"])
        except (checkpoint.CheckpointError, OSError, KeyError, TypeError, ValueError):
            pass  # the preflight names what is wrong with the checkpoint
    # The state the Accelerator will share, made as AcceleratorState makes it (without cpu=, `ACCELERATE_USE_CPU=1
    # accelerate launch --multi_gpu` would start one process group per rank)
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    chosen = precision.for_device(cfg.train.mixed_precision, cfg.model.dtype, state.device, trained_in)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dtype=chosen.dtype),
                              train=dataclasses.replace(cfg.train, mixed_precision=chosen.mixed_precision))
    return cfg, chosen


def _decoder_phase(cfg, pipe, sized, vae_fp: str, data_fp: str, out: Path, stopper, say) -> dict:
    """Step 3b: fine-tune pipe.vae's decoder in place and save it to out/vae/, or load the one saved there with the
    same key. Returns its figures ({} when a signal stopped it)."""
    dc = cfg.decoder
    key = decoder.key_of(vae_fp, data_fp, dc.steps, dc.lr, dc.batch_size, cfg.train.seed)
    dtype = pipe.vae.dtype
    old_key, figures = decoder.saved(out)
    if old_key == key:
        from safetensors.torch import load_file
        pipe.vae.load_state_dict(load_file(out / decoder.VAE_DIR / decoder.WEIGHTS))
        say(f"decoder: reusing {out / decoder.VAE_DIR} (same base VAE, data and decoder settings)")
        return figures
    say(f"decoder: fine-tuning the VAE decoder on {len(sized.pixels)} images, {dc.steps} steps (encoder frozen)")
    figures = decoder.finetune(pipe.vae, sized.pixels, dc.steps, dc.lr, dc.batch_size, cfg.train.seed,
                               stop=lambda: stopper.signum, gradient_checkpointing=cfg.train.gradient_checkpointing, log=say)
    if figures is None:
        return {}
    try:
        folder = decoder.save(pipe.vae, out, key, figures, base_dtype=dtype)
    except atomic.WriteError as e:
        raise atomic.WriteError(f"{e}. The tuned decoder ({figures['seconds']} s of training) is lost and no LoRA step ran: "
                                "free space and rerun the same command") from e
    pipe.vae.to(dtype)
    say(f"decoder: pixel MSE {figures['loss_first']:.5f} -> {figures['loss_last']:.5f} in {figures['seconds']}s; saved {folder}")
    return figures


def _free_encoders(pipe) -> int:
    """Drop the pipeline's VAE and text encoder(s); returns the bytes of weights released."""
    import gc
    freed = 0
    for name in ("vae", "text_encoder", "text_encoder_2"):
        m = getattr(pipe, name, None)
        if m is not None:
            freed += sum(p.numel() * p.element_size() for p in m.parameters())
            setattr(pipe, name, None)
    gc.collect()
    return freed


def _cache_root(cfg) -> Path:
    """data.cache_dir or $ADAPT_CACHE, checked to be a writable folder."""
    return data.usable_cache_dir(Path(cfg.data.cache_dir), "data.cache_dir") if cfg.data.cache_dir else data.default_cache_dir()


def _save_checkpoint(acc, cfg, out, step, base_unet, optimizer, lr_sched, run, resumes, adapter_facts, init):
    if acc.is_main_process:
        te_tensors, te_meta = (init.te_tensors, init.te_meta) if init else (None, None)
        from peft.utils import get_peft_model_state_dict
        opt = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
        checkpoint.save(out, step, get_peft_model_state_dict(base_unet), opt,
                        {"lr_scheduler": lr_sched.state_dict(), "run": {**run, "resumes": resumes}},
                        cfg.train.checkpoints_total_limit,
                        adapter=lambda folder: lora.save(folder, base_unet, adapter_facts(step, {}), te_tensors=te_tensors,
                                                         te_meta=te_meta))
    acc.wait_for_everyone()


def _together(acc, fn):
    """Run fn on every process; if it fails anywhere, every process stops (no rank left in a collective).
    The failing process re-raises its own error; the others exit quietly."""
    err = None
    try:
        result = fn()
    except Exception as e:
        err, result = e, None
    if acc.num_processes > 1:
        bad = acc.reduce(torch.tensor([1 if err else 0], device=acc.device), "max").item()
        if bad and err is None:
            raise SystemExit(2)
    if err is not None:
        raise err
    return result


def _printer(acc, out: Path):
    def say(msg: str):
        if acc.is_main_process:
            line = f"[adapt {time.strftime('%H:%M:%S')}] {msg}"
            print(line, flush=True)
            atomic.append_line(out / "train.log", line)
    return say


def _progress(acc, start: int, total: int):
    from tqdm.auto import tqdm
    bar = tqdm(total=total, initial=start, disable=not acc.is_main_process, desc="train", mininterval=2.0)
    def update(step: int, loss: float | None):
        bar.update(step - bar.n)
        if loss is not None:
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        if step == total:
            bar.close()
    return update


def _trackers(report_to: str) -> list[str] | None:
    """accelerate's log_with for train.report_to. A tracker asked for by name that is not installed is an error:
    accelerate would drop it with a warning, and the run's curves would be missing when it ends."""
    import accelerate.utils as au
    available = lambda name: getattr(au, f"is_{name}_available", lambda: False)()  # noqa: E731
    if report_to == "none" or (report_to == "auto" and not available("tensorboard")):
        return None
    if report_to in ("auto", "tensorboard"):
        names = ["tensorboard"]
    elif report_to == "all":
        names = [n for n in ("tensorboard", "wandb", "trackio", "mlflow", "comet_ml", "aim", "clearml", "dvclive",
                             "swanlab") if available(n)]
    else:
        names = [report_to]
    missing = [n for n in names if not available(n)]
    if missing:
        raise config.ConfigError(f"train.report_to={report_to}: {missing[0]} is not installed (pip install {missing[0]}), "
                                 "or choose none")
    return names or None


def _r(xs):
    return [round(x, 3) for x in xs]


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (config.ConfigError, data.DataError, model.ModelError, lora.AdapterError, cache.LatentError,
            checkpoint.CheckpointError, atomic.WriteError, runguard.LockError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("aborted (second interrupt) without a new checkpoint; the last complete one is still there: "
              "resume with train.resume_from_checkpoint=latest", file=sys.stderr)
        sys.exit(130)
