"""adapt/cpu_attention.py: short attention runs in fp32 when a UNet runs in bf16 or fp16 on a CPU."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from adapt import cpu_attention, lora, model


class _Kernels(TorchDispatchMode):
    """Records (dtype, key length) of every aten attention kernel that runs, forward and backward."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "scaled_dot_product" in func.__name__ and "backward" not in func.__name__:
            self.seen.append((args[0].dtype, args[1].shape[-2]))
        return func(*args, **(kwargs or {}))


def _qkv(dtype, keys=77, q=64):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 4, n, 32, generator=g).to(dtype) for n in (q, keys, keys)]


def test_the_rule_follows_the_measured_table():
    q, k, _ = _qkv(torch.bfloat16)
    assert cpu_attention.faster_in_fp32(q, k)  # bf16, 77 keys: fp32 flash is faster
    q, k_long, _ = _qkv(torch.bfloat16, keys=1024)
    assert not cpu_attention.faster_in_fp32(q, k_long)  # bf16 wins from ~1024 keys
    assert cpu_attention.faster_in_fp32(*_qkv(torch.float16, keys=4096)[:2])  # fp16 is slower at every length
    q32, k32, _ = _qkv(torch.float32)
    assert not cpu_attention.faster_in_fp32(q32, k32)
    with torch.autocast("cpu", torch.bfloat16):  # fp32 tensors that autocast would run in bf16
        assert cpu_attention.faster_in_fp32(q32, k32)
        assert not cpu_attention.faster_in_fp32(q32, _qkv(torch.float32, keys=2048)[1])


@pytest.mark.parametrize("dtype,autocast", [(torch.bfloat16, False), (torch.float32, True), (torch.float16, False)])
def test_the_mode_runs_short_attention_in_fp32_and_returns_the_dtype_the_caller_expects(dtype, autocast):
    q, k, v = _qkv(dtype)
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        plain = F.scaled_dot_product_attention(q, k, v)
        with _Kernels() as rec, cpu_attention._ShortAttentionInFp32():
            out = F.scaled_dot_product_attention(q, k, v)
    assert rec.seen == [(torch.float32, 77)]
    assert out.dtype == plain.dtype == (torch.bfloat16 if autocast else dtype)
    exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    assert (out.float() - exact).abs().max() <= (plain.float() - exact).abs().max() + 1e-6  # no less precise
    long = _qkv(torch.bfloat16, keys=1024)
    with _Kernels() as rec, cpu_attention._ShortAttentionInFp32():
        F.scaled_dot_product_attention(*long)
    assert rec.seen == [(torch.bfloat16, 1024)]  # long bf16 attention is left to bf16
    with _Kernels() as rec, cpu_attention._ShortAttentionInFp32():
        F.scaled_dot_product_attention(query=q, key=k, value=v)  # tensors by keyword: passed through as called
    assert rec.seen == [(dtype, 77)]


def _bf16_unet(tiny_base):
    pipe, _ = model.load_base(str(tiny_base), torch_dtype="bfloat16")
    unet = pipe.unet
    lora.attach(unet, "cross_attn", rank=4)
    g = torch.Generator().manual_seed(1)
    for n, p in unet.named_parameters():
        if "lora_B" in n:  # a non-zero adapter, so the LoRA path is in the output
            p.data = torch.randn(p.shape, generator=g) * 0.05
    cfg = unet.config
    z = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    emb = torch.randn(2, 8, cfg.cross_attention_dim, generator=g)
    return unet, z, emb


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_bf16_unet_on_cpu_trains_with_its_attention_in_fp32(tiny_base, checkpointing):
    unet, z, emb = _bf16_unet(tiny_base)
    if checkpointing:  # the backward recomputes each block's forward: its attention must take the fp32 path again
        unet.enable_gradient_checkpointing()
        unet.train()
    t = torch.tensor([10, 500])
    with torch.autocast("cpu", torch.bfloat16):
        before = unet(z.bfloat16(), t, emb.bfloat16()).sample.float()
    n_attn = sum(1 for m in unet.modules() if hasattr(m, "processor"))
    line = cpu_attention.apply(unet, "cpu", torch.bfloat16)
    assert line.startswith(f"attention: {n_attn} modules compute attention in fp32")
    with _Kernels() as rec, torch.autocast("cpu", torch.bfloat16):
        out = unet(z.bfloat16(), t, emb.bfloat16()).sample.float()
        out.pow(2).mean().backward()
    assert len(rec.seen) == n_attn * (2 if checkpointing else 1) and {d for d, _ in rec.seen} == {torch.float32}
    assert (out - before).abs().max() <= 0.05 * before.abs().max()  # the same model, attention in more precision
    grads = [p.grad for n, p in unet.named_parameters() if "lora_" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_apply_leaves_fp32_gpus_and_custom_processors_alone(tiny_base):
    from diffusers.models.attention_processor import AttnProcessor
    unet, _, _ = _bf16_unet(tiny_base)
    assert cpu_attention.apply(unet, "cpu", torch.float32) is None
    assert cpu_attention.apply(unet, "cuda", torch.bfloat16) is None
    assert all(type(p).__name__ == "AttnProcessor2_0" for p in unet.attn_processors.values())
    unet.set_attn_processor(AttnProcessor())  # a user's choice of processor stays
    assert cpu_attention.apply(unet, "cpu", torch.bfloat16) is None
    assert all(type(p) is AttnProcessor for p in unet.attn_processors.values())
