"""The `adapt` command: eval, inspect, data build, and the commands other modules register (sample: adapt.cli_sample;
export: adapt.export; bench: adapt.bench).

    adapt sample --base tiny-faces --adapter runs/demo/adapter --image face.png [--strength 0.6]
    adapt inspect runs/demo/adapter
    adapt data build synth_sunglasses --out data/sg --n 32 --split train
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from pathlib import Path


class CliError(ValueError):
    """A command-line value is wrong; the message names the flag and the value."""


def _add_eval(sub):
    from adapt import config
    p = sub.add_parser("eval", help="strength x scale x mode sweep of an adapter against the base, with a report",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=config.keys_help(config.EvalConfig))
    p.add_argument("--config", default=None, help="YAML with EvalConfig keys (see adapt/config.py)")
    for flag in ("adapter", "base", "source", "target", "prompt", "out"):
        p.add_argument(f"--{flag}")
    # lists: comma- or space-separated (--strengths 0.4,0.6 or --strengths 0.4 0.6)
    p.add_argument("--strengths", nargs="+", action="extend", help="e.g. 0.2,0.4,0.6,0.8")
    p.add_argument("--scales", nargs="+", action="extend", help="e.g. 0,0.8,1.0 (0 = base)")
    p.add_argument("--modes", nargs="+", action="extend", help="plain,masked")
    p.add_argument("--seeds", type=int)
    p.add_argument("--num-images", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("overrides", nargs="*", help="key=value EvalConfig overrides")
    p.set_defaults(func=cmd_eval)


def cmd_eval(a) -> int:
    from adapt import evaluate
    cfg = eval_config(a)
    try:
        report = evaluate.run(cfg)
    except evaluate.SweepInterrupted as e:  # the finished settings were written; say where
        print(str(e), file=sys.stderr)
        return 130
    print((Path(cfg.out) / "summary.md").read_text())
    return 0 if report["status"] == "ok" else 3


def eval_config(a):
    """The EvalConfig an `adapt eval` command line stands for: --config YAML, then its flags and key=value overrides."""
    from adapt import config
    ov = list(a.overrides)
    for key in ("adapter", "base", "source", "target", "prompt", "seeds", "num_images", "steps", "out"):
        if getattr(a, key) is not None:
            ov.append(f"{key}={json.dumps(getattr(a, key))}" if key == "prompt" else f"{key}={getattr(a, key)}")
    for key in ("strengths", "scales", "modes"):
        values = getattr(a, key) or []
        ov += [v for v in values if "=" in v]  # a key=value override right after a list flag is an override
        items = [x for v in values if "=" not in v for x in v.split(",") if x.strip()]
        if items:
            ov.append(f"{key}=[{','.join(items)}]")
    cfg = config.load(config.EvalConfig, a.config, ov)
    if not cfg.adapter:
        raise config.ConfigError("adapter: required (--adapter DIR)")
    return cfg


def _add_inspect(sub):
    p = sub.add_parser("inspect", help="print an adapter's stored facts and key audit, or how an image from "
                       "`adapt sample` was made")
    p.add_argument("adapter", metavar="ADAPTER_OR_IMAGE", help="adapter folder, .safetensors or hub id, or a PNG `adapt sample` wrote")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_inspect)


def cmd_inspect(a) -> int:
    from adapt import lora
    if Path(a.adapter).suffix.lower() == ".png":
        return _inspect_image(a)
    a.adapter = lora.locate(a.adapter)  # a hub id: its snapshot folder
    tensors, header = lora.read(a.adapter)
    facts = header[lora.FACTS_KEY]
    meta = header.get("lora_adapter_metadata", {})
    layers = _layers(tensors, meta)
    shown = {k: v for k, v in dataclasses.asdict(facts).items() if k not in ("image_fingerprints", "base_probe")} if facts else {}
    info = {"file": str(lora.weights_path(a.adapter)), "num_tensors": len(tensors), **layers, "facts": shown}
    if a.json:
        print(json.dumps(info, indent=1, default=str))
        return 0
    te = f", {info['text_encoder_modules']} text-encoder modules" if info["text_encoder_modules"] else ""
    print(f"adapter {info['file']}: {info['num_modules']} UNet modules ({info['cross_attention_modules']} cross-attn, "
          f"{info['self_attention_modules']} self-attn){te}, {info['num_params']:,} params, rank {_span(info['ranks'])}, "
          f"alpha {_span(info['alphas'])}")
    for k, v in shown.items():
        print(f"  {k}: {v}")
    if not facts:
        print("  (no adapt facts: trained elsewhere; strength and base unknown)")
    return 0


# A layer's tensors in each naming people ship: diffusers (.lora.down/.lora.up; its text encoders'
# .lora_linear_layer.down/up), peft (.lora_A/.lora_B), kohya (.lora_down/.lora_up and a per-layer .alpha;
# '_'-joined module paths, lora_unet_* / lora_te*_*).
_LORA_SUFFIX = re.compile(r"(\.lora(?:_linear_layer)?[._](?:down|up|A|B)(?:\.[^.]+)?\.weight|\.alpha)$")


def _layers(tensors: dict, meta: dict) -> dict:
    """Module counts, LoRA parameters (alphas are not parameters), ranks and alphas of an adapter file, whatever its
    naming. ranks / alphas: the sorted distinct values (kohya files may vary them per layer); rank / alpha: the one
    value, or None when they vary or are unknown."""
    down = {}
    alphas = []
    params = 0
    for k, t in tensors.items():
        m = _LORA_SUFFIX.search(k)
        if not m:
            continue
        if m.group(1) == ".alpha":
            alphas.append(float(t))
            continue
        params += t.numel()
        if re.search(r"lora(_linear_layer)?[._](down|A)", m.group(1)):
            down[k[:m.start()]] = t.shape[0]
    unet = [n for n in down if not re.match(r"(lora_te\d?_|text_encoder)", n)]
    kind = lambda n, a: sum(bool(re.search(rf"[._]{a}[._]", n)) for n in unet)  # noqa: E731
    if not alphas:  # diffusers / peft files: per component, each module's alpha (alpha_pattern, else lora_alpha)
        from adapt import kohya
        for part in ("unet", "text_encoder", "text_encoder_2"):
            mods = [n[len(part) + 1:] for n in down if n.startswith(part + ".")]
            if meta.get(f"{part}.lora_alpha") is not None and mods:
                alphas += kohya.alphas_of({"lora_adapter_metadata": meta}, mods, part).values()
    ranks, alphas = sorted(set(down.values())), sorted(set(alphas))
    return {"num_modules": len(unet), "text_encoder_modules": len(down) - len(unet), "num_params": params,
            "cross_attention_modules": kind(unet, "attn2"), "self_attention_modules": kind(unet, "attn1"),
            "rank": ranks[0] if len(ranks) == 1 else None, "ranks": ranks,
            "alpha": alphas[0] if len(alphas) == 1 else None, "alphas": alphas}


def _span(values: list) -> str:
    return "unknown" if not values else f"{values[0]:g}" if len(values) == 1 else f"{values[0]:g}-{values[-1]:g} (varies by layer)"


def _inspect_image(a) -> int:
    """The record `adapt sample` wrote into an image, and the command that makes the image again."""
    from adapt import provenance
    if not Path(a.adapter).is_file():
        raise CliError(f"{a.adapter}: no such image")
    try:
        rec = provenance.read(a.adapter)
    except provenance.ProvenanceError as e:
        raise CliError(str(e)) from None
    except OSError as e:
        raise CliError(f"{a.adapter}: not a readable image ({e})") from None
    if rec is None:
        raise CliError(f"{a.adapter}: no adapt record (PNG text chunk '{provenance.KEY}'); only images written by "
                       "`adapt sample` carry one")
    if a.json:
        print(json.dumps({**dataclasses.asdict(rec), "reproduce": provenance.reproduce_command(rec)}, indent=1))
        return 0
    print(f"image {a.adapter}: {rec.kind} {rec.width}x{rec.height}, seed {rec.seed}, adapt {rec.adapt_version}")
    for k, v in dataclasses.asdict(rec).items():
        if k not in ("kind", "width", "height", "seed", "adapt_version", "version"):
            print(f"  {k}: {v}")
    print(f"make it again:\n  {provenance.reproduce_command(rec)}")
    return 0


def _add_data(sub):
    p = sub.add_parser("data", help="dataset tools")
    dsub = p.add_subparsers(dest="data_cmd", required=True)
    b = dsub.add_parser("build", help="build a datasets/<name> definition into an imagefolder")
    b.add_argument("name", help="synth_faces | synth_sunglasses | path to a datasets/<name> folder")
    b.add_argument("--out", required=True)
    b.add_argument("--n", type=int, required=True)
    b.add_argument("--split", default="train", help="pretrain | train | classifier | eval | val (disjoint seed ranges)")
    b.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    b.set_defaults(func=cmd_data_build)


def cmd_data_build(a) -> int:
    import yaml
    from adapt import synth
    from adapt.data import REPO, definition
    folder = definition(a.name)
    if folder is None:
        known = sorted(d.name for d in (REPO / "datasets").glob("*") if (d / "dataset.yaml").is_file())
        raise CliError(f"no dataset definition {a.name!r}: no dataset.yaml in {a.name}, datasets/{a.name} or "
                       f"{REPO / 'datasets' / a.name}; this checkout defines: {', '.join(known) or 'none'}")
    spec = yaml.safe_load((folder / "dataset.yaml").read_text())
    if spec.get("builder") != "synth":
        raise CliError(f"{folder} is built by {spec.get('builder')!r}; see its README.md for how to prepare it")
    if a.n < 1 or a.n > synth.SPLIT_SIZE:
        raise CliError(f"--n must be in [1, {synth.SPLIT_SIZE}], got {a.n}")
    if a.split not in synth.SPLITS:
        raise CliError(f"--split {a.split!r}: choose from {sorted(synth.SPLITS)}")
    out = Path(a.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not a.overwrite:
            raise CliError(f"--out {out} exists and is not empty; pass --overwrite to replace it (adapt never mixes "
                           "two builds in one folder)")
    out = synth.build_imagefolder(spec["domain"], out, a.n, a.split, spec.get("size", 64), replace=True,
                                  **{k: spec[k] for k in ("aspects", "scales") if k in spec})
    print(f"wrote {a.n} {spec['domain']} images of split {a.split!r} to {out} (metadata.jsonl with captions and eye boxes)")
    return 0


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, with a command's key=value overrides allowed between its flags as well as after them
    (`adapt eval ... target_split=eval --strengths 0.5 fid_inception=...`): argparse alone gives a positional list
    one place, and its intermixed parsing does not support subcommands."""
    ap = build_parser()
    args, extra = ap.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        ap.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="adapt", description="Adapt latent diffusion models to new domains with LoRA.")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    sub = ap.add_subparsers(dest="cmd", required=True)
    from adapt import cli_sample
    for add in (cli_sample.add_parser, _add_eval, _add_inspect, _add_data):
        add(sub)
    for mod in ("adapt.export", "adapt.bench"):  # optional commands
        try:
            __import__(mod, fromlist=["add_parser"]).add_parser(sub)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
    return ap


def main(argv=None) -> int:
    import adapt
    args = parse_args(argv)
    adapt.quiet()
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    from adapt import atomic, config, data, decoder, lora, model, runguard
    runguard.hangup_as_interrupt()  # a dropped terminal keeps partial work as Ctrl-C does
    try:
        rc = args.func(args)
        sys.stdout.flush()  # here, so a reader gone away (below) is met inside the try, not at interpreter exit
        return rc
    except BrokenPipeError:  # `adapt inspect ... | head`: the reader left; stop quietly, as Unix tools do (SIGPIPE)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:  # commands that can keep partial work say so themselves (adapt sample, adapt eval)
        print("interrupted (Ctrl-C): nothing more was written", file=sys.stderr)
        return 130
    except (CliError, config.ConfigError, data.DataError, model.ModelError, lora.AdapterError, atomic.WriteError,
            decoder.DecoderError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
