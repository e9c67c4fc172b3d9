"""The `adapt sample` command: txt2img, or img2img on --image files, with adapters, masks and a report's setting.

    adapt sample --base tiny-faces --adapter runs/demo/adapter --image face.png [--strength 0.6] [--mask auto]
    adapt sample --adapter runs/demo/adapter --recommended runs/demo/eval --image face.png

Flags left unset are filled from the --recommended report, then the adapter's record, then defaults; a flag that
would do nothing is refused. Each image is written as its batch finishes, with the record of how it was made
(adapt.provenance), so a Ctrl-C keeps the finished ones.
"""

from __future__ import annotations

import dataclasses
import shlex
import sys
import time
from contextlib import nullcontext
from pathlib import Path

from adapt.cli import CliError


def add_parser(sub):
    p = sub.add_parser("sample", help="txt2img, or img2img with --image, with optional adapters")
    p.add_argument("--base", default=None, help="embedded name, diffusers folder, hub id or .safetensors file "
                   "(default: the --recommended report's base, else tiny-faces)")
    p.add_argument("--adapter", action="append", default=[], help="adapter folder, .safetensors file or Hugging Face hub id (org/name[@revision]); repeatable")
    p.add_argument("--scale", action="append", type=float, default=[], help="scale per adapter (default 1.0)")
    p.add_argument("--prompt", default=None, help="prompt; '{caption}' expands to each image's caption from beside it "
                   "(its metadata.jsonl/.csv/.parquet row, or .txt/.caption), e.g. '{caption} wearing sunglasses' (default: the --recommended report's, else '')")
    p.add_argument("--recommended", default=None, metavar="REPORT",
                   help="img2img at the setting an `adapt eval` report (its folder or report.json) recommends for this "
                   "--adapter: strength, scale, masked or plain with the evaluation's mask settings, steps, scheduler, "
                   "guidance and prompt; flags given explicitly win")
    p.add_argument("--image", nargs="+", action="extend", default=[], help="source image(s) for img2img: files, "
                   "folders (every image in one, by name) or quoted globs ('photos/*.jpg')")
    p.add_argument("--strength", type=float, default=None, help="img2img strength; default: the adapter's trained strength")
    p.add_argument("--steps", type=int, default=None, help="inference steps; default: the adapter's, else 50")
    p.add_argument("--scheduler", default=None, help="ddim|ddpm|euler|pndm|dpm; default: the adapter's, else ddim")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default 7.5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-images", type=int, default=None, help="txt2img images (default 1)")
    p.add_argument("--resolution", type=int, default=None, help="pixel budget: img2img runs each input at its own aspect "
                   "with about resolution² pixels (sides multiples of the VAE factor); default: the adapter's training resolution, "
                   "else the base's native one. txt2img: resolution x resolution (default: the base's native size)")
    p.add_argument("--no-fuse", dest="fuse", action="store_false",
                   help="keep adapters unfused (default: fused at the given scale, which is faster and equal within ~1e-6)")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", default="auto", help="auto (float16 on a GPU, float32 on CPU), float32, float16, bfloat16")
    p.add_argument("--out", default="runs/samples", help="output folder")
    p.add_argument("--grid", default=None, help="img2img: also write a grid PNG of input | base | adapter (| masked) rows")
    p.add_argument("--mask", nargs="+", default=None, help="img2img: 'auto' = edit only where the adapter changes the image "
                   "(adapter-guided mask, then latent blending and paste-back: adapt/masking.py), or one mask image per "
                   "--image (white = edit)")
    # mask settings default to None here and to masking.MaskSettings' values (or the --recommended report's) later
    from adapt.config import MaskSettings
    d = MaskSettings()
    p.add_argument("--mask-threshold", type=float, default=None, help=f"auto mask: threshold on the normalised difference "
                   f"(default {d.threshold})")
    p.add_argument("--mask-timestep", type=int, default=None, help=f"auto mask: timestep of the comparison (default {d.timestep})")
    p.add_argument("--mask-draws", type=int, default=None, help=f"auto mask: noise draws averaged (default {d.draws})")
    p.add_argument("--mask-close", type=int, default=None, help="auto mask: morphological closing radius in latent pixels "
                   f"(fills gaps between parts of the edit, such as the bridge between two lenses), before the dilation "
                   f"(default {d.close})")
    p.add_argument("--mask-dilate", type=int, default=None, help=f"auto mask: dilation in latent pixels (default {d.dilate})")
    p.add_argument("--mask-blur", type=float, default=None, help=f"paste-back feathering, Gaussian sigma in pixels "
                   f"(default {d.blur})")
    p.add_argument("--no-paste", dest="paste", action="store_false", default=None, help="masked: keep the decoded pixels "
                   "outside the mask instead of pasting the input back")
    p.add_argument("--base-decoder", action="store_true", help="decode with the base's VAE even when the adapter ships "
                   "a decoder tuned on its domain (vae/ beside its weights)")
    p.add_argument("--overwrite", action="store_true", help="replace images already in --out (default: refuse)")
    p.set_defaults(func=cmd_sample)


def cmd_sample(a) -> int:
    from adapt import atomic, decoder, lora, masking, model, provenance, sample
    a.adapter = [lora.locate(ad) for ad in a.adapter or []]  # a hub id: its snapshot folder
    a.image = _expand_images(a.image)
    _apply_recommended(a)
    _check_sample_args(a)
    stored = [lora.facts(ad) for ad in a.adapter]  # reads (and checks) every adapter before the base loads
    first = stored[0] if stored else None
    strength = a.strength if a.strength is not None else (first.strength if first is not None else None)
    if a.image and strength is None:
        raise CliError("--strength is required (no adapter with a stored strength was given)")
    steps = a.steps or (first.inference_steps if first is not None else None) or 50
    if a.image and int(steps * strength) < 1:
        raise CliError(f"--strength {strength} x {steps} steps visits no timestep (img2img runs int(steps x strength) "
                       f"steps); raise --steps or --strength")
    sched = a.scheduler or (first.scheduler if first is not None else None) or "ddim"
    if sched not in sample.SCHEDULERS:
        raise CliError(f"--scheduler {sched!r}: choose from {sorted(sample.SCHEDULERS)}")
    from adapt.imagefolder import captions_beside
    captions = captions_beside([Path(p) for p in a.image])  # as training would caption each (None: none beside it)
    prompts = [_prompt(a.prompt, c or "") for c in captions] if a.image else [_prompt(a.prompt, "")]
    if a.image and "{caption}" in a.prompt:
        bare = [p for p, c in zip(a.image, captions) if c is None]
        if bare:
            print(f"note: --prompt {a.prompt!r} takes each image's caption, and {len(bare)} of {len(a.image)} have none "
                  f"(no metadata row, .txt or .caption beside them), so it reads as empty for: "
                  f"{', '.join(map(str, bare[:5]))}{' ...' if len(bare) > 5 else ''}")
    out = atomic.writable_dir(a.out, "--out")
    kind, n = ("img2img", len(a.image)) if a.image else ("txt2img", a.num_images or 1)
    clash = [p for p in [out / f"{kind}_{i:03d}.png" for i in range(n)] + ([Path(a.grid)] if a.grid else []) if p.exists()]
    if clash and not a.overwrite:
        raise CliError(f"{clash[0]} exists ({len(clash)} output(s) would be replaced); pass --overwrite or another --out")
    device = model.pick_device(a.device)
    pipe, facts = model.load_base(a.base, torch_dtype=model.pick_dtype(a.dtype, device))
    pipe.to(device)  # noise stays on CPU generators, so a seed gives the same start on every device
    names = [lora.load_into(pipe, ad, 1.0, adapter_name=f"a{i}", base_resolved=facts.resolved) for i, ad in enumerate(a.adapter)]
    tuned = _tuned_decoder(a, pipe)
    scales = a.scale or [1.0] * len(names)
    with_adapters = lambda: lora.applied(pipe, names, scales, fuse=a.fuse) if names else nullcontext()
    common = _record_common(a, pipe, facts, names, scales, steps, sched, tuned, device)
    written: dict[int, Path] = {}

    def write(make_record):
        """on_batch for sample.img2img/txt2img: each image is written (with its record) as soon as its batch is done,
        so a Ctrl-C keeps what was finished."""
        def on_batch(idx, done):
            for i, img in zip(idx, done):
                written[i] = atomic.write_image(img, out / f"{kind}_{i:03d}.png", provenance.png_info(make_record(i, img)))
        return on_batch

    t0 = time.time()
    try:
        if a.image:
            if a.strength is None:
                print(f"using strength {strength} stored in adapter {a.adapter[0]} (trained for it); pass --strength to override")
            budget = a.resolution or (first.resolution if first is not None and first.resolution else facts.sample_size)
            images = [sample.fit_budget(p, budget, facts.vae_factor) for p in a.image]
            mask, paste_blur, mask_settings = _edit_mask(a, pipe, images, prompts, names)
            if mask is not None:
                sample.save_images([masking.mask_image(m, img.size) for m, img in zip(mask, images)], out, "mask")
            record = lambda i, img: provenance.SampleRecord(
                kind="img2img", prompt=prompts[i], seed=a.seed + i, width=img.size[0], height=img.size[1], resolution=budget,
                strength=strength, source=_where(a.image[i]), source_sha256=provenance.file_sha256(a.image[i]),
                mask=None if mask is None else provenance.MaskUse(
                    source="auto" if a.mask == ["auto"] else _where(a.mask[i]), area=float(mask[i].mean()),
                    settings={**dataclasses.asdict(mask_settings), "seed": a.seed + i}), **common)
            with with_adapters(), decoder.swapped(pipe, tuned):
                imgs = sample.img2img(pipe, images, prompts, strength, steps, a.guidance, a.seed, sched, mask=mask,
                                      paste_blur=paste_blur, on_batch=write(record))
            if a.grid:
                with lora.applied(pipe, names, [0.0] * len(names)):
                    base = sample.img2img(pipe, images, prompts, strength, steps, a.guidance, a.seed, sched)
                cols = [images, base]
                if mask is not None:
                    with with_adapters(), decoder.swapped(pipe, tuned):
                        cols.append(sample.img2img(pipe, images, prompts, strength, steps, a.guidance, a.seed, sched))
                atomic.write_image(sample.grid([list(r) for r in zip(*cols, imgs)]), a.grid)
                print(f"wrote grid {a.grid} (rows: input | base | adapter" + (" | adapter masked" if mask is not None else "")
                      + f" at strength {strength})")
        else:
            record = lambda i, img: provenance.SampleRecord(kind="txt2img", prompt=prompts[0], seed=a.seed + i, width=img.size[0],
                                                            height=img.size[1], resolution=img.size[0], **common)
            with with_adapters(), decoder.swapped(pipe, tuned):
                sample.txt2img(pipe, prompts[0], n, steps, a.guidance, a.seed, sched, size=a.resolution, on_batch=write(record))
    except KeyboardInterrupt:
        done = [written[i].name for i in sorted(written)]
        print(f"interrupted: {len(done)} of {n} image(s) were finished and are in {out}" + (f" ({', '.join(done)})" if done
              else "") + "; each records its seed and settings (`adapt inspect IMAGE.png` gives the command for one)",
              file=sys.stderr)
        return 130
    paths = [written[i] for i in sorted(written)]
    dt = time.time() - t0
    print(f"wrote {len(paths)} image(s) to {out} ({dt / len(paths):.2f} s/image): {', '.join(p.name for p in paths)}")
    print(f"each records its source, seed and settings (PNG text: WebUI 'parameters' and adapt's record); "
          f"`adapt inspect {shlex.quote(str(paths[0]))}` prints them and the command that makes it again")
    return 0


def _record_common(a, pipe, facts, names, scales, steps, sched, tuned, device) -> dict:
    """The provenance fields every output of one `adapt sample` call shares."""
    import adapt
    from adapt import decoder, lora, provenance
    adapters = [provenance.AdapterUse(path=_where(ad), sha256=lora.weights_sha256(ad), scale=float(s),
                                      short_hash=provenance.addnet_hash(lora.weights_path(ad)))
                for ad, s in zip(a.adapter, scales)]
    dec = next((str(f) for ad in a.adapter if (f := decoder.find(ad)) is not None), None) if tuned is not None else None
    return dict(steps=steps, scheduler=sched, guidance=float(a.guidance), base=_where(a.base), base_resolved=str(facts.resolved),
                adapters=adapters, decoder=dec, fused=bool(a.fuse), device=str(device),
                dtype=str(pipe.unet.dtype).removeprefix("torch."), adapt_version=adapt.__version__)


def _where(path: str) -> str:
    """An existing path made absolute (the record then works from any folder), a hub cache snapshot as the hub id
    and commit it holds (then it works on any machine); a name or hub id as given."""
    from adapt import lora
    return lora.hub_id(path) or (str(Path(path).resolve()) if Path(path).exists() else str(path))


def _tuned_decoder(a, pipe):
    """The VAE decoder tuned on the adapter's domain (adapt.decoder) that its folder ships, or None."""
    from adapt import decoder
    if a.base_decoder:
        return None
    try:
        found = [(ad, v) for ad in a.adapter if (v := decoder.load(ad, pipe.vae)) is not None]
    except decoder.DecoderError as e:
        raise CliError(f"{e} (--base-decoder samples without it)") from None
    if len(found) > 1:
        raise CliError(f"adapters {', '.join(str(ad) for ad, _ in found)} each ship a tuned VAE decoder (vae/) and an image "
                       "has one decoder: pass --base-decoder, or sample with one of them")
    if not found:
        return None
    print(f"decoder: {decoder.find(found[0][0])} (tuned on the adapter's domain; --base-decoder keeps the base's)")
    return found[0][1]


MASK_FLAGS = {"mask_timestep": "timestep", "mask_draws": "draws", "mask_threshold": "threshold", "mask_close": "close",
              "mask_dilate": "dilate", "mask_blur": "blur", "paste": "paste"}  # `adapt sample` flag -> MaskSettings field


def _apply_recommended(a) -> None:
    """Fill every flag the user left unset: from the --recommended report when one is given, then the defaults.
    The report must have evaluated this very adapter (its weights' sha256), or sampling would not match it."""
    from adapt import lora, report
    rec = None
    # before defaults fill them: which mask settings the user typed (checked against --mask by _check_sample_args)
    a.mask_flags_given = ["--no-paste" if f == "paste" else "--" + f.replace("_", "-") for f in MASK_FLAGS if getattr(a, f) is not None]
    if a.recommended:
        try:
            rec = report.load_recommendation(a.recommended)
        except report.RecommendationError as e:
            raise CliError(f"--recommended {e}") from None
        evaluated = rec.adapter
        if not a.adapter and rec.adapter:  # the adapter the report evaluated, when it is still where it was
            try:
                evaluated = lora.locate(rec.adapter)  # a hub adapter is recorded as org/name@commit
                lora.weights_path(evaluated)
            except lora.AdapterError as e:
                raise CliError(f"--recommended {rec.report}: it evaluated adapter {rec.adapter}, which is not found from "
                               f"here ({e}); give --adapter") from None
            a.adapter = [evaluated]
            print(f"--adapter {rec.adapter}: the adapter the report evaluated")
        if len(a.adapter) != 1 or not a.image:
            raise CliError(f"--recommended: give the one --adapter the report evaluated ({rec.adapter}) and --image(s); "
                           f"got {len(a.adapter)} adapter(s) and {len(a.image)} image(s)")
        given = lora.weights_path(a.adapter[0])
        if rec.adapter_sha256 is not None:
            sha = lora.weights_sha256(given)
            if sha != rec.adapter_sha256 and a.adapter[0] in (str(rec.adapter), evaluated):
                raise CliError(f"--recommended {rec.report}: adapter {rec.adapter} has changed since the report evaluated "
                               "it (its weights' sha256 differs); evaluate it again with `adapt eval`")
            if sha != rec.adapter_sha256:
                raise CliError(f"--recommended {rec.report}: the report evaluated adapter {rec.adapter} (weights sha256 "
                               f"{rec.adapter_sha256[:12]}), not --adapter {a.adapter[0]} (sha256 {sha[:12]}); evaluate "
                               "this adapter with `adapt eval`, or drop --recommended")
        else:  # a report written before weight hashes: the paths must match (the evaluated one may be gone)
            try:
                same = given.resolve() == lora.weights_path(rec.adapter).resolve()
            except lora.AdapterError:
                same = False
            if not same:
                raise CliError(f"--recommended {rec.report}: the report evaluated adapter {rec.adapter}, not --adapter "
                               f"{a.adapter[0]} (the report predates weight hashes, so the paths must match)")
        if a.base is not None and a.base != rec.base:
            print(f"note: the report evaluated base {rec.base}; sampling with --base {a.base}")
        from adapt import decoder
        if rec.decoder is None and not a.base_decoder and decoder.find(a.adapter[0]) is not None:
            a.base_decoder = True  # evaluated with adapter_decoder=false: sample as it was measured
            print(f"note: the report evaluated without the adapter's tuned decoder; sampling with the base's (as --base-decoder)")
        if rec.decoder and not a.base_decoder and decoder.find(a.adapter[0]) is None:
            raise CliError(f"--recommended {rec.report}: the evaluation decoded the adapter's outputs with its tuned VAE "
                           f"{rec.decoder}, which --adapter {a.adapter[0]} no longer ships (vae/ beside its weights); "
                           "restore it, or pass --base-decoder to sample without it")
        explicit = [f"--{k.replace('_', '-')}" for k in ("strength", "scale", "steps", "scheduler", "guidance", "prompt", "mask")
                    if getattr(a, k) not in (None, [])]
        a.base = a.base if a.base is not None else rec.base
        a.strength = a.strength if a.strength is not None else rec.strength
        a.scale = a.scale or [rec.scale]
        a.steps = a.steps or rec.steps
        a.scheduler = a.scheduler or rec.scheduler
        a.guidance = a.guidance if a.guidance is not None else rec.guidance
        a.prompt = a.prompt if a.prompt is not None else rec.prompt
        if a.mask is None and rec.mode == "masked":
            a.mask = ["auto"]
        print(f"using the setting {rec.report} recommends: strength {rec.strength}, scale {rec.scale}, {rec.mode} "
              f"({rec.figures})" + (f"; given explicitly: {' '.join(explicit)}" if explicit else ""))
    a.base = a.base if a.base is not None else "tiny-faces"
    a.prompt = a.prompt if a.prompt is not None else ""
    a.guidance = a.guidance if a.guidance is not None else 7.5
    from adapt.config import MaskSettings
    defaults = rec.mask if rec is not None and rec.mask is not None else MaskSettings()
    for flag, field in MASK_FLAGS.items():
        if getattr(a, flag) is None:
            setattr(a, flag, getattr(defaults, field))


def _edit_mask(a, pipe, images, prompts, names):
    """(latent masks (N, 1, h, w) or None, paste-back blur or None, MaskSettings or None) for `adapt sample --mask`."""
    from adapt import masking
    from adapt.data import open_image
    if not a.mask:
        return None, None, None
    try:
        settings = masking.MaskSettings(timestep=a.mask_timestep, draws=a.mask_draws, threshold=a.mask_threshold,
                                        close=a.mask_close, dilate=a.mask_dilate, blur=a.mask_blur, paste=a.paste, seed=a.seed)
    except ValueError as e:
        raise CliError(f"--mask-*: {e}") from None
    if a.mask == ["auto"]:
        if not names:
            raise CliError("--mask auto: needs --adapter (the mask is where the adapter changes the image)")
        mask = masking.auto_mask(pipe, images, prompts, names, settings)
        how = (f"adapter-guided (t={settings.timestep}, {settings.draws} draws, threshold {settings.threshold}, "
               f"close {settings.close}, dilate {settings.dilate})")
    else:
        mask = masking.mask_from_images([open_image(p) for p in a.mask], [img.size[::-1] for img in images],
                                        pipe.vae_scale_factor)
        how = "from mask images"
    area = [float(m.mean()) for m in mask]
    print(f"edit masks {how}: area {', '.join(f'{v:.0%}' for v in area)}"
          + ("; the input is pasted back outside them" if settings.paste else ""))
    return mask, (settings.blur if settings.paste else None), settings


def _expand_images(given: list[str]) -> list[str]:
    """--image values as files: a folder gives the images in it (sorted by name; not its subfolders, hidden files or
    masks/), a pattern the shell left unexpanded (quoted, or on Windows) the files it matches; a file stays itself."""
    import glob
    from adapt import imagefolder
    out = []
    for g in given:
        p = Path(g)
        if p.is_dir():
            found = sorted(str(q) for q in p.iterdir() if q.is_file() and imagefolder.is_image(q)
                           and not imagefolder.hidden(Path(q.name)))
            if not found:
                raise CliError(f"--image {g}: a folder with no images in it (subfolders are not read)")
            print(f"--image {g}: {len(found)} image(s) in the folder")
            out += found
        elif not p.exists() and glob.has_magic(g):
            found = sorted(f for f in glob.glob(g) if Path(f).is_file())
            if not found:
                raise CliError(f"--image {g}: no file matches the pattern")
            out += found
        else:
            out.append(g)
    return out


def _check_sample_args(a) -> None:
    """Every flag of `adapt sample` checked before anything loads."""
    from adapt.data import DataError, open_image
    if a.scale and len(a.scale) != len(a.adapter):
        raise CliError(f"{len(a.scale)} --scale values for {len(a.adapter)} adapters; give one per adapter")
    if a.steps is not None and a.steps < 1:
        raise CliError(f"--steps must be >= 1, got {a.steps}")
    if a.strength is not None and not 0 < a.strength <= 1:
        raise CliError(f"--strength must be in (0, 1], got {a.strength}")
    if a.num_images is not None and a.num_images < 1:
        raise CliError(f"--num-images must be >= 1, got {a.num_images}")
    # A flag that would do nothing is refused: the user meant something by it.
    if not a.image:
        for flag, v in (("--strength", a.strength), ("--grid", a.grid)):
            if v is not None:
                raise CliError(f"{flag}: img2img only (give --image); without it adapt sample draws txt2img")
    elif a.num_images is not None:
        raise CliError("--num-images: txt2img only; img2img writes one image per --image (and --seed N starts image i at N + i)")
    if a.grid and not a.adapter:
        raise CliError("--grid: its rows compare the base with the adapter on each input; give --adapter")
    given = getattr(a, "mask_flags_given", [])
    if given and not a.mask:
        raise CliError(f"{' '.join(given)}: masked sampling settings, but no --mask (auto, or one mask image per --image) "
                       "was given, so img2img would redraw the whole image")
    auto_only = [g for g in given if g not in ("--mask-blur", "--no-paste")]
    if auto_only and a.mask and a.mask != ["auto"]:
        raise CliError(f"{' '.join(auto_only)}: settings of the adapter-guided mask (--mask auto); with mask images "
                       "they would do nothing")
    if a.resolution is not None and (a.resolution < 8 or a.resolution % 8):
        raise CliError(f"--resolution must be a positive multiple of 8, got {a.resolution}")
    for s in a.scale:
        if s < 0:
            raise CliError(f"--scale must be >= 0, got {s}")
    if a.mask and a.mask != ["auto"]:
        if "auto" in a.mask or len(a.mask) != len(a.image):
            raise CliError(f"--mask: 'auto' or one mask image per --image ({len(a.image)}), got {len(a.mask)} value(s)")
        for p in a.mask:
            if not Path(p).is_file():
                raise CliError(f"--mask {p}: no such file")
            try:
                open_image(p)
            except (DataError, OSError, ValueError) as e:
                raise CliError(f"--mask {p}: {e}") from e
    if a.mask and not a.image:
        raise CliError("--mask: img2img only (give --image)")
    for p in a.image:
        if not Path(p).exists():
            raise CliError(f"--image {p}: no such file")
        try:
            open_image(p)
        except (DataError, OSError, ValueError) as e:
            raise CliError(f"--image {p}: {e}") from e


def _prompt(template: str, caption: str) -> str:
    """The prompt with '{caption}' expanded; any other brace is refused with the fix named."""
    try:
        return template.format(caption=caption)
    except (KeyError, IndexError, ValueError) as e:
        raise CliError(f"--prompt {template!r}: only '{{caption}}' may appear in braces ({type(e).__name__}: {e}); "
                       "write literal braces as '{{' and '}}'") from e
