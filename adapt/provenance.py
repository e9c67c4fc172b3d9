"""How each sampled image was made, written into the image itself.

`adapt sample` writes two PNG text chunks into every output:
- "parameters": the AUTOMATIC1111 WebUI infotext, what WebUI's PNG Info tab, civitai and image browsers read:
  the prompt (with a `<lora:NAME:SCALE>` tag per adapter, as WebUI writes them), then one line
  "Steps: 25, Sampler: DDIM, CFG scale: 1.0, Seed: 3, Size: 64x64, Model: ..., Denoising strength: 0.4, ...".
  "Lora hashes" are the first 12 hex digits of the sha256 of the safetensors tensor data after the header
  (kohya's "addnet" hash, the one WebUI computes for a LoRA file).
- "adapt": the exact record, a versioned `SampleRecord` as JSON: the source image (path and sha256), the image's
  own seed, every setting, each adapter's weights sha256 and scale, the edit mask, the decoder, device and dtype.

Image i of one call is seeded seed + i (`sample.img2img`, `masking.auto_mask`), so `reproduce_command` (what
`adapt inspect OUTPUT.png` prints) makes the same image again from its source alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

RECORD_VERSION = 1
KEY = "adapt"  # the PNG text chunk holding the record
# adapt's scheduler names -> WebUI's sampler names (the same samplers; WebUI's "Schedule type" stays its default)
SAMPLER_NAMES = {"ddim": "DDIM", "ddpm": "DDPM", "euler": "Euler", "pndm": "PLMS", "dpm": "DPM++ 2M"}


class ProvenanceError(ValueError):
    """An image's 'adapt' record is unreadable or newer than this adapt; the message names the file."""


@dataclass
class AdapterUse:
    path: str  # as given to `adapt sample --adapter`
    sha256: str  # of the weights file (lora.weights_sha256): which adapter, even if the path now holds another
    scale: float
    short_hash: str  # WebUI's LoRA hash (addnet_hash)


@dataclass
class MaskUse:
    source: str  # "auto" (the adapter's own edit mask, adapt.masking) or the mask image's path
    area: float  # share of the latent redrawn, in [0, 1]
    settings: dict = field(default_factory=dict)  # MaskSettings fields (timestep, draws, threshold, ...)


@dataclass
class SampleRecord:
    """One output image: enough to make it again. Written by `adapt sample`, read by `adapt inspect`."""
    kind: str  # "img2img" or "txt2img"
    prompt: str
    seed: int  # this image's own seed (the call's --seed + its index)
    steps: int
    scheduler: str
    guidance: float
    width: int
    height: int
    resolution: int  # the pixel budget the source was sized to (--resolution): about resolution² pixels, its aspect kept
    base: str  # as given (or recommended); base_resolved says what was loaded
    base_resolved: str
    adapters: list = field(default_factory=list)  # [AdapterUse]
    strength: Optional[float] = None  # img2img only
    source: Optional[str] = None  # img2img: the input image's path as given
    source_sha256: Optional[str] = None
    mask: Optional[MaskUse] = None
    decoder: Optional[str] = None  # the adapter's tuned VAE decoder folder (adapt.decoder), when one decoded the image
    fused: bool = True
    device: str = "cpu"
    dtype: str = "float32"
    adapt_version: str = ""
    version: int = RECORD_VERSION

    def __post_init__(self):
        self.adapters = [a if isinstance(a, AdapterUse) else AdapterUse(**a) for a in self.adapters]
        if isinstance(self.mask, dict):
            self.mask = MaskUse(**self.mask)
        if self.kind not in ("img2img", "txt2img"):
            raise ProvenanceError(f"kind must be 'img2img' or 'txt2img', got {self.kind!r}")
        if self.kind == "img2img" and (self.source is None or self.strength is None):
            raise ProvenanceError("an img2img record needs its source image and strength")
        if self.steps < 1 or self.width < 1 or self.height < 1:
            raise ProvenanceError(f"steps, width and height must be >= 1, got {self.steps}, {self.width}, {self.height}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, raw: str, where: str = "image") -> "SampleRecord":
        try:
            d = json.loads(raw)
        except ValueError as e:
            raise ProvenanceError(f"{where}: the '{KEY}' record is not JSON ({e})") from e
        if not isinstance(d, dict) or not isinstance(d.get("version"), int):
            raise ProvenanceError(f"{where}: the '{KEY}' record has no version")
        if d["version"] > RECORD_VERSION:
            raise ProvenanceError(f"{where}: record version {d['version']} is newer than this adapt reads "
                                  f"({RECORD_VERSION}); upgrade adapt")
        try:
            return cls(**d)
        except TypeError as e:
            raise ProvenanceError(f"{where}: the '{KEY}' record is malformed ({e})") from e


def file_sha256(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def addnet_hash(path: str | Path) -> str:
    """WebUI's short hash of a LoRA safetensors file: sha256 of everything after the header, 12 hex digits
    (sd-scripts' addnet_hash_safetensors; the header is skipped so that editing metadata keeps the hash)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        f.seek(8 + n)
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


def lora_name(path: str) -> str:
    """The name WebUI would list the adapter under: a file's stem, or a folder's name."""
    p = Path(path)
    return p.stem if p.suffix == ".safetensors" else p.name


def _quote(v) -> str:
    """A WebUI infotext value: quoted (JSON string) when it holds a separator, as WebUI itself quotes."""
    s = str(v)
    return json.dumps(s) if any(c in s for c in ',:"\n') else s


def infotext(rec: SampleRecord) -> str:
    """The WebUI "parameters" text of a record."""
    tags = "".join(f" <lora:{lora_name(a.path)}:{a.scale:g}>" for a in rec.adapters)
    params = {"Steps": rec.steps, "Sampler": SAMPLER_NAMES.get(rec.scheduler, rec.scheduler), "CFG scale": f"{rec.guidance:g}",
              "Seed": rec.seed, "Size": f"{rec.width}x{rec.height}", "Model": lora_name(rec.base)}
    if rec.strength is not None:
        params["Denoising strength"] = f"{rec.strength:g}"
    if rec.adapters:
        params["Lora hashes"] = ", ".join(f"{lora_name(a.path)}: {a.short_hash}" for a in rec.adapters)
    if rec.mask is not None:
        params["adapt mask"] = f"{rec.mask.source}, area {rec.mask.area:.0%}"
    params["Version"] = f"adapt {rec.adapt_version}"
    return rec.prompt + tags + "\n" + ", ".join(f"{k}: {_quote(v)}" for k, v in params.items())


def png_info(rec: SampleRecord):
    """PIL PngInfo with the "parameters" and "adapt" chunks (iTXt when the text is not Latin-1)."""
    from PIL.PngImagePlugin import PngInfo
    info = PngInfo()
    info.add_itxt("parameters", infotext(rec))
    info.add_itxt(KEY, rec.to_json())
    return info


def read(path: str | Path) -> Optional[SampleRecord]:
    """The record in an image written by `adapt sample`; None for an image without one."""
    from PIL import Image
    with Image.open(path) as im:
        raw = im.info.get(KEY)
    return None if raw is None else SampleRecord.from_json(raw, str(path))


def reproduce_command(rec: SampleRecord) -> str:
    """The `adapt sample` command that makes this image again (alone, from its own seed)."""
    cmd = ["adapt", "sample", "--base", rec.base]
    for a in rec.adapters:
        cmd += ["--adapter", a.path]
    if rec.adapters:
        cmd += ["--scale", *[f"{a.scale:g}" for a in rec.adapters]]
    cmd += ["--prompt", rec.prompt.replace("{", "{{").replace("}", "}}"),  # a literal prompt: no {caption} expansion
            "--steps", str(rec.steps), "--scheduler", rec.scheduler, "--guidance", f"{rec.guidance:g}",
            "--seed", str(rec.seed), "--device", rec.device, "--dtype", rec.dtype]
    if rec.kind == "img2img":
        cmd += ["--image", rec.source, "--strength", f"{rec.strength:g}"]
    else:
        cmd += ["--num-images", "1"]
    cmd += ["--resolution", str(rec.resolution)]
    if rec.mask is not None:
        cmd += ["--mask", rec.mask.source]
        s = rec.mask.settings
        if rec.mask.source == "auto":
            cmd += ["--mask-timestep", str(s["timestep"]), "--mask-draws", str(s["draws"]), "--mask-threshold",
                    f"{s['threshold']:g}", "--mask-close", str(s["close"]), "--mask-dilate", str(s["dilate"])]
        cmd += ["--mask-blur", f"{s['blur']:g}"] + ([] if s["paste"] else ["--no-paste"])
    if rec.adapters and rec.decoder is None:
        cmd += ["--base-decoder"]
    if rec.adapters and not rec.fused:
        cmd += ["--no-fuse"]
    return " ".join(shlex.quote(c) for c in cmd)

