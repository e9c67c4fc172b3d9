"""adapt's training step side by side with the reference LoRA trainer, diffusers'
examples/text_to_image/train_text_to_image_lora.py (issue 16's P1 throughput and P6 memory): its measured speed on
the same base, images, batch, rank and threads (`case`), its work per step counted on adapt's pipeline
(`encoder_flops` + `unet_flops`: how much of P1 doing less work alone gives), and P1 with each trainer at its
default precision (`at_defaults`). Run through `adapt bench --config p1 --reference-venv V --reference-script S`.
"""

from __future__ import annotations

import os
import resource
import subprocess
import time
from pathlib import Path

import torch


# The reference trainer's work per step, counted on the same pipeline (its FLOPs over adapt's own count are the P1
# that doing less work alone gives, both trainers at one FLOP rate): the VAE and text encoders on the batch, and
# the UNet forward + backward with LoRA on attn1 + attn2 (its targets).
def encoder_flops(pipe, sized, caps: list[str], batch: int) -> float:
    """batch x one image's count (linear in the batch): no batch-sized activations to raise the case's peak RSS."""
    from torch.utils.flop_counter import FlopCounterMode
    ids = pipe.tokenizer(caps[:1], padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids
    with FlopCounterMode(display=False) as fc, torch.no_grad():  # torch 2.4 counts nothing under inference_mode
        pipe.vae.encode(sized.pixels[0][None].to(pipe.vae.dtype)).latent_dist.sample()
        pipe.text_encoder(ids)
    return batch * fc.get_total_flops()


def unet_flops(unet, b: dict) -> float:
    """With a second adapter on the reference's targets made the active one (adapt's stays attached, inactive)."""
    from peft import LoraConfig
    from torch.utils.flop_counter import FlopCounterMode
    from adapt import lora
    unet.add_adapter(LoraConfig(r=8, lora_alpha=8, target_modules=lora.PRESETS["all_attn"]), adapter_name="reference")
    unet.set_adapter("reference")
    for n, p in unet.named_parameters():
        p.requires_grad_(".reference." in n)
    bf16 = unet.dtype == torch.bfloat16
    with FlopCounterMode(display=False) as fc, torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        out = unet(b["z0"].to(unet.dtype), b["t"], b["emb"].to(unet.dtype)).sample
        (out.float() - b["noise"]).pow(2).mean().backward()
    return fc.get_total_flops()


def case(name: str, steps: int = 13) -> dict:
    """The reference trainer (diffusers' examples/text_to_image/train_text_to_image_lora.py: VAE and text encoder
    every step, LoRA on attn1 + attn2) on the same base, images, batch, rank and threads as the p1-* case.
    ADAPT_REF_VENV: a venv that runs it (it needs torchvision); ADAPT_REF_SCRIPT: the script, from a diffusers
    checkout (read and run from a scratch folder; its check_min_version line is dropped to run on the release)."""
    import re
    import tempfile
    from adapt.bench import CASES, _pipeline
    arch, side, batch, _, extra = CASES[name]
    venv, script = os.environ.get("ADAPT_REF_VENV"), os.environ.get("ADAPT_REF_SCRIPT")
    if not venv or not script:
        raise SystemExit("reference cases need --reference-venv and --reference-script")
    pipe, facts = _pipeline(arch)
    size = (side or pipe.unet.config.sample_size) * facts.vae_factor
    tmp = Path(tempfile.mkdtemp(prefix="adapt-ref-"))
    pipe.save_pretrained(tmp / "base")
    from adapt import synth
    synth.build_imagefolder("sunglasses", tmp / "data", n=16, split="train", size=size)
    import shutil
    shutil.rmtree(tmp / "data" / "masks")  # an imagefolder reader would take the masks for training images
    text = re.sub(r"^check_min_version\(.*\)$", "pass", Path(script).read_text(), flags=re.M)
    (tmp / "t2i_lora.py").write_text(text)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp / "hf"))
    cmd = [str(Path(venv) / "bin" / "accelerate"), "launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "bf16" if extra.get("bf16") else "no", "--dynamo_backend", "no", str(tmp / "t2i_lora.py"),
           "--pretrained_model_name_or_path", str(tmp / "base"), "--train_data_dir", str(tmp / "data"),
           "--resolution", str(size), "--train_batch_size", str(batch), "--max_train_steps", str(steps),
           "--learning_rate", "1e-3", "--lr_warmup_steps", "0", "--rank", "8", "--output_dir", str(tmp / "out"),
           "--seed", "0", "--dataloader_num_workers", "0"]
    t0 = time.time()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if r.returncode != 0:
        raise SystemExit(f"reference trainer failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
    rates = re.findall(rf"{steps}/{steps} \[[0-9:]+<[0-9:]+, +([0-9.]+)(s/it|it/s)", r.stderr.replace("\r", "\n"))
    if not rates:
        raise SystemExit("reference trainer: no final tqdm rate in its output")
    v, unit = float(rates[-1][0]), rates[-1][1]
    step_s = v if unit == "s/it" else 1 / v  # tqdm's smoothed rate at the end: the steady step, as in BENCHMARKS.md
    shutil.rmtree(tmp, ignore_errors=True)
    return {"name": name, "kind": "reference", "arch": arch, "batch": batch, "samples_per_s": batch / step_s,
            "step_s": step_s, "wall_s": wall, "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def at_defaults(report: dict) -> dict:
    """P1 with each trainer at its default precision: adapt's train.mixed_precision=auto as it resolves on this CPU
    (bf16 where it has native bf16: the p1-*-bf16 case), the reference's --mixed_precision default (no: fp32)."""
    from adapt import precision
    chosen = precision.choose("auto", "auto", "cpu", cpu_flag=precision.cpu_bf16_flag())
    by = {r["name"]: r for r in report["results"]}
    out = {}
    for arch in ("tiny", "sd15"):
        mine, ref = f"p1-{arch}" + ("-bf16" if chosen.mixed_precision == "bf16" else ""), f"ref-{arch}"
        if "samples_per_s" in by.get(mine, {}) and "samples_per_s" in by.get(ref, {}):
            out[arch] = {"adapt_case": mine, "adapt_precision": chosen.mixed_precision, "why": chosen.why,
                         "reference_case": ref, "P1": by[mine]["samples_per_s"] / by[ref]["samples_per_s"]}
    return out
