"""The model card (README.md) written next to a trained adapter."""

from __future__ import annotations

from pathlib import Path

from adapt import config


def write_model_card(out: Path, facts: dict, cfg) -> Path:
    f = facts
    fig = f.get("figures", {})
    ls = f.get("latent_stats", {})
    text = f"""---
library_name: diffusers
tags: [lora, img2img, adapt, domain-adaptation]
base_model: {f['base']}
---
# LoRA adapter: {Path(str(f['dataset'])).name} ({f['preset']}, rank {f['rank']})

Trained by `adapt` to move images toward the domain of **{f['dataset']}** (split `{f['dataset_split']}`,
{f['num_images']} images, fingerprint `{f['dataset_fingerprint']}`) with img2img at **strength {f['strength']}**.

| fact | value |
|---|---|
| base model | `{f['base']}` ({f['architecture']}, {f['prediction_type']}) |
| adapted layers | `{f['preset']}`: {f['audit']['num_modules']} modules, {f['audit']['trainable_params']:,} params |
| rank / alpha | {f['rank']} / {f['alpha']} (scale alpha/rank = {f['alpha'] / f['rank']:g}) |
| objective | window `{f['window']}`, timesteps {f['window_range']}, for `{f['scheduler']}` with {f['inference_steps']} steps |
| steps | {f['steps_trained']} at resolution {f['resolution']} |
| speed | {fig.get('steps_per_s')} steps/s, {fig.get('samples_per_s')} samples/s |
| target latents | scaled std {ls.get('overall_std', float('nan')):.3f} (1.0 is what the base expects) |

## Use it
```bash
adapt sample --base {f['base']} --adapter {out} --image source.png --strength {f['strength']} --steps {f['inference_steps']}
```
Plain diffusers:
```python
{_load_lines(f)}
pipe.load_lora_weights("{out}")
image = pipe(prompt, image=source, strength={f['strength']}, num_inference_steps={f['inference_steps']}).images[0]
```
The strength it was trained for is {f['strength']}: at that strength img2img runs exactly the timesteps it learned.

## Config
```yaml
{_yaml(cfg)}
```
"""
    path = out / "README.md"
    path.write_text(text)
    return path


def _load_lines(f: dict) -> str:
    """The plain-diffusers lines that load the exact base this adapter was trained on."""
    cls = "StableDiffusionXLImg2ImgPipeline" if f["architecture"] == "sdxl" else "StableDiffusionImg2ImgPipeline"
    where = str(f["base_resolved"])
    if where.endswith(".safetensors"):
        call = f'from_single_file("{where}")'
    elif "@" in where:  # hub id pinned to the commit that was loaded
        repo, commit = where.rsplit("@", 1)
        call = f'from_pretrained("{repo}", revision="{commit}")'
    else:
        call = f'from_pretrained("{where}")'
    return f"from diffusers import {cls}\npipe = {cls}.{call}"


def _yaml(cfg) -> str:
    import yaml
    return yaml.safe_dump(config.to_dict(cfg), sort_keys=False).strip()
