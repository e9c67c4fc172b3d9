"""Loading a base model: embedded name, diffusers folder, hub id or single-file checkpoint.

One entry point, `load_base`, returns the pipeline's components plus the facts the recipe
needs (prediction type, latent scale/shift, timesteps, text width, SD vs SDXL). Every form
goes through diffusers' own loaders, so the embedded base takes the same path as a download.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from adapt import atomic

ZOO = Path(__file__).parent / "zoo"
EMBEDDED_PREFIX = "adapt:"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def dtype_kw(dtype) -> dict:
    """`dtype=` for diffusers' from_pretrained / from_single_file: diffusers 0.40 renamed `torch_dtype` (kept,
    deprecated) and earlier releases ignore an unknown `dtype=` without a word, loading fp32."""
    import diffusers
    major, minor = (int(x) for x in diffusers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (0, 40) else {"torch_dtype": dtype}


def write_bpe_files(folder: str | Path, vocab: dict, merges: list) -> None:
    """vocab.json + merges.txt, the CLIP/GPT-2 BPE files every transformers version reads; merges as (a, b) or "a b"."""
    lines = "".join((m if isinstance(m, str) else " ".join(m)) + "\n" for m in merges)
    atomic.write_bytes(Path(folder) / "vocab.json", json.dumps(vocab, ensure_ascii=False).encode("utf-8"))
    atomic.write_bytes(Path(folder) / "merges.txt", ("#version: 0.2\n" + lines).encode("utf-8"))


def write_portable(folder: str | Path) -> list[str]:
    """Make a pipeline folder saved by transformers 5 load the same in transformers 4.x; returns what it changed.

    transformers 5 saves a CLIP tokenizer as tokenizer.json alone, and a `CLIPTextModel`'s weights without their
    `text_model.` prefix. transformers 4.x builds `CLIPTokenizer` (the class model_index.json names) only from
    vocab.json + merges.txt, and loads unprefixed weights as *missing*: a random text encoder, with only a warning.
    SD checkpoints ship both files and the prefix, which transformers 5 reads too, so adapt writes that layout.
    """
    from safetensors import safe_open
    changed = []
    for tj in sorted(Path(folder).glob("tokenizer*/tokenizer.json")):
        bpe = json.loads(tj.read_text(encoding="utf-8"))["model"]
        if ((tj.parent / "vocab.json").exists() and (tj.parent / "merges.txt").exists()) or bpe.get("type") != "BPE":
            continue
        write_bpe_files(tj.parent, bpe["vocab"], bpe["merges"])
        changed.append(f"{tj.parent.name}: vocab.json, merges.txt")
    keep = ("text_model.", "text_projection.")
    for w in sorted(Path(folder).glob("text_encoder*/model.safetensors")):
        with safe_open(str(w), "pt") as f:
            meta, keys = f.metadata(), list(f.keys())
            if all(k.startswith(keep) for k in keys):
                continue
            tensors = {(k if k.startswith(keep) else "text_model." + k): f.get_tensor(k) for k in keys}
        atomic.write_safetensors(tensors, w, meta)
        changed.append(f"{w.parent.name}: text_model. prefix")
    return changed


class ModelError(ValueError):
    """The base model cannot be found or is not a usable diffusion pipeline; the message says which."""


WEIGHTED = ("unet", "vae", "text_encoder", "text_encoder_2")
# diffusers renames these on load (VAE attention saved before diffusers 0.14): the loaded name -> the stored one.
_DEPRECATED_ATTENTION = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}


def _weight_files(folder: Path, variant: str | None) -> list[Path]:
    """The .safetensors files a component's loader reads: `<name>[.variant][-0000k-of-0000n].safetensors`."""
    names = re.compile(r"(model|diffusion_pytorch_model)(\.(?P<v>[\w]+))?(-\d+-of-\d+)?\.safetensors")
    by_variant: dict[str | None, list[Path]] = {}
    for p in sorted(folder.glob("*.safetensors")):
        m = names.fullmatch(p.name)
        if m:
            by_variant.setdefault(m["v"], []).append(p)
    return by_variant.get(variant) or by_variant.get(None, [])


def verify_weights(module: torch.nn.Module, folder: str | Path, variant: str | None = None) -> None:
    """Raise ModelError unless every parameter of `module` holds the value stored in `folder`'s safetensors files.

    diffusers and transformers fill a weight they do not find in a checkpoint with random values and only log a
    warning (which adapt.quiet() silences): a UNet missing one norm, or a text encoder saved by transformers 5
    (without its `text_model.` prefix) read by transformers 4.x, loads as a model that was never trained. The
    check reads one row of each stored tensor (the header and a few KB, not the weights again). A folder with no
    safetensors files (pickle .bin only) is not checked.
    """
    from safetensors import safe_open
    folder = Path(folder)
    files = _weight_files(folder, variant)
    if not files:
        return
    where = {}
    for f in files:
        with safe_open(str(f), "pt") as h:
            where.update({k: f for k in h.keys()})
    text = type(module).__module__.startswith("transformers")
    prefix = "text_model."  # CLIP's: transformers 5 names parameters without it and reads keys with or without it

    def stored_name(name: str) -> str | None:
        candidates = [name]
        if text:
            candidates.append(name.removeprefix(prefix) if name.startswith(prefix) else prefix + name)
        for new, old in _DEPRECATED_ATTENTION.items():
            candidates += [c.replace(new, old) for c in list(candidates) if new in c]
        return next((c for c in candidates if c in where), None)

    missing, differ = [], []
    handles = {}
    try:
        for name, p in module.named_parameters():
            key = stored_name(name)
            if key is None:
                missing.append(name)
                continue
            if where[key] not in handles:
                handles[where[key]] = safe_open(str(where[key]), "pt")
            h = handles[where[key]]
            row = h.get_tensor(key) if p.ndim == 0 else h.get_slice(key)[:1]
            mine = p.detach().cpu() if p.ndim == 0 else p.detach()[:1].cpu()
            if row.shape == mine.shape and not torch.equal(row.to(mine.dtype), mine):
                differ.append(name)  # a shape the loader transformed is not compared
    finally:
        handles.clear()
    if not (missing or differ):
        return
    n = sum(1 for _ in module.parameters())
    shown = ", ".join((missing + differ)[:3]) + (", ..." if len(missing) + len(differ) > 3 else "")
    msg = (f"{folder}: {len(missing) + len(differ)} of {type(module).__name__}'s {n} weights were not loaded from "
           f"{', '.join(f.name for f in files)} and hold random values ({shown})")
    import transformers
    if differ and text and not any(k.startswith(prefix) for k in where) and int(transformers.__version__.split(".")[0]) < 5:
        msg += (f". The file's keys lack the `{prefix}` prefix (saved by transformers >= 5), which transformers "
                f"{transformers.__version__} does not map: upgrade transformers, or rewrite the folder in the layout "
                f"every version reads: python -c \"from adapt.model import write_portable; "
                f"write_portable('{folder.parent}')\"")
    elif missing:
        msg += ": the checkpoint lacks them; it is incomplete, or its config.json describes another architecture"
    raise ModelError(msg)


def verify_pipeline(pipe, folder: str | Path, variant: str | None = None) -> None:
    """verify_weights for each weighted component of a pipeline loaded from `folder` (diffusers layout)."""
    for name in WEIGHTED:
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module) and (Path(folder) / name).is_dir():
            verify_weights(module, Path(folder) / name, variant)


@dataclass
class BaseFacts:
    """What the recipe and sampler need to know about a base model."""
    source: str  # as the user gave it
    resolved: str  # the folder, file or hub id actually loaded
    architecture: str  # "sd" or "sdxl"
    prediction_type: str  # "epsilon" | "v_prediction" | "sample"
    scaling_factor: float
    shift_factor: float
    num_train_timesteps: int
    text_hidden_size: int  # cross_attention_dim the UNet expects
    vae_factor: int  # pixels per latent pixel
    latent_channels: int
    sample_size: int  # native resolution in pixels
    size_multiple: int = 8  # pixel sides the UNet takes without padding: VAE factor x 2^(UNet downsamplings)

    def to_dict(self) -> dict:
        return asdict(self)


def embedded_names() -> list[str]:
    return sorted(p.name for p in ZOO.iterdir() if (p / "model_index.json").is_file()) if ZOO.is_dir() else []


def resolve(base: str) -> tuple[str, str]:
    """Return (kind, location): kind is 'folder', 'file' or 'hub'. Raises ModelError with the reason."""
    name = base[len(EMBEDDED_PREFIX):] if base.startswith(EMBEDDED_PREFIX) else base
    if (ZOO / name / "model_index.json").is_file() and not Path(base).exists():
        return "folder", str(ZOO / name)
    if base.startswith(EMBEDDED_PREFIX):
        raise ModelError(f"no embedded model {name!r}; embedded models: {embedded_names()}")
    p = Path(base).expanduser()
    if p.is_dir():
        if not (p / "model_index.json").is_file():
            raise ModelError(f"{p} is a folder but not a diffusers pipeline (no model_index.json)")
        return "folder", str(p)
    if p.is_file():
        if p.suffix in (".ckpt", ".pt", ".pth", ".bin"):
            raise ModelError(f"{p}: pickle checkpoints can run code when loaded; convert it to .safetensors first "
                             "(e.g. load it once in a trusted environment and save with safetensors)")
        if p.suffix != ".safetensors":
            raise ModelError(f"{p}: unsupported single-file format {p.suffix!r}; expected .safetensors")
        return "file", str(p)
    looks_local = base.startswith((".", "/", "~")) or base.count("/") != 1
    if looks_local:
        raise ModelError(f"base model not found: {base!r} is neither an existing path, an embedded model "
                         f"({embedded_names()}), nor a hub id of the form 'org/name'")
    return "hub", base


def single_file_architecture(path: str) -> str:
    """'sdxl' or 'sd' from an original-layout checkpoint's key names (reads the header only)."""
    from safetensors import safe_open
    try:
        with safe_open(path, "pt") as f:
            keys = list(f.keys())
    except Exception as e:
        raise ModelError(f"{path}: not a readable .safetensors file: {e}") from e
    if any(k.startswith("conditioner.embedders.") for k in keys):  # SGM layout: SDXL's two text encoders
        return "sdxl"
    if any(k.startswith(("cond_stage_model.", "model.diffusion_model.")) for k in keys):
        return "sd"
    raise ModelError(f"{path}: no Stable Diffusion keys (model.diffusion_model.*, cond_stage_model.*, "
                     f"conditioner.embedders.*); first keys: {keys[:3]}")


def _pipeline_class(model_index: dict | None, architecture: str | None = None):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    name = (model_index or {}).get("_class_name", "")
    if architecture == "sdxl" or "XL" in name:
        return StableDiffusionXLPipeline
    if name and "StableDiffusion" not in name:
        raise ModelError(f"pipeline class {name!r} is not supported; adapt handles StableDiffusion(XL) pipelines")
    return StableDiffusionPipeline


def load_pipeline(base: str, revision: str | None = None, variant: str | None = None,
                  torch_dtype: torch.dtype | str = torch.float32, architecture: str | None = None, config: str | None = None):
    """Load the base as a diffusers (SD or SDXL) pipeline.

    For single-file checkpoints, `architecture` picks SD or SDXL and `config` (a diffusers folder or hub
    id) supplies the component configs; without it diffusers fetches them from the hub.
    """
    if isinstance(torch_dtype, str):
        torch_dtype = DTYPES[torch_dtype]
    kind, where = resolve(base)
    kw = dict(**dtype_kw(torch_dtype), safety_checker=None, requires_safety_checker=False)
    if kind == "folder":
        index = json.loads((Path(where) / "model_index.json").read_text())
        cls = _pipeline_class(index)
        if cls.__name__.endswith("XLPipeline"):
            kw = dtype_kw(torch_dtype)
        try:
            pipe = cls.from_pretrained(where, variant=variant, **kw)
        except (OSError, ValueError) as e:
            raise ModelError(f"{where}: could not load as {cls.__name__}: {e}") from e
        verify_pipeline(pipe, where, variant)
        return pipe, where
    if kind == "file":
        cls = _pipeline_class(None, architecture or single_file_architecture(where))
        try:
            kw = {"config": config} if config else {}
            pipe = cls.from_single_file(where, **dtype_kw(torch_dtype), **kw)
        except Exception as e:  # diffusers raises many types for unrecognised files
            hint = " (a weight the model needs is missing from the file)" if "meta tensor" in str(e) else ""
            raise ModelError(f"{where}: not a loadable single-file Stable Diffusion checkpoint{hint}: {e}") from e
        # diffusers leaves a text-encoder weight the file lacks on the meta device, to fail at the first prompt
        for name in WEIGHTED:
            module = getattr(pipe, name, None)
            empty = [k for k, p in module.named_parameters() if p.is_meta] if module is not None else []
            if empty:
                raise ModelError(f"{where}: the file holds no value for {len(empty)} of {name}'s weights "
                                 f"({', '.join(empty[:3])}{', ...' if len(empty) > 3 else ''}); the checkpoint is incomplete")
        return pipe, where
    from huggingface_hub import constants
    offline = constants.HF_HUB_OFFLINE
    try:
        from huggingface_hub import hf_hub_download
        index_path = hf_hub_download(where, "model_index.json", revision=revision)
        cls = _pipeline_class(json.loads(Path(index_path).read_text()))
        if cls.__name__.endswith("XLPipeline"):
            kw = dtype_kw(torch_dtype)
        commit = Path(index_path).parent.name  # .../snapshots/<commit>/model_index.json: what was actually loaded
        pipe = cls.from_pretrained(where, revision=revision, variant=variant, **kw)
    except Exception as e:
        if hub_unreachable(e):
            raise ModelError(f"hub id {where!r}: the Hugging Face hub is unreachable (offline={offline}) and the model "
                             f"is not in the local cache; download it where you have network, or pass a local folder") from e
        raise ModelError(f"hub id {where!r}: could not load: {e}") from e
    verify_pipeline(pipe, Path(index_path).parent, variant)
    return pipe, f"{where}@{commit}"


def hub_unreachable(e: Exception) -> bool:
    """Whether a hub lookup failed for want of the hub (offline mode, no network), not for what was asked."""
    from huggingface_hub import constants
    return constants.HF_HUB_OFFLINE or any(w in str(e).lower() for w in ("offline", "connect", "resolve"))


def facts_of(pipe, source: str, resolved: str) -> BaseFacts:
    vae, unet = pipe.vae, pipe.unet
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    return BaseFacts(
        source=source, resolved=resolved,
        architecture="sdxl" if getattr(pipe, "text_encoder_2", None) is not None else "sd",
        prediction_type=pipe.scheduler.config.get("prediction_type", "epsilon"),
        scaling_factor=float(vae.config.scaling_factor),
        shift_factor=float(vae.config.get("shift_factor") or 0.0),
        num_train_timesteps=int(pipe.scheduler.config.num_train_timesteps),
        text_hidden_size=int(unet.config.cross_attention_dim),
        vae_factor=factor, latent_channels=int(vae.config.latent_channels),
        sample_size=int(unet.config.sample_size) * factor,
        size_multiple=factor * 2 ** (len(unet.config.block_out_channels) - 1),
    )


def pick_device(name: str | None = None) -> torch.device:
    """'auto' (or None): cuda, then mps, then cpu. An explicit device this torch cannot use is an error."""
    if name in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ModelError(f"device {name!r}: {e}") from e
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise ModelError(f"device {name!r}: CUDA is not available to this torch ({torch.__version__}, "
                         f"{torch.cuda.device_count()} GPU(s) visible); use --device cpu or install a CUDA build")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ModelError(f"device {name!r}: MPS is not available on this machine")
    return dev


@contextlib.contextmanager
def vae_precision(vae):
    """SDXL's VAE (force_upcast in its config) overflows in fp16, in encoding as in decoding; diffusers' pipelines
    run it in fp32 then, and so does every VAE call of adapt's own (masks, latent blending, features)."""
    dtype = vae.dtype
    upcast = dtype == torch.float16 and bool(vae.config.get("force_upcast", False))
    if upcast:
        vae.to(torch.float32)
    try:
        yield
    finally:
        if upcast:
            vae.to(dtype)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto': float16 on a GPU (sampling only; training keeps LoRA in fp32), float32 on CPU."""
    if name == "auto":
        return torch.float16 if device.type in ("cuda", "mps") else torch.float32
    if name not in DTYPES:
        raise ModelError(f"dtype {name!r}: expected auto or one of {sorted(DTYPES)}")
    return DTYPES[name]


def unet_config(base: str, revision: str | None = None) -> dict:
    """The UNet config of a base (folder, embedded name or cached hub id), without loading any weights."""
    kind, where = resolve(base)
    try:
        if kind == "folder":
            return json.loads((Path(where) / "unet" / "config.json").read_text())
        if kind == "hub":
            from huggingface_hub import hf_hub_download
            return json.loads(Path(hf_hub_download(where, "unet/config.json", revision=revision)).read_text())
    except Exception as e:
        raise ModelError(f"{base}: no readable unet/config.json ({type(e).__name__}: {e})") from e
    raise ModelError(f"{base}: a single-file checkpoint carries no UNet config; name its family instead "
                     "(--architecture sd15|sd21|sdxl) or pass its diffusers folder")


def load_base(base: str, revision: str | None = None, variant: str | None = None,
              torch_dtype: torch.dtype | str = torch.float32, vae: str | None = None, architecture: str | None = None,
              config: str | None = None):
    """(pipeline, BaseFacts) for a base given as embedded name, folder, hub id or .safetensors file."""
    pipe, resolved = load_pipeline(base, revision, variant, torch_dtype, architecture, config)
    if vae is not None:
        from diffusers import AutoencoderKL
        try:
            pipe.vae = AutoencoderKL.from_pretrained(vae, **dtype_kw(pipe.vae.dtype))
        except Exception as e:
            raise ModelError(f"VAE {vae!r}: could not load an AutoencoderKL: {e}") from e
        if Path(vae).is_dir():  # a hub VAE's files are not checked
            verify_weights(pipe.vae, vae)
    pipe.set_progress_bar_config(disable=True)
    return pipe, facts_of(pipe, base, resolved)
