"""Typed run configs: dataclasses with help text and validation, one per section of a run.

Loaded from YAML plus dotted `key=value` overrides by `adapt.configio` (re-exported here: `load`, `dump`,
`to_dict`, `keys_help`, `ConfigError`). `__post_init__` validates and names the dotted key. The resolved
config is written next to the run's outputs (`dump`), so a run can always be reproduced.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Union

from adapt.precision import HALF
from adapt.configio import (ConfigError, check as _check, describe, dump, hints as _hints, keys_help, load,  # noqa: F401
                            opt, template_fields as _fields, to_dict)  # re-exported for callers


@dataclass
class ModelConfig:
    base: str = opt("tiny-faces", "base model: embedded name (tiny-faces), diffusers folder, hub id, or single .safetensors file")
    revision: Optional[str] = opt(None, "hub revision (branch, tag or commit)")
    variant: Optional[str] = opt(None, "weights variant, e.g. fp16")
    vae: Optional[str] = opt(None, "replace the base's VAE (folder or hub id), e.g. an fp16-fixed VAE")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = opt(
        "auto", "dtype of the frozen weights (LoRA stays fp32); auto = as train.mixed_precision (bf16 -> bfloat16, "
        "fp16 -> float16, no -> float32)")
    architecture: Optional[Literal["sd", "sdxl"]] = opt(None, "single-file checkpoints only: SD 1.x/2.x or SDXL; default: read from the file's key names")
    config: Optional[str] = opt(None, "single-file checkpoints only: diffusers folder or hub id with the component configs (needed offline)")


@dataclass
class DataConfig:
    source: str = opt("", "imagefolder (metadata.jsonl/.csv/.parquet or <image>.txt/.caption captions), a hub dataset id, or datasets/<name> of this repo")
    split: str = opt("train", "split to read: hub datasets, datasets/<name> builders, and folders split as Hugging Face datasets reads them (train/, test/, validation/; eval is test, val is validation)")
    num_images: Optional[int] = opt(None, "use only the first N images (few-shot); None = all")
    image_column: str = opt("image", "image column (hub datasets)")
    caption_column: str = opt("text", "caption column")
    default_caption: str = opt("", "caption for images without one; '{name}' expands to the file stem")
    resolution: int = opt(64, "training resolution: the pixel budget (resolution² pixels per image, in every bucket)")
    buckets: bool = opt(True, "aspect-ratio buckets: each image trains at the bucket nearest its aspect (about "
                        "resolution² pixels, sides multiples of data.bucket_step); false = a resolution² square crop")
    bucket_step: Optional[int] = opt(None, "bucket sides are multiples of this; None = VAE factor x UNet downsampling "
                                     "(64 for SD/SDXL), so latents need no padding")
    max_aspect: float = opt(2.5, "most extreme bucket aspect (long:short side); images beyond it are cropped to it")
    random_crop: bool = opt(False, "crop each image at a seeded random offset after resizing to cover its bucket "
                            "(default: the centre)")
    crops_per_image: int = opt(1, "with random_crop: cached crops per image, drawn at random each step (k times the "
                               "encoding time and cache size)")
    min_size: Optional[int] = opt(None, "skip images whose short side is below this many pixels; None = keep and upscale "
                                  "them to their bucket (each one is named in the log)")
    random_flip: bool = opt(False, "horizontal flip augmentation (each flipped crop is encoded once and cached beside the unflipped one)")
    caption_dropout: float = opt(0.0, "probability of training on the empty prompt (keeps unconditional guidance working)")
    cache: bool = opt(True, "cache VAE latents and prompt embeddings (computed once, reused across runs)")
    cache_dir: Optional[str] = opt(None, "where caches live; default $ADAPT_CACHE or ~/.cache/adapt")
    cache_threads: Optional[int] = opt(None, "torch threads while encoding the latent cache (a one-off frozen pass); "
                                       "None = this machine's cores shared by its local ranks")
    kohya_folders: bool = opt(False, "read the folder's subfolders named like kohya's 'N_name' (10_ohwx person) as kohya "
                              "does: each image drawn N times as often, and 'name' its caption when it has none")
    masks: Optional[str] = opt(None, "masked loss (as kohya's): 'alpha' = each image's alpha channel, or a folder (relative "
                               "to the image folder, or absolute) with a mask image per training image under the same name; "
                               "white = where the target domain differs. None = the whole image counts")

    def __post_init__(self):
        _check(self.resolution > 0 and self.resolution % 8 == 0, "data.resolution", f"must be a positive multiple of 8, got {self.resolution}")
        _check(self.num_images is None or self.num_images > 0, "data.num_images", f"must be > 0, got {self.num_images}")
        _check(0.0 <= self.caption_dropout < 1.0, "data.caption_dropout", f"must be in [0, 1), got {self.caption_dropout}")
        _check(_fields(self.default_caption) <= {"name"}, "data.default_caption",
               f"{self.default_caption!r}: only '{{name}}' (the file stem) may appear in braces; write literal braces as '{{{{' and '}}}}'")
        _check(self.bucket_step is None or (self.bucket_step > 0 and self.bucket_step % 8 == 0), "data.bucket_step",
               f"must be a positive multiple of 8, got {self.bucket_step}")
        _check(self.max_aspect >= 1.0, "data.max_aspect", f"must be >= 1, got {self.max_aspect}")
        _check(self.crops_per_image >= 1, "data.crops_per_image", f"must be >= 1, got {self.crops_per_image}")
        _check(self.crops_per_image == 1 or self.random_crop, "data.crops_per_image",
               f"{self.crops_per_image} crops need data.random_crop=true (centre crops of an image are all the same)")
        _check(self.min_size is None or self.min_size > 0, "data.min_size", f"must be > 0, got {self.min_size}")
        _check(self.cache_threads is None or self.cache_threads > 0, "data.cache_threads", f"must be > 0, got {self.cache_threads}")


@dataclass
class LoraConfig:
    preset: Literal["cross_attn", "cross_attn_kv", "all_attn", "cross_attn_conv", "transformer", "transformer_conv"] = opt(
        "cross_attn", "which UNet layers get adapters: attn2 q/k/v/out (default), attn2 k/v only, attn1+attn2, attn2 "
        "plus every resnet's 3x3 convs (LoCon: detail finer than the cross-attention grid), or sd-scripts' default "
        "network (every Linear and 1x1 conv of the transformer blocks) without or with its conv_dim layers")
    rank: int = opt(8, "LoRA rank: higher fits more of the domain, costs memory and overfits few-shot data sooner")
    alpha: Optional[float] = opt(None, "LoRA alpha; effective scale is alpha/rank; None = rank (scale 1)")
    dropout: float = opt(0.0, "dropout on the LoRA input")
    init: Literal["gaussian", "pissa", "olora", "default"] = opt("gaussian", "peft init_lora_weights (gaussian: diffusers' choice)")
    init_from: Optional[str] = opt(None, "start from an existing adapter's weights (sd-scripts' --network_weights): an "
                                   "adapt/diffusers adapter, a kohya/WebUI/ComfyUI .safetensors, a peft folder or a hub "
                                   "id; its layers keep their rank and alpha, the preset's others start at zero")

    def __post_init__(self):
        _check(self.rank > 0, "lora.rank", f"must be > 0, got {self.rank}")
        _check(self.init_from is None or self.init in ("gaussian", "default"), "lora.init",
               f"{self.init} rewrites the base weights from the LoRA's start, which lora.init_from gives; use gaussian")
        _check(self.alpha is None or self.alpha > 0, "lora.alpha", f"must be > 0, got {self.alpha}")
        _check(0.0 <= self.dropout < 1.0, "lora.dropout", f"must be in [0, 1), got {self.dropout}")


@dataclass
class ObjectiveConfig:
    strength: float = opt(0.6, "img2img strength the adapter is trained for and sampled at (SDEdit, Meng et al. 2022)")
    window: Literal["img2img_exact", "continuous", "full"] = opt("img2img_exact", "timesteps: exactly those img2img visits, all t up to the first visited, or all t")
    scheduler: Literal["ddim", "ddpm", "euler", "pndm", "dpm"] = opt("ddim", "sampling scheduler the window is computed for")
    inference_steps: int = opt(50, "sampling steps the window is computed for")
    min_snr_gamma: Optional[float] = opt(None, "Min-SNR-gamma loss weighting (Hang et al. 2023); 5 is the paper's value; None = off")
    noise_offset: float = opt(0.0, "offset noise std (Guttenberg 2023); 0 = off")
    mask_outside_weight: float = opt(0.0, "with data.masks: loss weight outside the mask (0 = only the masked region "
                                     "teaches, kohya's masked loss; 1 = masks ignored)")

    def __post_init__(self):
        _check(0.0 < self.strength <= 1.0, "objective.strength", f"must be in (0, 1], got {self.strength}")
        _check(self.inference_steps > 0, "objective.inference_steps", f"must be > 0, got {self.inference_steps}")
        _check(self.min_snr_gamma is None or self.min_snr_gamma > 0, "objective.min_snr_gamma", f"must be > 0, got {self.min_snr_gamma}")
        _check(self.noise_offset >= 0, "objective.noise_offset", f"must be >= 0, got {self.noise_offset}")
        _check(0.0 <= self.mask_outside_weight <= 1.0, "objective.mask_outside_weight", f"must be in [0, 1], got {self.mask_outside_weight}")
        _check(int(self.inference_steps * self.strength) >= 1, "objective.strength",
               f"strength {self.strength} x inference_steps {self.inference_steps} visits no timestep")


@dataclass
class OptimConfig:
    lr: float = opt(1e-3, "peak learning rate (LoRA tolerates larger rates than full fine-tuning)")
    weight_decay: float = opt(1e-2, "AdamW weight decay")
    betas: list = opt([0.9, 0.999], "AdamW betas")
    eps: float = opt(1e-8, "AdamW epsilon")
    schedule: Literal["constant", "cosine", "linear"] = opt("constant", "LR schedule after warmup")
    warmup_steps: int = opt(0, "linear warmup steps")
    max_grad_norm: Optional[float] = opt(1.0, "gradient clipping norm; None = off")

    def __post_init__(self):
        _check(self.lr > 0, "optim.lr", f"must be > 0, got {self.lr}")
        _check(len(self.betas) == 2, "optim.betas", f"needs 2 values, got {self.betas}")
        _check(self.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {self.warmup_steps}")


@dataclass
class TrainSection:
    max_steps: int = opt(400, "optimizer steps to train")
    batch_size: int = opt(8, "per-process batch size")
    grad_accum: int = opt(1, "gradient accumulation steps")
    seed: int = opt(0, "seed for init, data order, noise and timesteps")
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = opt(
        "auto", "autocast precision; LoRA weights stay fp32. auto (adapt/precision.py) = bf16 on a GPU with bf16 and on "
        "a CPU with native bf16 dot products (avx512_bf16 / amx_bf16: AMD Zen 4 trained SD 1.5 1.8x and the embedded "
        "base 1.2-1.3x faster than fp32, loss within 0.2%), else no (fp32); a resume keeps its checkpoint's. The log "
        "says what auto chose and this CPU's bf16/fp32 matmul ratio")
    gradient_checkpointing: bool = opt(False, "recompute UNet activations in backward: less memory, ~30% slower")
    compile: Literal["auto", "off", "regional"] = opt(
        "auto", "torch.compile of the UNet's repeated transformer blocks (diffusers' compile_repeated_blocks: one block "
        "graph compiled once, reused by every block). auto = off, logged with why: measured 0.78x steady on an H200 (SD "
        "1.5, 512 px, bf16), 0.92-1.22x on SD 1.5 and 1.01x on the embedded base on one CPU thread, after ~100 s of "
        "compiling (inductor needs a C++ compiler on CPU)")
    checkpointing_steps: int = opt(0, "save a resumable checkpoint every N steps; a final one is always written (so a "
                                   "finished run can be extended by raising max_steps); 0 = only the final one")
    checkpoints_total_limit: Optional[int] = opt(2, "keep at most N checkpoints")
    resume_from_checkpoint: Optional[str] = opt(None, "'latest' (the newest intact checkpoint) or a checkpoint folder")
    resume_allow: list = opt([], "optimizer keys a resume may change, e.g. [optim.lr]; identity keys (base, data, LoRA "
                             "shape, objective, seed) can never change on resume")
    log_every: int = opt(10, "read the loss back from the device every N steps (and at checkpoints, validation, the end): "
                               "the log still has a row per step; under DDP a stop signal takes effect at these points")
    num_threads: Optional[int] = opt(None, "torch CPU threads; None = torch's default")
    report_to: Union[str, bool] = opt("auto", "experiment tracker for loss, lr and validation grids, through accelerate: tensorboard "
                         "(in <out_dir>/adapt: tensorboard --logdir <out_dir>), wandb, trackio, mlflow, comet_ml, aim, "
                         "clearml, dvclive, swanlab, all (every one installed) or none (a bare no / off / false, which YAML reads as a "
                         "boolean, means none too); auto = tensorboard when installed, else none. One that is not installed is an error. logs/train_log.jsonl is written always")
    overwrite: bool = opt(False, "allow writing into an out_dir that already holds a finished run")

    def __post_init__(self):
        for k in ("max_steps", "batch_size", "grad_accum", "log_every"):
            _check(getattr(self, k) > 0, f"train.{k}", f"must be > 0, got {getattr(self, k)}")
        _check(self.checkpointing_steps >= 0, "train.checkpointing_steps", f"must be >= 0, got {self.checkpointing_steps}")
        _check(self.checkpoints_total_limit is None or self.checkpoints_total_limit > 0, "train.checkpoints_total_limit", "must be > 0")
        _check(self.num_threads is None or self.num_threads > 0, "train.num_threads", f"must be > 0, got {self.num_threads}")
        if self.report_to is False:  # YAML 1.1 reads `report_to: no` (or off / false) as the boolean False
            self.report_to = "none"
        _check(self.report_to is not True, "train.report_to", "a bare yes / on / true names no tracker: write one "
               "(tensorboard, wandb, ...), all or auto")
        from accelerate.utils import LoggerType
        known = ["auto", "none", *(t.value for t in LoggerType)]
        _check(self.report_to in known, "train.report_to", f"{self.report_to!r}: choose from {', '.join(known)}")
        bad = [k for k in self.resume_allow if not str(k).startswith("optim.")]
        _check(not bad, "train.resume_allow", f"only optim.* keys can be allowed to change on resume, got {bad}")


@dataclass
class ValidationConfig:
    steps: int = opt(0, "run validation every N steps (and at the end); 0 = only at the end")
    source: Optional[str] = opt(None, "folder or dataset of validation source images; None = no validation")
    split: str = opt("val", "split of the validation source (as data.split; a folder without splits is read whole)")
    num_images: int = opt(4, "validation images in the grid")
    prompt: Optional[str] = opt(None, "prompt for validation img2img; None = each image's caption")
    seed: int = opt(1234, "seed for validation noise")
    guidance_scale: float = opt(1.0, "classifier-free guidance during validation")

    def __post_init__(self):
        _check(self.steps >= 0, "validation.steps", f"must be >= 0, got {self.steps}")
        _check(self.num_images >= 1, "validation.num_images", f"must be >= 1, got {self.num_images} "
               "(to turn validation off, set validation.source=null)")
        _check(self.prompt is None or _fields(self.prompt) <= {"caption"}, "validation.prompt",
               f"{self.prompt!r}: only '{{caption}}' may appear in braces")


@dataclass
class DecoderConfig:
    steps: int = opt(0, "fine-tune the VAE decoder on the training images for this many steps before the LoRA (encoder "
                     "frozen, as sd-vae-ft-mse); saved as <out_dir>/vae/. It lets the model draw detail its base decoder "
                     "cannot (the demo: lens bridges); 0 = off")
    lr: float = opt(1e-4, "decoder learning rate (AdamW)")
    batch_size: int = opt(8, "decoder images per step")

    def __post_init__(self):
        _check(self.steps >= 0, "decoder.steps", f"must be >= 0, got {self.steps}")
        _check(self.lr > 0, "decoder.lr", f"must be > 0, got {self.lr}")
        _check(self.batch_size > 0, "decoder.batch_size", f"must be > 0, got {self.batch_size}")


@dataclass
class RunConfig:
    out_dir: str = opt("runs/adapter", "output folder: adapter, config, checkpoints, validation grids")
    model: ModelConfig = opt(None, "base model")
    data: DataConfig = opt(None, "target-domain training data")
    lora: LoraConfig = opt(None, "adapter")
    objective: ObjectiveConfig = opt(None, "strength-window objective")
    optim: OptimConfig = opt(None, "optimizer")
    train: TrainSection = opt(None, "loop")
    validation: ValidationConfig = opt(None, "validation grids")
    decoder: DecoderConfig = opt(None, "target-domain VAE decoder (off by default)")

    def __post_init__(self):
        for f in dataclasses.fields(self):  # sections default to their own defaults
            if getattr(self, f.name) is None:
                setattr(self, f.name, _hints(type(self))[f.name]())
        _check(bool(self.data.source), "data.source", "is required (an imagefolder, hub dataset id or datasets/<name>)")
        # Frozen weights in one half type under autocast to the other would re-cast every weight each step (and
        # on CPU GroupNorm refuses fp16 weights under bf16 autocast): the two must agree, as in diffusers' examples.
        mp, dt = self.train.mixed_precision, self.model.dtype
        _check(not (dt in HALF and mp not in ("no", "auto") and HALF[dt] != mp), "model.dtype/train.mixed_precision",
               f"model.dtype={dt} with train.mixed_precision={mp}: use float16 with fp16 or bfloat16 with bf16")


@dataclass
class PretrainConfig:
    out_dir: str = opt("runs/pretrain", "work folder: stage checkpoints and the exported pipeline")
    export_dir: str = opt("adapt/zoo/tiny-faces", "where the finished diffusers pipeline is written")
    seed: int = opt(0, "seed for init and data")
    num_images: int = opt(12000, "source-domain faces rendered for pretraining")
    vae_from: Optional[str] = opt(None, "a pipeline folder whose VAE is reused as it is (skips the VAE stage; its latent "
                                   "statistics are measured and logged, its shift and scaling_factor kept)")
    vae_steps: int = opt(6000, "VAE optimizer steps")
    vae_clutter: float = opt(0.0, "share of VAE batches overdrawn with random shapes and lines (synth.clutter), so the "
                             "codec can represent what the source faces lack (a thin dark line); the UNet never sees them")
    vae_latent_channels: int = opt(4, "latent channels of the VAE (SD 1.x/2.x/XL: 4; SD3/FLUX: 16, which keep fine detail "
                                    "such as thin lines and text, Esser et al. 2024)")
    vae_batch: int = opt(16, "VAE batch size")
    vae_lr: float = opt(1e-3, "VAE peak learning rate (cosine to 5%)")
    vae_edge_weight: float = opt(0.0, "weight of an L1 loss on image gradients (horizontal and vertical differences): L1/L2 "
                                 "alone blur a 1-2 px line into a faint band, since its pixels are few")
    vae_kl: float = opt(1e-5, "KL weight: small, as in LDM's 'KL-reg' autoencoders")
    unet_cross_attn_levels: int = opt(2, "latent levels (of 3, deepest first) whose blocks have cross-attention: 2 = 8x8 and 4x4 "
                                      "(v1), 3 = also the full 16x16 level (v2), where a caption can steer thin details")
    unet_heads: int = opt(4, "attention heads per transformer block (diffusers' UNet2DConditionModel reads its "
                          "attention_head_dim as this count): 4 heads of 32 channels at the 128-channel levels. The first "
                          "release used 32 heads of 4 channels, whose softmaxes took 29% of a LoRA step (1.38x slower)")
    unet_steps: int = opt(4000, "UNet optimizer steps")
    unet_batch: int = opt(32, "UNet batch size")
    unet_lr: float = opt(3e-4, "UNet peak learning rate")
    min_snr_gamma: float = opt(5.0, "Min-SNR-gamma weighting for the UNet (Hang et al. 2023)")
    ema_decay: float = opt(0.999, "EMA decay of UNet weights; the EMA is exported")
    caption_dropout: float = opt(0.1, "empty-prompt rate, so guidance works")
    checkpoint_every: int = opt(250, "save a resumable stage checkpoint every N steps")
    num_threads: int = opt(1, "torch threads (1 is fastest on a loaded 2-core machine)")

    def __post_init__(self):
        _check(0.0 <= self.vae_clutter <= 1.0, "vae_clutter", f"must be in [0, 1], got {self.vae_clutter}")
        _check(self.vae_edge_weight >= 0, "vae_edge_weight", f"must be >= 0, got {self.vae_edge_weight}")
        _check(self.vae_latent_channels in (4, 8, 16), "vae_latent_channels", f"must be 4, 8 or 16, got {self.vae_latent_channels}")
        _check(self.unet_cross_attn_levels in (2, 3), "unet_cross_attn_levels", f"must be 2 or 3, got {self.unet_cross_attn_levels}")
        _check(self.unet_heads > 0 and 64 % self.unet_heads == 0, "unet_heads",
               f"must divide the UNet's 64 and 128 channels, got {self.unet_heads}")
        _check(self.vae_from is None or Path(self.vae_from, "vae", "config.json").exists(), "vae_from",
               f"{self.vae_from}: no vae/config.json there (a diffusers pipeline folder is expected)")


@dataclass
class MaskSettings:
    """How `--mask auto` finds the edit region (adapt.masking); recorded with every masked output. The defaults of
    `adapt sample --mask-*` and EvalConfig.mask_* are these."""
    timestep: int = 441        # mid-noise: the edit's location is decided, the face still recognisable (DDIM 25-step grid)
    draws: int = 4             # noise draws averaged; 1 draw gave ragged masks
    threshold: float = 0.5     # on the per-image min-max normalised difference (DiffEdit's default)
    close: int = 2             # latent pixels: morphological closing before the dilation fills gaps up to 2·close wide
                               # between parts of one edit and holes inside it: the bridge between two lenses lay partly
                               # outside 21% of the demo's masks; closing 2 raised the shape check 0.50 -> 0.56 for +0.4%
                               # area (plain img2img, no mask: 0.62), where a lower threshold (0.3) cost +3.4% area
    dilate: int = 1            # latent pixels; undilated masks cover only the hottest cells (reach fell 0.98 -> 0.39)
    blur: float = 1.0          # pixel paste-back: Gaussian sigma of the feathered edge, in pixels; 0 = hard edge
    paste: bool = True         # paste the input back outside the mask after decoding
    seed: int = 0

    def __post_init__(self):
        if not 0 <= self.timestep < 1000:
            raise ValueError(f"mask timestep must be in [0, 1000), got {self.timestep}")
        if self.draws < 1 or self.dilate < 0 or self.close < 0 or self.blur < 0:
            raise ValueError(f"mask draws >= 1, close >= 0, dilate >= 0 and blur >= 0 required, got {self.draws}, "
                             f"{self.close}, {self.dilate}, {self.blur}")
        if not 0 < self.threshold < 1:
            raise ValueError(f"mask threshold must be in (0, 1), got {self.threshold}")


@dataclass
class EvalConfig:
    adapter: str = opt("", "trained adapter folder, .safetensors file or Hugging Face hub id (org/name[@revision])")
    base: Optional[str] = opt(None, "base model; None = the base stored in the adapter")
    source: str = opt("datasets/synth_faces", "held-out source images (same forms as data.source)")
    source_split: str = opt("eval", "split of the source set (as data.split; eval is a folder's test/)")
    num_images: int = opt(32, "source images evaluated")
    target: str = opt("datasets/synth_sunglasses", "real target-domain images (KID reference)")
    target_split: str = opt("eval", "split of the target set")
    num_target: int = opt(64, "real target images for KID")
    classifier_split: str = opt("classifier", "split of source and target used to train the domain classifier (a split folder without it: train)")
    classifier_images: int = opt(256, "images per domain for the classifier (at most)")
    classifier: Literal["auto", "scratch", "base_features"] = opt(
        "auto", "domain classifier: a CNN trained from scratch on the pixels, or logistic regression on the frozen base "
        "UNet's features (better with few images); auto = base_features below 32 images per domain (adapt.classifier)")
    prompt: str = opt("{caption}", "img2img prompt; '{caption}' is each source image's caption")
    caption_column: str = opt("text", "the captions' column in the source's metadata or hub dataset (as data.caption_column)")
    strengths: list = opt([0.2, 0.4, 0.6, 0.8], "img2img strengths swept")
    scales: list = opt([0.0, 0.5, 1.0], "adapter scales swept; 0 is the base model (the control)")
    seeds: int = opt(3, "noise seeds per image")
    modes: list = opt(["plain", "masked"], "sampling modes swept for adapter rows: plain img2img, and masked (the adapter's "
                      "own edit mask: latent blending inside it, the input pasted back outside; adapt.masking)")
    mask_timestep: int = opt(MaskSettings.timestep, "masked: timestep at which adapter and base noise predictions are compared")
    mask_draws: int = opt(MaskSettings.draws, "masked: noise draws averaged for the mask")
    mask_threshold: float = opt(MaskSettings.threshold, "masked: threshold on the per-image normalised difference, in (0, 1)")
    mask_close: int = opt(MaskSettings.close, "masked: morphological closing radius in latent pixels (fills gaps between parts of the edit, "
                          "such as the bridge between two lenses), before the dilation")
    mask_dilate: int = opt(MaskSettings.dilate, "masked: dilation in latent pixels")
    mask_blend: bool = opt(True, "masked: latent blending (keep the noised source outside the mask at every step)")
    mask_paste: bool = opt(MaskSettings.paste, "masked: paste the input back outside the mask after decoding")
    mask_blur: float = opt(MaskSettings.blur, "masked: feathering of the pasted edge, Gaussian sigma in pixels")
    adapter_decoder: bool = opt(True, "the adapter's rows decode with the VAE decoder tuned on its domain when it ships one "
                                "(vae/, adapt.decoder); false = the base's decoder for every row")
    steps: Optional[int] = opt(None, "inference steps; None = the adapter's")
    scheduler: Optional[str] = opt(None, "sampling scheduler; None = the adapter's")
    guidance: float = opt(1.0, "classifier-free guidance scale")
    preservation_threshold: float = opt(0.9, "rule for the recommended strength: min SSIM (outside the mask when one exists)")
    min_classifier_accuracy: float = opt(0.95, "below this held-out (or cross-validated) accuracy the classifier's reach is "
                                         "unreliable: the report is refused, or, where the benchmark's lens detector judges "
                                         "reach, kept with a warning")
    batch_size: int = opt(32, "img2img batch size")
    device: str = opt("auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = opt("auto", "base weights for sampling: auto = float16 on a GPU, float32 on CPU")
    fid_inception: Optional[str] = opt(None, "TorchScript Inception detector for FID (inception-2015-12-05.pt, as StyleGAN2-ADA "
                                       "and clean-fid use); None = FID not computed")
    lpips_net: Literal["vgg", "alex"] = opt("vgg", "LPIPS backbone; the few-shot literature's Intra-LPIPS uses vgg")
    lpips_backbone: Optional[str] = opt(None, "ImageNet weights of lpips_net in torchvision's layout "
                                        "(vgg16-397923af.pth / alexnet-owt-7be5be79.pth); None = LPIPS not computed")
    lpips_linear: Optional[str] = opt(None, "LPIPS v0.1 linear layers (vgg.pth / alex.pth shipped in the lpips package)")
    lpips_size: Optional[int] = opt(256, "resize to this many pixels before LPIPS (the literature uses 256); None = native")
    intra_lpips_train: Optional[str] = opt(None, "the training images, Intra-LPIPS's cluster centres; None = the adapter's "
                                           "recorded dataset and split")
    clip_model: Optional[str] = opt(None, "transformers CLIPModel folder or hub id for clip_score / clip_direction; None = skip")
    clip_target_text: Optional[str] = opt(None, "text describing the target domain, e.g. 'a photo of a person wearing sunglasses'")
    clip_source_text: Optional[str] = opt(None, "text describing the source domain, e.g. 'a photo of a person' (for clip_direction)")
    fuse: bool = opt(True, "fuse the adapter into the UNet at each scale (faster; equal to unfused within ~1e-6)")
    out: str = opt("runs/eval", "output folder")
    overwrite: bool = opt(False, "replace a report already in `out` (default: refuse)")

    def __post_init__(self):
        _check(all(0 < float(s) <= 1 for s in self.strengths) and len(self.strengths) > 0, "strengths", f"each must be in (0, 1], got {self.strengths}")
        _check(all(float(s) >= 0 for s in self.scales) and len(self.scales) > 0, "scales", f"must be >= 0, got {self.scales}")
        _check(self.seeds > 0 and self.num_images > 1 and self.num_target > 1, "seeds/num_images/num_target", "must be positive (images >= 2)")
        _check(self.steps is None or self.steps > 0, "steps", f"must be > 0, got {self.steps}")
        _check(self.batch_size > 0, "batch_size", f"must be > 0, got {self.batch_size}")
        _check(_fields(self.prompt) <= {"caption"}, "prompt", f"{self.prompt!r}: only '{{caption}}' may appear in braces; "
               "write literal braces as '{{' and '}}'")
        _check(self.clip_model is None or bool(self.clip_target_text), "clip_target_text",
               "clip_model is set: name the target domain in words, e.g. 'a photo of a person wearing sunglasses'")
        _check((self.lpips_backbone is None) == (self.lpips_linear is None), "lpips_backbone/lpips_linear",
               "LPIPS needs both files (backbone and linear layers) or neither")
        _check(len(self.modes) > 0 and set(self.modes) <= {"plain", "masked"}, "modes",
               f"each must be 'plain' or 'masked', got {self.modes}")
        _check(self.mask_blend or self.mask_paste or "masked" not in self.modes, "mask_blend/mask_paste",
               "masked mode needs latent blending, paste-back or both")
        self.mask_settings()  # validates the mask_* keys
        self.strengths = sorted(float(s) for s in self.strengths)
        self.scales = sorted(float(s) for s in self.scales)

    def mask_settings(self) -> MaskSettings:
        try:
            return MaskSettings(timestep=self.mask_timestep, draws=self.mask_draws, threshold=self.mask_threshold,
                                close=self.mask_close, dilate=self.mask_dilate, blur=self.mask_blur, paste=self.mask_paste)
        except ValueError as e:
            raise ConfigError(f"mask_*: {e}") from None
