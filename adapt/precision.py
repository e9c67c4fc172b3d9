"""The precision a training run computes in: `train.mixed_precision` and `model.dtype` = auto made concrete.

auto trains in bf16 (frozen weights bf16, autocast bf16, LoRA and optimizer state fp32) where bf16 was measured to
pay without costing quality, and in fp32 elsewhere:
- a CUDA GPU with bf16 (Ampere or newer): the usual choice for LoRA training; fp16 GPUs (T4, V100) stay fp32,
  since the SD VAEs overflow in fp16 (say train.mixed_precision=fp16 to choose it anyway);
- a CPU with native bf16 dot products (x86 `avx512_bf16` or `amx_bf16` in /proc/cpuinfo). On an AMD EPYC Zen 4
  bf16 trained SD 1.5's step 1.8x faster than fp32 (`adapt bench`, 256 px, batch 4, 1 thread) and the embedded
  base's 1.2-1.3x (64 px, batch 8; short attention in fp32, adapt/cpu_attention.py), with the loss within 0.2% of
  fp32's and the demo's evaluation unchanged. Where bf16 is emulated (a Xeon without the flag: bf16 torch.mm 0.64x
  fp32) it is slower, so auto keeps fp32 there. A flag, not a timing, decides: the same machine always decides
  the same way.
- MPS and anything else: fp32.
One auto follows the other where only one is given (model.dtype=bfloat16 -> bf16 autocast; train.mixed_precision=bf16
-> bf16 weights), a resumed run keeps the precision its checkpoint trained in, and `accelerate launch
--mixed_precision fp16|bf16` (or an accelerate config that says so) is followed where both are auto and the device
computes that type in hardware; the log says when it is not used, and why.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
HALF = {"float16": "fp16", "bfloat16": "bf16"}
WEIGHTS = {"no": "float32", "fp16": "float16", "bf16": "bfloat16"}


@dataclass(frozen=True)
class Precision:
    mixed_precision: str  # no | fp16 | bf16: accelerate's autocast
    dtype: str            # float32 | float16 | bfloat16: the frozen weights
    why: str              # how auto decided, for the log ("" when both were given)


def cpu_bf16_flag(cpuinfo: str | Path = "/proc/cpuinfo") -> str | None:
    """The native-bf16 flag this CPU reports, or None (no such flag, or no /proc/cpuinfo: macOS, Windows)."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return None
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[-1].split())
    return next((f for f in NATIVE_BF16_FLAGS if f in flags), None)


def choose(mixed_precision: str, dtype: str, device_type: str, cuda_bf16: bool = False, cpu_flag: str | None = None,
           checkpoint: tuple[str, str] | None = None, launcher: str | None = None) -> Precision:
    """Concrete (mixed_precision, dtype) for the run's config values, which may be 'auto'.

    device_type: 'cuda', 'cpu', 'mps', ...; cuda_bf16: torch.cuda.is_bf16_supported(); cpu_flag: cpu_bf16_flag();
    checkpoint: the (train.mixed_precision, model.dtype) a resumed checkpoint trained in; launcher: what
    `accelerate launch --mixed_precision` (or the accelerate config) asked for (ACCELERATE_MIXED_PRECISION).
    """
    # diffusers' examples teach `accelerate launch --mixed_precision fp16 <script>`. Its default is "no", so only a
    # half type says that someone asked: auto follows it, and a config value that differs is kept and says so.
    asked = launcher if launcher in ("fp16", "bf16") else None
    p = _choose(mixed_precision, dtype, device_type, cuda_bf16, cpu_flag, checkpoint, asked)
    if asked and p.mixed_precision != asked:
        decided = (f"train.mixed_precision={mixed_precision} decides" if mixed_precision != "auto" else
                   f"model.dtype={dtype} decides" if dtype != "auto" else
                   "the resumed checkpoint's precision decides" if checkpoint is not None else
                   f"this {'GPU' if device_type == 'cuda' else 'CPU'} has no {asked} in hardware "
                   f"(train.mixed_precision={asked} forces it)" if device_type in ("cuda", "cpu") else
                   f"auto trains in fp32 on {device_type} (train.mixed_precision={asked} forces it)")
        note = f"accelerate launch's --mixed_precision {asked} is not used: {decided}"
        p = Precision(p.mixed_precision, p.dtype, f"{p.why}; {note}" if p.why else note)
    return p


def _choose(mixed_precision, dtype, device_type, cuda_bf16, cpu_flag, checkpoint, asked) -> Precision:
    if mixed_precision != "auto" and dtype != "auto":
        return Precision(mixed_precision, dtype, "")
    if mixed_precision != "auto":  # the weights follow the autocast type (no re-cast of every weight each step)
        return Precision(mixed_precision, WEIGHTS[mixed_precision], f"model.dtype=auto: as train.mixed_precision={mixed_precision}")
    if dtype != "auto":  # half weights want the same autocast; fp32 weights mean fp32
        mp = HALF.get(dtype, "no")
        return Precision(mp, dtype, f"train.mixed_precision=auto: as model.dtype={dtype}")
    if checkpoint is not None:
        return Precision(*checkpoint, "auto: as the resumed checkpoint trained")
    native = {"fp16": device_type == "cuda", "bf16": (device_type == "cuda" and cuda_bf16) or (device_type == "cpu" and cpu_flag)}
    if asked and native[asked]:  # where it is emulated (fp16 on a CPU: 0.013x fp32 matmul on a Xeon) auto decides below
        return Precision(asked, WEIGHTS[asked], f"auto: as accelerate launch --mixed_precision {asked}")
    if device_type == "cuda" and cuda_bf16:
        return Precision("bf16", "bfloat16", "auto: this GPU computes in bf16")
    if device_type == "cuda":
        return Precision("no", "float32", "auto: this GPU has no bf16 (fp16 overflows the SD VAEs; "
                                          "train.mixed_precision=fp16 to choose it)")
    if device_type == "cpu" and cpu_flag:
        return Precision("bf16", "bfloat16", f"auto: this CPU has native bf16 dot products ({cpu_flag})")
    if device_type == "cpu":
        return Precision("no", "float32", "auto: this CPU has no native bf16 (bf16 is emulated, slower than fp32)")
    return Precision("no", "float32", f"auto: fp32 on {device_type}")


def cuda_native_bf16(device) -> bool:
    """Whether this CUDA device computes bf16 in hardware: compute capability 8.0 or newer (Ampere), or any ROCm GPU.

    Not torch.cuda.is_bf16_supported(): by default it also answers True where bf16 tensors merely can be made
    (a T4 or V100 emulates bf16 matmuls, several times slower than fp32), so auto would pick the slow path there.
    """
    import torch
    if torch.version.hip:
        return True
    return torch.cuda.get_device_properties(device).major >= 8


def for_device(mixed_precision: str, dtype: str, device, checkpoint: tuple[str, str] | None = None) -> Precision:
    """choose() for a torch.device, reading this machine's GPU or CPU and what accelerate's launcher asked for."""
    import os
    cuda_bf16 = device.type == "cuda" and cuda_native_bf16(device)
    flag = cpu_bf16_flag() if device.type == "cpu" else None
    return choose(mixed_precision, dtype, device.type, cuda_bf16, flag, checkpoint,
                  os.environ.get("ACCELERATE_MIXED_PRECISION"))


def label(mixed_precision: str, dtype: str) -> str:
    """What a run computes in, in words: 'bf16', 'fp32', 'bf16 weights, no autocast', 'bf16 autocast, fp32 weights'."""
    weights = HALF.get(dtype, "fp32")
    if mixed_precision == "no":
        return "fp32" if dtype == "float32" else f"{weights} weights, no autocast"
    return mixed_precision if weights == mixed_precision else f"{mixed_precision} autocast, {weights} weights"


def describe(p: Precision) -> str:
    """The log's precision line: what is in force and, when auto decided, why."""
    return f"precision: {label(p.mixed_precision, p.dtype)}" + (f" ({p.why})" if p.why else "")


def gpu_note(p: Precision, native_bf16: bool) -> str:
    """describe() on a CUDA GPU; where bf16 was chosen on a GPU that only emulates it (T4, V100), says so and what is
    fast there."""
    if native_bf16 or "bf16" not in (p.mixed_precision, HALF.get(p.dtype)):
        return describe(p)
    return describe(p) + ("; this GPU has no bf16 in hardware (before Ampere), so bf16 runs emulated, slower than fp32: "
                          "train.mixed_precision=fp16 model.dtype=float16 is its fast path, auto trains in fp32")


def cpu_note(p: Precision, bf16_speed: float, fp16_speed: float | None = None) -> str:
    """describe() on a CPU, with this CPU's measured bf16/fp32 matmul ratio (fp16/fp32 when fp16 was chosen) and the
    settings for the other precision when it is likely faster here."""
    if p.mixed_precision == "fp16" and fp16_speed is not None:
        line = describe(p) + f"; this CPU's fp16 matmul runs {fp16_speed:.1f}x fp32"
        return line + ("; fp32 (model.dtype=float32 train.mixed_precision=no) is likely faster here" if fp16_speed < 1.0 else "")
    line = describe(p) + f"; this CPU's bf16 matmul runs {bf16_speed:.1f}x fp32"
    if p.mixed_precision == "no" and bf16_speed >= 1.5:
        return line + ("; model.dtype=bfloat16 train.mixed_precision=bf16 is likely faster (on such a CPU: SD 1.5 1.8x "
                       "per step, the embedded base 1.1-1.3x; loss within 0.2%)")
    if p.mixed_precision == "bf16" and bf16_speed < 1.0:
        return line + "; fp32 (model.dtype=float32 train.mixed_precision=no) is likely faster here"
    return line
