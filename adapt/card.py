"""The model card (README.md) written next to a trained adapter."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from adapt import atomic, config
from adapt.facts import AdapterFacts
from adapt.lora import WEIGHTS_NAME


def write_model_card(out: Path, f: AdapterFacts, cfg) -> Path:
    """`out`: the adapter folder. The card's commands name it by its absolute path and quote every argument, so they
    run as pasted from any directory, whatever the folder, base or caption holds (spaces, quotes, `$`)."""
    fig, ls = f.figures, f.latent_stats
    here = Path(out).resolve()
    sh = shlex.quote(str(here))
    local = Path(str(f.base))
    base = str(local.resolve()) if local.exists() else str(f.base)  # a relative base folder, as the adapter folder
    text = f"""---
library_name: diffusers
tags: [lora, img2img, adapt, domain-adaptation]
base_model: {f.base}
---
# LoRA adapter: {Path(str(f.dataset)).name} ({f.preset}, rank {f.rank})

Trained by `adapt` to move images toward the domain of **{f.dataset}** (split `{f.dataset_split}`,
{f.num_images} images, fingerprint `{f.dataset_fingerprint}`) with img2img at **strength {f.strength}**.

| fact | value |
|---|---|
| base model | `{f.base}` ({f.architecture}, {f.prediction_type}) |
| adapted layers | `{f.preset}`: {f.audit['num_modules']} modules, {f.audit['trainable_params']:,} params |
| rank / alpha | {f.rank} / {f.alpha} (scale alpha/rank = {f.alpha / f.rank:g}) |
| objective | window `{f.window}`, timesteps {f.window_range}, for `{f.scheduler}` with {f.inference_steps} steps |
| steps | {f.steps_trained} at resolution {f.resolution} |
| speed | {fig.get('steps_per_s')} steps/s, {fig.get('samples_per_s')} samples/s |
| target latents | scaled std {ls.get('overall_std', float('nan')):.3f} (1.0 is what the base expects) |
| optimizer | {_optim(f.optim)} |
{_resumes(f.resumes)}{_init_row(f)}{_decoder_row(f)}
## Use it
With adapt (`source.png`: any image; it runs at its own aspect with about {f.resolution}² pixels, sides multiples of the VAE factor):
```bash
adapt sample --base {shlex.quote(base)} --adapter {sh} --image source.png --prompt {shlex.quote(f.example_prompt)} --seed 0 --no-fuse --out adapted
```
Plain diffusers, the same image (same scheduler, steps, strength, guidance and seed; a square source.png):
```python
{_load_lines(f, cfg.model.config)}
pipe.load_lora_weights({_py(str(here))}, weight_name="{WEIGHTS_NAME}"){_decoder_lines(f, here)}
source = load_image("source.png").resize(({f.resolution}, {f.resolution}))
image = pipe({_py(f.example_prompt)}, image=source, strength={f.strength}, num_inference_steps={f.inference_steps},
             guidance_scale=7.5, generator=torch.Generator("cpu").manual_seed(0)).images[0]
image.save("adapted.png")
```
The strength it was trained for is {f.strength}: at that strength img2img runs exactly the timesteps it learned.

To pick strength, adapter scale and masked sampling for your images, `adapt eval --adapter {sh} --source HELD_OUT
--target TARGET_IMAGES --prompt "..."` sweeps them against the base and recommends a setting, and
`adapt sample --adapter {sh} --recommended EVAL_DIR --image ...` samples at it. In plain diffusers, adapter scale s is
`cross_attention_kwargs={{"scale": s}}` in the pipe call (it scales every LoRA layer of the UNet{", the convs included" if "conv" in f.preset else ""}).

## Config
```yaml
{_yaml(cfg)}
```
"""
    return atomic.write_text(out / "README.md", text)


def _init_row(f: AdapterFacts) -> str:
    i = f.init_from
    if not i:
        return ""
    return (f"| started from | `{i['resolved']}` (sha256 `{i['sha256'][:12]}`): {i['layers']} layers kept their ranks "
            f"{i['ranks']} and alphas{' (alpha = rank: the file stored none)' if i['alpha_assumed'] else ''}"
            + "".join(f"; its {n} {c} layers are kept unchanged (not trained)" for c, n in i["text_encoder_layers_kept"].items())
            + " |\n")


def _decoder_row(f: AdapterFacts) -> str:
    d = f.decoder
    if not d:
        return ""
    return (f"| VAE decoder | tuned on the training images in `{d['folder']}/` ({d['steps']} steps, lr {d['lr']}; pixel MSE "
            f"{d['loss_first']} -> {d['loss_last']}); the encoder is the base's |\n")


def _decoder_lines(f: AdapterFacts, out) -> str:
    """Plain diffusers: the VAE folder whose decoder was tuned on the domain, loaded in place of the base's."""
    if not f.decoder:
        return ""
    return (f'\nfrom diffusers import AutoencoderKL\npipe.vae = AutoencoderKL.from_pretrained({_py(str(Path(out) / f.decoder["folder"]))})'
            "  # the decoder tuned on the domain")


def _optim(o: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in o.items()) if o else "not recorded"


def _resumes(resumes: list) -> str:
    """One row per resume, with what changed (an allowed optimizer key, or the step budget)."""
    return "".join(f"| resumed at step {r['step']} | from {r['checkpoint']}; changed: "
                   f"{', '.join(f'{k} {a} -> {b}' for k, (a, b) in r['changed'].items()) or 'nothing'} |\n" for r in resumes)


def _load_lines(f: AdapterFacts, configs: str | None = None) -> str:
    """The plain-diffusers lines that load the exact base this adapter was trained on, with its scheduler.
    configs: model.config, the component configs a single-file base was loaded with (without them diffusers
    fetches them from the hub, which fails offline)."""
    from adapt.sample import SCHEDULERS
    cls = "StableDiffusionXLImg2ImgPipeline" if f.architecture == "sdxl" else "StableDiffusionImg2ImgPipeline"
    sched = SCHEDULERS[f.scheduler]
    where = str(f.base_resolved)
    if Path(where).exists():  # a local folder or file given relative to where training ran
        where = str(Path(where).resolve())
    if where.endswith(".safetensors"):
        if configs:
            local = Path(configs).expanduser()
            configs = str(local.resolve()) if local.exists() else configs
        call = f'from_single_file({_py(where)}' + (f', config={_py(configs)})' if configs else ")")
    elif "@" in where:  # hub id pinned to the commit that was loaded
        repo, commit = where.rsplit("@", 1)
        call = f'from_pretrained({_py(repo)}, revision={_py(commit)})'
    else:
        call = f'from_pretrained({_py(where)})'
    return (f"import torch\nfrom diffusers import {sched}, {cls}\nfrom diffusers.utils import load_image\n\n"
            f"pipe = {cls}.{call}\n"
            f"pipe.scheduler = {sched}.from_config(pipe.scheduler.config)  # the scheduler it was trained for")


def _py(s: str) -> str:
    """A Python string literal for s, double-quoted (JSON's escapes are Python's): quotes, backslashes (a Windows
    path) and newlines in a caption survive the paste."""
    return json.dumps(s, ensure_ascii=False)


def _yaml(cfg) -> str:
    import yaml
    return yaml.safe_dump(config.to_dict(cfg), sort_keys=False).strip()
