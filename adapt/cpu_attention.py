"""Short attention in fp32 when a UNet runs in bf16 or fp16 on a CPU.

PyTorch's CPU flash-attention kernel is slow in half precision at the key lengths a UNet's attention has, above all
its backward (forward alone: 1.0-1.6x fp32's time, so sampling gains nothing here; the recipe and `adapt bench` use this):
cross-attention attends to the prompt's tokens (77 on SD, 32 on the embedded base) and self-attention at low
resolutions to a few hundred pixels. Forward + backward, one thread, ms (AMD EPYC Zen 4 with avx512_bf16;
torch 2.13; the same pattern on 2.14.1 and 2.4):

| (batch, heads, queries, keys, head dim) | fp32 | bf16 | fp16 |
|---|---|---|---|
| (8, 4, 64, 64, 32): embedded base, 8x8 self-attention | 1.10 | 4.42 | 6.90 |
| (8, 4, 16, 32, 32): embedded base, 4x4 cross-attention | 0.25 | 2.09 | 1.18 |
| (4, 8, 1024, 77, 40): SD 1.5 at 256 px, cross-attention | 28.9 | 35.6 | 142.9 |
| (4, 8, 256, 256, 80): SD 1.5 at 256 px, 16x16 self-attention | 31.7 | 35.8 | |
| (4, 8, 512, 512, 40) | 74.2 | 75.0 | |
| (4, 8, 1024, 1024, 40): SD 1.5 at 256 px, 32x32 self-attention | 285 | 241 | |
| (1, 8, 1024, 1024, 40) | 70.7 | | 455 |

So attention in bf16 with fewer than 1024 keys, and all attention in fp16, runs in fp32 here: q, k and v cast up, the
result cast back, and more precise softmax sums besides. Longer bf16 attention, every GPU and every fp32 run are untouched.
`adapt bench` on the embedded base's bf16 training step: 0.165 s -> 0.115-0.122 s (fp32: 0.142-0.147 s);
SD 1.5 at 256 px: 9.02 -> 9.00 s (its attention time is the long 32x32 self-attention, which stays bf16).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0
from torch.overrides import TorchFunctionMode

BF16_FP32_BELOW = 1024  # key length under which fp32 flash attention beats bf16 on CPU (table above)


def _runs_in(q: torch.Tensor) -> torch.dtype:
    """The dtype F.scaled_dot_product_attention computes `q` in: autocast's, when it is on for the CPU."""
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else q.dtype


def faster_in_fp32(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether this CPU attention call is faster upcast to fp32 than in the half precision it would run in."""
    if q.device.type != "cpu":
        return False
    dt = _runs_in(q)
    return dt == torch.float16 or (dt == torch.bfloat16 and k.shape[-2] < BF16_FP32_BELOW)


class _ShortAttentionInFp32(TorchFunctionMode):
    """Passes every call through except scaled_dot_product_attention that `faster_in_fp32`: that one runs on fp32
    copies of its tensors with autocast off (autocast would cast them straight back) and returns the dtype the
    half-precision call would have, so the code around it is unchanged. Backward follows the fp32 call."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention or len(args) < 3 or not faster_in_fp32(args[0], args[1]):
            return func(*args, **kwargs)
        up = lambda x: x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x
        out_dtype = _runs_in(args[0])
        with torch.autocast("cpu", enabled=False):
            out = func(*[up(a) for a in args], **{k: up(v) for k, v in kwargs.items()})
        return out.to(out_dtype)


class CpuHalfAttnProcessor(AttnProcessor2_0):
    """diffusers' default attention processor, with its attention call in fp32 where `faster_in_fp32` says so.

    A subclass rather than a copy: the processor's own code (projections, norms, LoRA layers on to_q/k/v/out)
    runs as diffusers wrote it, inside a mode that swaps only the attention call."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        with _ShortAttentionInFp32():
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)


def apply(unet, device: torch.device | str, dtype: torch.dtype) -> str | None:
    """On a CPU running `unet` in bf16 or fp16 (its weights or autocast's `dtype`), give every attention module that
    uses diffusers' default processor the fp32 one above. Returns a line for the log, or None when nothing applies
    (a GPU, fp32, or no default processors: a custom processor is left as it is)."""
    if torch.device(device).type != "cpu" or dtype not in (torch.bfloat16, torch.float16):
        return None
    mods = [m for m in unet.modules() if type(getattr(m, "processor", None)) is AttnProcessor2_0]
    for m in mods:
        m.set_processor(CpuHalfAttnProcessor())
    if not mods:
        return None
    where = "all of it" if dtype == torch.float16 else f"bf16 with fewer than {BF16_FP32_BELOW} keys"
    return (f"attention: {len(mods)} modules compute attention in fp32 where PyTorch's CPU kernel is slower in half "
            f"precision ({where}; adapt/cpu_attention.py)")
