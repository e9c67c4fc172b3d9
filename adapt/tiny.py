"""Tiny Stable-Diffusion-style pipelines built offline from configs, for tests and the smoke demo.

Same classes and folder layout as a real checkpoint (UNet2DConditionModel, AutoencoderKL,
CLIPTextModel, CLIPTokenizer, a diffusers scheduler), only small and randomly initialised
with a fixed seed. `save_tiny_pipeline` writes a diffusers folder that `adapt.model.load_base`
reads through the same path as a downloaded model.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from adapt.model import write_bpe_files, write_portable

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP byte -> printable unicode table (Radford et al. 2019), in byte order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


def build_tokenizer(words: list[str], max_length: int = 77) -> CLIPTokenizer:
    """A CLIP BPE tokenizer built in memory whose vocabulary is the 512 byte symbols plus `words`.

    Like the real CLIP vocabulary, every string still tokenizes (byte fallback); the listed
    words become single tokens through a chain of merges ("r e" -> "re", "re d</w>" -> "red</w>").
    """
    chars = _bytes_to_unicode()
    vocab: dict[str, int] = {}
    for tok in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(tok, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in sorted(set(w.lower() for w in words)):
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        left = symbols[0]
        for right in symbols[1:]:
            pair = (left, right)
            if pair not in merges:
                merges.append(pair)
            left = left + right
            vocab.setdefault(left, len(vocab))
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    # Through files, as a downloaded tokenizer loads: transformers 5 also takes vocab/merges in memory, 4.x does not.
    with tempfile.TemporaryDirectory() as d:
        write_bpe_files(d, vocab, merges)
        return CLIPTokenizer.from_pretrained(d, model_max_length=max_length, bos_token=BOS, eos_token=EOS,
                                             pad_token=EOS, unk_token=EOS)


TINY_WORDS = ["a", "photo", "of", "face", "with", "wearing", "sunglasses", "red", "blue", "hair", "background"]


def build_tiny_components(seed: int = 0, prediction_type: str = "epsilon", words: list[str] | None = None) -> dict:
    """Random-weight components of a tiny SD-style pipeline: 64 px images, 8x8x4 latents."""
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(words or TINY_WORDS, max_length=32)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=32, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, projection_dim=32))
    vae = AutoencoderKL(  # 4 blocks -> downsampling factor 8, as in SD
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=4, sample_size=64, scaling_factor=0.5)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
                safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def save_tiny_pipeline(path: str | Path, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """Write a tiny StableDiffusionPipeline folder (diffusers layout, safetensors) to `path`."""
    pipe = StableDiffusionPipeline(**build_tiny_components(seed, prediction_type))
    pipe.save_pretrained(path, safe_serialization=True)
    write_portable(path)
    return Path(path)


def build_tiny_sdxl_components(seed: int = 0) -> dict:
    """Random-weight components of a tiny SDXL-style pipeline: two text encoders, pooled embeddings, time ids."""
    from diffusers import EulerDiscreteScheduler
    from transformers import CLIPTextModelWithProjection
    torch.manual_seed(seed)
    tok = build_tokenizer(TINY_WORDS, max_length=32)
    tok2 = build_tokenizer(TINY_WORDS, max_length=32)
    common = dict(vocab_size=len(tok), intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=32, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id)
    te1 = CLIPTextModel(CLIPTextConfig(hidden_size=32, projection_dim=32, **common))
    # Different widths, as in SDXL (768 / 1280): diffusers' single-file loader tells the encoders apart by width.
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=48, projection_dim=48, **common))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16, 16),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=1, norm_num_groups=4, sample_size=64, scaling_factor=0.13025)
    unet = UNet2DConditionModel(  # cross_attention_dim = 32 + 48 (both encoders' hidden states concatenated)
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=80, attention_head_dim=8, norm_num_groups=8, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=48 + 6 * 8, transformer_layers_per_block=1)
    scheduler = EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading", steps_offset=1)
    return dict(unet=unet, vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok2, scheduler=scheduler)


def save_tiny_sdxl_pipeline(path: str | Path, seed: int = 0) -> Path:
    from diffusers import StableDiffusionXLPipeline
    StableDiffusionXLPipeline(**build_tiny_sdxl_components(seed)).save_pretrained(path, safe_serialization=True)
    write_portable(path)
    return Path(path)
