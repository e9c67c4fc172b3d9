"""What an adapter was trained with, as one typed, versioned record (like peft's LoraConfig).

`AdapterFacts` travels in the adapter's safetensors header under the key "adapt" (`to_header` /
`from_header`) and in every training checkpoint. The recipe writes it; the model card, `adapt sample`,
`adapt eval`, `adapt export` and `adapt inspect` read it. Adapters trained elsewhere have no record
(`from_header` returns None); adapters imported from kohya files have one with `imported_from` set and
the training fields they cannot know left None.

`RESUME_RULES` says which run settings a resume may change: identity keys (the base, the data, the
adapter's shape, the objective, the seed) are refused; optimizer keys are refused unless the user lists
them in `train.resume_allow`; the rest (step budget, checkpointing, logging, validation) are free.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Optional

from adapt.config import DecoderConfig

FORMAT_VERSION = 1


class FactsError(ValueError):
    """An adapter's stored record is unreadable or was written by a newer adapt; the message says which."""


@dataclass
class AdapterFacts:
    """The record stored with an adapter. Fields an imported adapter cannot know are None."""
    architecture: str  # "sd" (SD 1.x/2.x) or "sdxl"
    base: Optional[str] = None  # as the user gave it
    base_revision: Optional[str] = None
    base_resolved: Optional[str] = None  # folder, file, or hub id@commit actually loaded
    base_probe: list = field(default_factory=list)  # [[weight name, first values], ...] of the base UNet (lora.base_probe)
    prediction_type: Optional[str] = None
    preset: Optional[str] = None
    rank: Optional[int] = None
    alpha: Optional[float] = None
    strength: Optional[float] = None  # the img2img strength trained for, and sampled at by default
    window: Optional[str] = None
    window_range: Optional[list] = None  # [t_min, t_max] of the trained window
    scheduler: Optional[str] = None
    inference_steps: Optional[int] = None
    steps_trained: Optional[int] = None
    resolution: Optional[int] = None
    seed: Optional[int] = None
    dataset: Optional[str] = None
    dataset_split: Optional[str] = None
    dataset_fingerprint: Optional[str] = None
    image_fingerprints: list = field(default_factory=list)
    num_images: Optional[int] = None
    example_prompt: str = ""
    latent_stats: dict = field(default_factory=dict)
    audit: dict = field(default_factory=dict)
    figures: dict = field(default_factory=dict)
    optim: dict = field(default_factory=dict)  # optimizer settings in force at the end (after any allowed change)
    resumes: list = field(default_factory=list)  # one {"step", "checkpoint", "changed": {key: [old, new]}} per resume
    adapt_version: Optional[str] = None
    imported_from: Optional[str] = None
    kohya: dict = field(default_factory=dict)  # import details: family, naming, dropped text-encoder layers, ss_* metadata
    decoder: dict = field(default_factory=dict)  # the tuned VAE shipped in vae/ (adapt.decoder): its settings and losses
    init_from: dict = field(default_factory=dict)  # the adapter training started from (warmstart.InitAdapter.to_record)
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        if self.architecture not in ("sd", "sdxl"):
            raise FactsError(f"architecture must be 'sd' or 'sdxl', got {self.architecture!r}")
        if self.strength is not None and not 0 < float(self.strength) <= 1:
            raise FactsError(f"strength must be in (0, 1], got {self.strength}")
        for k in ("rank", "inference_steps", "steps_trained", "resolution", "num_images"):
            v = getattr(self, k)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise FactsError(f"{k} must be a non-negative int, got {v!r}")

    @property
    def trained(self) -> bool:
        """True for adapters adapt trained (strength, scheduler and steps are known)."""
        return self.strength is not None

    def to_header(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True, default=str)

    @classmethod
    def from_header(cls, raw, where: str = "adapter") -> Optional["AdapterFacts"]:
        """Parse the 'adapt' header value (JSON text or dict); None when there is none.

        Records without a format_version are the 0.x dict; they carry the same keys and are read as version 0.
        """
        if raw in (None, "", {}):
            return None
        try:
            d = json.loads(raw) if isinstance(raw, str) else dict(raw)
        except (TypeError, ValueError) as e:
            raise FactsError(f"{where}: the 'adapt' record is not JSON ({e})") from e
        version = d.get("format_version", 0)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise FactsError(f"{where}: record format {version!r} is newer than this adapt reads ({FORMAT_VERSION}); "
                             "upgrade adapt")
        if "dropped_text_encoder_layers" in d or "kohya_architecture" in d:  # 0.x kohya imports kept these at top level
            d.setdefault("kohya", {}).update({k: d.pop(k) for k in ("dropped_text_encoder_layers", "kohya_architecture",
                                                                    "kohya_naming", "kohya_metadata") if k in d})
        known = {f.name for f in dataclasses.fields(cls)}
        if "architecture" not in d:
            raise FactsError(f"{where}: the 'adapt' record has no architecture")
        try:
            return cls(**{k: v for k, v in d.items() if k in known})
        except TypeError as e:
            raise FactsError(f"{where}: the 'adapt' record is malformed ({e})") from e


# ---------------------------------------------------------------- what a resume may change

FREE = ("out_dir", "train.max_steps", "train.checkpointing_steps", "train.checkpoints_total_limit",
        "train.resume_from_checkpoint", "train.resume_allow", "train.log_every", "train.num_threads", "train.overwrite",
        "train.gradient_checkpointing", "train.compile", "train.report_to", "data.cache", "data.cache_dir", "data.cache_threads", "validation.")
OPTIMIZER = ("optim.",)
# Keys added after checkpoints already existed: a checkpoint without one ran as the section's default does.
INTRODUCED = {**{f"decoder.{k}": v for k, v in dataclasses.asdict(DecoderConfig()).items()}, "data.kohya_folders": False,
              "lora.init_from": None}


def classify(key: str) -> str:
    """'free', 'optimizer' or 'identity' for a dotted config key."""
    if any(key == k or (k.endswith(".") and key.startswith(k)) for k in FREE):
        return "free"
    if any(key.startswith(k) for k in OPTIMIZER):
        return "optimizer"
    return "identity"


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def resume_changes(saved: dict, now: dict, allow: list[str]) -> tuple[dict, list[str]]:
    """(changes {key: [old, new]}, refusals) between the checkpoint's run record and this run's.

    `saved`/`now` hold the flattened config plus 'base_fingerprint' and 'data_fingerprint'.
    """
    changes, refused = {}, []
    for k in sorted(set(saved) | set(now)):
        old, new = saved.get(k, INTRODUCED.get(k)), now.get(k)
        if old == new:
            continue
        changes[k] = [old, new]
        kind = "identity" if k in ("base_fingerprint", "data_fingerprint") else classify(k)
        if kind == "identity" or (kind == "optimizer" and k not in allow):
            refused.append(k)
    return changes, refused
