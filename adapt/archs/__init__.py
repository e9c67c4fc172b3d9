"""Published Stable Diffusion architectures (UNet configs as JSON, VAE/text configs in code), random weights.

Used by tests and `adapt bench` to exercise the real shapes without downloading a checkpoint.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import torch

HERE = Path(__file__).parent


@contextmanager
def _created_in(dtype):
    """Modules built inside allocate their random weights in `dtype`, not in fp32 to be cast after: the peak
    memory never holds an fp32 copy (SD 1.5 in bf16: 2.4 instead of 4.5 GB on the host)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def unet_config(name: str) -> dict:
    """'sd15' | 'sd21' | 'sdxl' UNet config, as published in the models' unet/config.json."""
    return json.loads((HERE / f"{name}_unet.json").read_text())


def build_sd15_pipeline(seed: int = 0, dtype=torch.float32):
    """StableDiffusionPipeline with SD 1.5's UNet, VAE and CLIP ViT-L/14 text encoder shapes, random weights."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from adapt.tiny import TINY_WORDS, build_tokenizer
    torch.manual_seed(seed)
    with _created_in(dtype):
        unet = UNet2DConditionModel.from_config(unet_config("sd15"))
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            layers_per_block=2, norm_num_groups=32, sample_size=512, scaling_factor=0.18215)
        text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                                            projection_dim=768))
    tok = build_tokenizer(TINY_WORDS, max_length=77)  # ids stay below CLIP's 49,408; the real merges are not needed for timing
    sched = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False).to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_sdxl_pipeline(seed: int = 0, dtype=torch.float32, device: str = "cpu"):
    """StableDiffusionXLPipeline with SDXL's UNet, VAE, CLIP ViT-L and OpenCLIP bigG shapes, random weights.

    About 3.5 B parameters: build it on a GPU (`device="cuda"`) where one is available; on CPU it takes minutes.
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from adapt.tiny import TINY_WORDS, build_tokenizer
    torch.manual_seed(seed)
    with torch.device(device), _created_in(dtype):
        unet = UNet2DConditionModel.from_config(unet_config("sdxl"))
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            layers_per_block=2, norm_num_groups=32, sample_size=1024, scaling_factor=0.13025,
                            force_upcast=True)
        te1 = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                           num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                                           projection_dim=768))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=49408, hidden_size=1280, intermediate_size=5120,
                                                         num_hidden_layers=32, num_attention_heads=20, max_position_embeddings=77,
                                                         hidden_act="gelu", projection_dim=1280))
    tok = build_tokenizer(TINY_WORDS, max_length=77)
    sched = EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   timestep_spacing="leading", steps_offset=1)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok,
                                     unet=unet, scheduler=sched).to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe
