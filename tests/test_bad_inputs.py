"""A corpus of bad inputs across every entry point, each run as a user runs it (a subprocess), with a traceback
detector: every case must end in one `error: ...` line naming the problem and exit 2, never a Python trace."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from adapt import lora, synth
from conftest import ROOT, run_recipe

pytestmark = pytest.mark.integration
ADAPT = str(Path(sys.executable).parent / "adapt")
CFG = str(ROOT / "recipes" / "configs" / "tiny_test.yaml")


@pytest.fixture(scope="module")
def w(tiny_base, tmp_path_factory):
    """Files the cases point at: data, a trained adapter, a text file, garbage, a one-image folder."""
    d = tmp_path_factory.mktemp("corpus")
    sg = synth.build_imagefolder("sunglasses", d / "sg", n=4, split="train")
    r = run_recipe(["--config", CFG, f"model.base={tiny_base}", f"data.source={sg}", f"out_dir={d / 'ad'}", "train.max_steps=1"],
                   launcher="python")
    assert r.returncode == 0, r.stderr[-2000:]
    (d / "note.txt").write_text("not an image")
    (d / "garbage.safetensors").write_bytes(b"\x00\x01garbage" * 50)
    (d / "adapter.bin").write_bytes(b"pickle")
    (d / "tab.yaml").write_text("model:\n\tbase: tiny-faces\n")
    (d / "empty").mkdir()
    one = synth.build_imagefolder("sunglasses", d / "one", n=1, split="eval")
    from safetensors.torch import save_file
    import torch
    n = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    save_file({f"{n}.lora_down.weight": torch.zeros(4, 99), f"{n}.lora_up.weight": torch.zeros(32, 4)}, str(d / "odd_kohya.safetensors"))
    return {"base": str(tiny_base), "sg": str(sg), "ad": str(d / "ad"), "adfile": str(d / "ad" / lora.WEIGHTS_NAME),
            "img": str(sg / "train_000000.png"), "txt": str(d / "note.txt"), "garbage": str(d / "garbage.safetensors"),
            "pickle": str(d / "adapter.bin"), "tab": str(d / "tab.yaml"), "empty": str(d / "empty"), "one": str(one),
            "odd": str(d / "odd_kohya.safetensors"), "dir": str(d)}


R = "recipe"
CASES = [  # (id, entry, argv with <placeholders> for the fixture's files, extra env, text the error must contain)
    ("yaml-tab", R, ["--config", "<tab>"], {}, "not valid YAML"),
    ("config-missing", R, ["--config", "<dir>/nope.yaml"], {}, "config file not found"),
    ("unknown-key", R, ["lora.rnk=4"], {}, "unknown config key 'lora.rnk'"),
    ("override-no-equals", R, ["lora.rank"], {}, "is not of the form key=value"),
    ("max-steps-0", R, ["train.max_steps=0"], {}, "train.max_steps: must be > 0"),
    ("strength-1.5", R, ["objective.strength=1.5"], {}, "objective.strength: must be in (0, 1]"),
    ("resolution-30", R, ["data.resolution=30"], {}, "data.resolution: must be a positive multiple of 8"),
    ("resolution-off-bucket-step", R, ["data.resolution=72"], {}, "data.resolution=72 is not a multiple of the bucket step 16"),
    ("bucket-step-not-multiple", R, ["data.bucket_step=24"], {}, "data.bucket_step=24 is not a multiple of 16"),
    ("crops-without-random-crop", R, ["data.crops_per_image=3"], {}, "data.crops_per_image: 3 crops need data.random_crop=true"),
    ("sample-resolution-odd", "adapt", ["sample", "--resolution", "100"], {}, "--resolution must be a positive multiple of 8"),
    ("caption-template", R, ["data.default_caption=a {style} photo"], {}, "data.default_caption"),
    ("validation-0-images", R, ["validation.num_images=0"], {}, "validation.num_images: must be >= 1"),
    ("dtype-vs-autocast", R, ["model.dtype=float16", "train.mixed_precision=bf16"], {}, "model.dtype/train.mixed_precision"),
    ("resume-allow-identity", R, ["train.resume_allow=[lora.rank]"], {}, "only optim.* keys"),
    ("out-dir-is-file", R, ["out_dir=<txt>"], {}, "is a file, not a folder"),
    ("data-missing", R, ["data.source=<dir>/nowhere"], {}, "nowhere"),
    ("data-empty", R, ["data.source=<empty>"], {}, "no images found"),
    ("base-missing", R, ["model.base=<dir>/nobase"], {}, "base model not found"),
    ("rank-too-large", R, ["lora.rank=10000"], {}, "exceeds the narrowest adapted layer"),
    ("init-from-missing", R, ["lora.init_from=<dir>/noad"], {}, "adapter not found"),
    ("init-from-pickle", R, ["lora.init_from=<pickle>"], {}, "pickle"),
    ("init-from-garbage", R, ["lora.init_from=<garbage>"], {}, "not a readable .safetensors file"),
    ("init-from-other-family", R, ["lora.init_from=<odd>"], {}, "the given base's take 32"),
    ("init-from-with-pissa", R, ["lora.init_from=<ad>", "lora.init=pissa"], {}, "lora.init: pissa rewrites the base weights"),
    ("resume-latest-empty", R, ["train.resume_from_checkpoint=latest"], {}, "no intact checkpoint"),
    ("resume-missing-folder", R, ["train.resume_from_checkpoint=<dir>/nock"], {}, "no such checkpoint folder"),
    ("adapt-cache-is-file", R, [], {"ADAPT_CACHE": "<txt>"}, "ADAPT_CACHE"),
    ("cache-dir-is-file", R, ["data.cache_dir=<txt>"], {}, "data.cache_dir"),
    ("sample-steps-0", "adapt", ["sample", "--steps", "0"], {}, "--steps must be >= 1"),
    ("sample-steps-1", "adapt", ["sample", "--base", "<base>", "--image", "<img>", "--steps", "1", "--strength", "0.5"], {}, "visits no timestep"),
    ("sample-strength-0", "adapt", ["sample", "--image", "<img>", "--strength", "0"], {}, "--strength must be in (0, 1]"),
    ("sample-strength-1.5", "adapt", ["sample", "--image", "<img>", "--strength", "1.5"], {}, "--strength must be in (0, 1]"),
    ("sample-image-folder", "adapt", ["sample", "--image", "<empty>", "--strength", "0.5"], {}, "a folder with no images"),
    ("sample-image-missing", "adapt", ["sample", "--image", "<dir>/nope.png", "--strength", "0.5"], {}, "nope.png: no such file"),
    ("sample-image-glob", "adapt", ["sample", "--image", "<dir>/*.jpeg", "--strength", "0.5"], {}, "no file matches the pattern"),
    ("sample-image-text", "adapt", ["sample", "--image", "<txt>", "--strength", "0.5"], {}, "not a readable image"),
    ("sample-prompt-brace", "adapt", ["sample", "--base", "<base>", "--prompt", "a face }", "--steps", "2"], {}, "only '{caption}'"),
    ("sample-prompt-field", "adapt", ["sample", "--base", "<base>", "--prompt", "{style} face", "--steps", "2"], {}, "only '{caption}'"),
    ("sample-adapter-missing", "adapt", ["sample", "--adapter", "<dir>/noad"], {}, "adapter not found"),
    ("sample-adapter-garbage", "adapt", ["sample", "--adapter", "<garbage>"], {}, "not a readable .safetensors file"),
    ("sample-adapter-pickle", "adapt", ["sample", "--adapter", "<pickle>"], {}, "pickle"),
    ("sample-kohya-other-family", "adapt", ["sample", "--base", "<base>", "--adapter", "<odd>", "--image", "<img>", "--strength", "0.5"], {},
     "the given base's take 32"),
    ("sample-scales-count", "adapt", ["sample", "--adapter", "<ad>", "--scale", "1", "--scale", "2"], {}, "2 --scale values for 1 adapters"),
    ("sample-scale-negative", "adapt", ["sample", "--adapter", "<ad>", "--scale", "-1"], {}, "--scale must be >= 0"),
    ("sample-scheduler", "adapt", ["sample", "--scheduler", "bogus"], {}, "--scheduler 'bogus'"),
    # flags that would do nothing are refused (they used to be dropped silently)
    ("sample-txt2img-strength", "adapt", ["sample", "--strength", "0.5"], {}, "--strength: img2img only"),
    ("sample-txt2img-grid", "adapt", ["sample", "--grid", "<dir>/g.png"], {}, "--grid: img2img only"),
    ("sample-grid-no-adapter", "adapt", ["sample", "--image", "<img>", "--strength", "0.5", "--grid", "<dir>/g.png"], {}, "give --adapter"),
    ("sample-img2img-num-images", "adapt", ["sample", "--image", "<img>", "--strength", "0.5", "--num-images", "3"], {}, "--num-images: txt2img only"),
    ("sample-mask-flag-no-mask", "adapt", ["sample", "--image", "<img>", "--strength", "0.5", "--mask-threshold", "0.3", "--no-paste"], {},
     "--mask-threshold --no-paste: masked sampling settings, but no --mask"),
    ("sample-auto-flag-mask-image", "adapt", ["sample", "--image", "<img>", "--strength", "0.5", "--mask", "<img>", "--mask-dilate", "2"], {},
     "--mask-dilate: settings of the adapter-guided mask"),
    ("sample-out-file", "adapt", ["sample", "--base", "<base>", "--out", "<txt>", "--steps", "2"], {}, "is a file, not a folder"),
    ("sample-device", "adapt", ["sample", "--base", "<base>", "--device", "cuda", "--steps", "2"], {}, "CUDA is not available"),
    ("sample-base-missing", "adapt", ["sample", "--base", "<dir>/nobase", "--steps", "2"], {}, "base model not found"),
    ("inspect-missing", "adapt", ["inspect", "<dir>/noad"], {}, "adapter not found"),
    ("inspect-garbage", "adapt", ["inspect", "<garbage>"], {}, "not a readable .safetensors file"),
    ("export-onto-input", "adapt", ["export", "<ad>", "--format", "kohya", "--out", "<adfile>"], {}, "is the input"),
    ("export-kohya-import-flag", "adapt", ["export", "<ad>", "--format", "kohya", "--architecture", "sdxl", "--out", "<dir>/k.safetensors"], {},
     "--architecture: settings of the kohya import"),
    ("export-garbage", "adapt", ["export", "<garbage>", "--format", "diffusers", "--out", "<dir>/imp1"], {}, "not a readable .safetensors file"),
    ("export-unknown-family", "adapt", ["export", "<odd>", "--format", "diffusers", "--out", "<dir>/imp2"], {}, "cannot tell the base architecture"),
    ("export-base-mismatch", "adapt", ["export", "<odd>", "--format", "diffusers", "--base", "<base>", "--out", "<dir>/imp3"], {}, "the given base's take 32"),
    ("build-split", "adapt", ["data", "build", "synth_faces", "--out", "<dir>/b1", "--n", "2", "--split", "bogus"], {}, "--split 'bogus'"),
    ("build-n-negative", "adapt", ["data", "build", "synth_faces", "--out", "<dir>/b2", "--n", "-3"], {}, "--n must be in [1,"),
    ("build-unknown", "adapt", ["data", "build", "nosuchset", "--out", "<dir>/b3", "--n", "2"], {}, "no dataset definition"),
    ("bench-case-unknown", "adapt", ["bench", "--config", "nosuch"], {}, "unknown bench case"),
    ("bench-reference-venv", "adapt", ["bench", "--config", "p1", "--reference-venv", "<dir>", "--reference-script", "<txt>"], {},
     "no bin/accelerate in it"),
    ("eval-no-adapter", "adapt", ["eval"], {}, "adapter: required"),
    ("eval-empty-window", "adapt", ["eval", "--adapter", "<ad>", "--strengths", "0.01"], {}, "smallest usable strength"),
    ("eval-negative-scale", "adapt", ["eval", "--adapter", "<ad>", "--scales", "-1"], {}, "scales: must be >= 0"),
    ("eval-prompt-field", "adapt", ["eval", "--adapter", "<ad>", "--prompt", "{style}"], {}, "only '{caption}'"),
    ("eval-classifier-kind", "adapt", ["eval", "--adapter", "<ad>", "classifier=cnn"], {},
     "classifier: 'cnn' is not one of ['auto', 'scratch', 'base_features']"),
    ("eval-one-target", "adapt", ["eval", "--adapter", "<ad>", "--target", "<one>", "--source", "<sg>", "--num-images", "2",
                                  "--strengths", "0.6", "--scales", "0,1", "--seeds", "1", "--out", "<dir>/ev"], {}, "KID needs at least 2"),
]


@pytest.mark.parametrize("case,entry,argv,env,needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input_ends_in_one_error_line(case, entry, argv, env, needle, w, tmp_path):
    def fill(s: str) -> str:
        for k, v in w.items():
            s = s.replace(f"<{k}>", v)
        return s

    argv = [fill(a) for a in argv]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **{k: fill(v) for k, v in env.items()})
    if entry == R:
        base = ["--config", CFG, f"model.base={w['base']}", f"data.source={w['sg']}", f"out_dir={tmp_path / 'o'}"]
        if argv[:1] == ["--config"]:
            base = []
        cmd = [sys.executable, str(ROOT / "recipes" / "lora_img2img.py"), *base, *argv]
    else:
        cmd = [ADAPT, "--threads", "1", *argv]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr[-3000:]
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    errors = [l for l in r.stderr.splitlines() if l.startswith("error: ")]
    assert len(errors) == 1 and needle in errors[0], r.stderr[-2000:]
