"""Shared fixtures: offline, one thread, tiny models built once per session."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _isolated_homes(tmp_path_factory):
    """A private HF_HOME and adapt cache for the whole session (nothing touches ~/.cache)."""
    home = tmp_path_factory.mktemp("hf_home")
    os.environ["HF_HOME"] = str(home)
    os.environ["ADAPT_CACHE"] = str(tmp_path_factory.mktemp("adapt_cache"))
    import adapt
    adapt.quiet()
    yield


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """Folder of a tiny random SD pipeline (epsilon), saved like a real checkpoint."""
    from adapt.tiny import save_tiny_pipeline
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "tiny-sd", seed=0)


@pytest.fixture(scope="session")
def tiny_v_base(tmp_path_factory):
    from adapt.tiny import save_tiny_pipeline
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny_v") / "tiny-sd-v", seed=0, prediction_type="v_prediction")


TINY_CFG = str(ROOT / "recipes" / "configs" / "tiny_test.yaml")


@pytest.fixture(scope="session")
def sg_folder(tmp_path_factory):
    """8 synthetic target-domain images (split train), shared by the recipe tests."""
    from adapt import synth
    return synth.build_imagefolder("sunglasses", tmp_path_factory.mktemp("sg") / "train", n=8, split="train")


def signals_as_in_a_terminal():
    """preexec_fn for a child a test will signal: SIGINT and SIGHUP at their defaults, as a terminal's foreground job
    has them. A test run started in the background (`make test-integration &` in a script: SIGINT; nohup: SIGHUP)
    hands its children these ignored, and a program started so keeps ignoring them (Python raises no
    KeyboardInterrupt; adapt's trainer does not stop)."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


def on_its_terminal():
    """preexec_fn for a child started with start_new_session=True and a pty's slave side as its stdin: that pty
    becomes its controlling terminal, as a login shell's job has it (closing the master side then hangs it up)."""
    import fcntl
    import termios
    signals_as_in_a_terminal()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def recipe_args(base, data, out, *extra):
    """The recipe's argv for tiny_test.yaml on a given base, data folder and out_dir."""
    return ["--config", TINY_CFG, f"model.base={base}", f"data.source={data}", f"out_dir={out}", *extra]


def run_recipe(args, cwd=ROOT, launcher="accelerate", nproc=1, timeout=600, env_extra=None, launch_args=()):
    """Run recipes/lora_img2img.py the way a user does; returns CompletedProcess. launch_args: more flags for
    `accelerate launch` (e.g. --mixed_precision bf16)."""
    import subprocess
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.update(env_extra or {})
    if "ADAPT_FAULT" in env:  # test-only fault hooks (tests/faults/sitecustomize.py), never in the user's code path
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "tests" / "faults"), env.get("PYTHONPATH")]))
    bindir = Path(sys.executable).parent
    if launcher == "accelerate" and nproc == 1:
        cmd = [str(bindir / "accelerate"), "launch", "-q", "--config_file", str(ROOT / "accelerate_config.yaml"), *launch_args]
    elif launcher == "accelerate":
        env["ACCELERATE_USE_CPU"] = "1"
        cmd = [str(bindir / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(nproc), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(29500 + os.getpid() % 1000)]
    else:
        cmd = [sys.executable]
    cmd += [str(ROOT / "recipes" / "lora_img2img.py")] + list(args)
    # as a terminal's foreground job (the fault hooks' SIGINT is a Ctrl-C, even when the suite runs in the background)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                          preexec_fn=signals_as_in_a_terminal)


def read_log(out_dir):
    import json
    return [json.loads(l) for l in (Path(out_dir) / "logs" / "train_log.jsonl").read_text().splitlines() if l.strip()]


def rewrite_safetensors(path, edit):
    """Rewrite a safetensors file through `edit(dict) -> dict`, keeping its metadata (a checkpoint as another tool,
    or a damaged copy, would leave it)."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(edit(tensors), str(path), meta)


def diffusers_lora_with_text_encoder(base, out, te_modules=("q_proj", "k_proj", "v_proj", "out_proj"), te_alpha=8, seed=0):
    """A LoRA with text-encoder layers beside the UNet's cross-attention ones, written by diffusers' own
    save_lora_weights, as train_dreambooth_lora.py --train_text_encoder leaves it (UNet rank 4 / alpha 4; text
    encoder rank 4 / te_alpha). Returns `out`."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from adapt import lora, model
    src, _ = model.load_base(str(base))
    torch.manual_seed(seed)
    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=te_alpha, init_lora_weights=False, target_modules=list(te_modules)),
                            src.text_encoder)
    cross = lora.target_modules(src.unet, "cross_attn")
    lora.attach(src.unet, "cross_attn", rank=4, alpha=4)
    for n, p in src.unet.named_parameters():
        if "lora_B" in n:
            p.data = torch.randn(p.shape) * 0.2
    StableDiffusionPipeline.save_lora_weights(
        out, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(src.unet)),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(src.text_encoder)),
        # the LoraConfig fields diffusers' scripts store (diffusers 0.35 needs the patterns present)
        unet_lora_adapter_metadata={"r": 4, "lora_alpha": 4, "target_modules": cross, "rank_pattern": {}, "alpha_pattern": {}},
        text_encoder_lora_adapter_metadata={"r": 4, "lora_alpha": te_alpha, "target_modules": list(te_modules),
                                            "rank_pattern": {}, "alpha_pattern": {}})
    return Path(out)
