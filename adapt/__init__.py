"""adapt: adapt a pretrained latent diffusion model to a new image domain with cross-attention LoRA.

Modules: config (typed run configs), model (base loading), data (datasets), cache (latents and
prompt embeddings), objective (strength-window math), lora (adapters and their files), decoder (the
VAE decoder tuned on the domain, shipped as vae/ beside an adapter; `decoder.load(adapter, pipe.vae)`),
checkpoint (resumable state), trainstep (one step's batch and loss), sample (txt2img/img2img),
synth (the procedural benchmark), tiny (offline tiny pipelines), cli (the `adapt` command).
"""

__version__ = "0.1.0"


def quiet() -> None:
    """Silence library progress bars and info chatter; adapt prints its own progress."""
    import os
    import warnings
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    warnings.filterwarnings("ignore", message=".*torchvision.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog
    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
