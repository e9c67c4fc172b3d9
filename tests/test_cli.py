"""The `adapt` command: sample (txt2img, img2img with stored strength), inspect, data build, clean errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from adapt.facts import AdapterFacts
from adapt import lora, model
from conftest import ROOT


def adapt_cli(*args, timeout=300):
    exe = Path(sys.executable).parent / "adapt"
    return subprocess.run([str(exe), "--threads", "1", *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def adapter_dir(tiny_base, tmp_path_factory):
    """A saved adapter with random (non-zero) LoRA weights and stored strength 0.5."""
    out = tmp_path_factory.mktemp("adapter")
    pipe, facts = model.load_base(str(tiny_base))
    lora.attach(pipe.unet, "cross_attn", rank=4, alpha=4)
    g = torch.Generator().manual_seed(0)
    for n, p in pipe.unet.named_parameters():
        if "lora_B" in n:
            p.data = torch.randn(p.shape, generator=g) * 0.5
    lora.save(out, pipe.unet, AdapterFacts(base=str(tiny_base), strength=0.5, inference_steps=10, scheduler="ddim",
                               architecture="sd", rank=4, alpha=4))
    return out


@pytest.mark.integration  # subprocess-heavy: `make test-integration`
def test_data_build_then_sample_img2img_with_stored_strength(tiny_base, adapter_dir, tmp_path):
    r = adapt_cli("data", "build", "synth_faces", "--out", tmp_path / "faces", "--n", 2, "--split", "eval")
    assert r.returncode == 0, r.stderr
    img = tmp_path / "faces" / "eval_000000.png"
    r = adapt_cli("sample", "--base", tiny_base, "--adapter", adapter_dir, "--image", img, "--out", tmp_path / "s",
                  "--prompt", "{caption} wearing sunglasses", "--grid", tmp_path / "grid.png")
    assert r.returncode == 0, r.stderr
    assert "using strength 0.5 stored in adapter" in r.stdout and "note: --prompt" not in r.stdout  # its caption was found
    out = Image.open(tmp_path / "s" / "img2img_000.png")
    assert out.size == (64, 64)
    assert Image.open(tmp_path / "grid.png").size[0] > 3 * 64
    # scale 0 reproduces the base exactly
    r0 = adapt_cli("sample", "--base", tiny_base, "--adapter", adapter_dir, "--scale", 0, "--image", img, "--out", tmp_path / "s0")
    rb = adapt_cli("sample", "--base", tiny_base, "--image", img, "--strength", 0.5, "--steps", 10, "--out", tmp_path / "sb")
    assert r0.returncode == 0 and rb.returncode == 0, r0.stderr + rb.stderr
    a = np.asarray(Image.open(tmp_path / "s0" / "img2img_000.png"))
    b = np.asarray(Image.open(tmp_path / "sb" / "img2img_000.png"))
    assert np.array_equal(a, b)


def test_txt2img_and_missing_strength(tiny_base, tmp_path):
    r = adapt_cli("sample", "--base", tiny_base, "--prompt", "a face", "--num-images", 2, "--steps", 4, "--out", tmp_path)
    assert r.returncode == 0, r.stderr
    assert len(list(tmp_path.glob("txt2img_*.png"))) == 2
    Image.new("RGB", (64, 64)).save(tmp_path / "x.png")
    r = adapt_cli("sample", "--base", tiny_base, "--image", tmp_path / "x.png", "--out", tmp_path)
    assert r.returncode != 0 and "--strength is required" in r.stderr


def test_inspect(adapter_dir):
    r = adapt_cli("inspect", adapter_dir, "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["num_modules"] == 16 and info["self_attention_modules"] == 0 and info["rank"] == 4
    assert info["facts"]["strength"] == 0.5


@pytest.mark.integration  # subprocess-heavy: `make test-integration`
def test_inspect_counts_kohya_files_as_it_counts_its_own(adapter_dir, tmp_path):
    """A kohya export of the same adapter, and a file as civitai ships them (text-encoder layers, ranks and alphas
    varying by layer, self-attention): modules by kind, parameters without the alpha scalars, the ranks as they are."""
    from safetensors.torch import save_file
    own = json.loads(adapt_cli("inspect", adapter_dir, "--json").stdout)
    r = adapt_cli("export", adapter_dir, "--format", "kohya", "--out", tmp_path / "k.safetensors")
    assert r.returncode == 0, r.stderr
    k = json.loads(adapt_cli("inspect", tmp_path / "k.safetensors", "--json").stdout)
    for key in ("num_modules", "cross_attention_modules", "self_attention_modules", "num_params", "rank", "alpha"):
        assert k[key] == own[key], key
    assert own["cross_attention_modules"] == 16 and own["alpha"] == 4
    t = {}
    for name, r_, a in (("lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k", 4, 2.0),
                        ("lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q", 8, 8.0),
                        ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 8, 1.0)):
        t |= {f"{name}.lora_down.weight": torch.zeros(r_, 32), f"{name}.lora_up.weight": torch.zeros(32, r_),
              f"{name}.alpha": torch.tensor(a)}
    save_file(t, tmp_path / "civitai.safetensors")
    r = adapt_cli("inspect", tmp_path / "civitai.safetensors")
    assert r.returncode == 0, r.stderr
    assert ("2 UNet modules (1 cross-attn, 1 self-attn), 1 text-encoder modules, 1,280 params, rank 4-8 (varies by "
            "layer), alpha 1-8 (varies by layer)") in r.stdout


def test_inspect_reads_an_imported_kohya_file_as_the_file_itself(tiny_base, tmp_path):
    """Imported into diffusers' format (alphas in peft metadata: per component, with alpha_pattern), a kohya file with
    text-encoder layers and alphas varying by layer shows the same modules, ranks and alphas as the file."""
    from safetensors.torch import save_file
    from adapt import cli, kohya, lora, model
    cfg = dict(model.load_base(str(tiny_base))[0].unet.config)
    t = {}
    for name, r_, a, (i, o) in (("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", 4, 2.0, (32, 32)),
                                ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_v", 4, 4.0, (32, 32)),
                                ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 8, 1.0, (32, 32)),
                                ("lora_te_text_model_encoder_layers_1_self_attn_q_proj", 8, 8.0, (32, 32))):
        t |= {f"{name}.lora_down.weight": torch.ones(r_, i), f"{name}.lora_up.weight": torch.ones(o, r_),
              f"{name}.alpha": torch.tensor(a)}
    save_file(t, tmp_path / "k.safetensors")
    imported = kohya.from_kohya(tmp_path / "k.safetensors", tmp_path / "imported", base_cfg=cfg, log=lambda m: None)
    tensors, header = lora.read(imported)
    got = cli._layers(tensors, header["lora_adapter_metadata"])
    assert got == cli._layers(t, {}) and got["alphas"] == [1.0, 2.0, 4.0, 8.0] and got["text_encoder_modules"] == 2


def test_inspect_counts_diffusers_text_encoder_layers_and_only_the_alphas_layers_use(tiny_base, tmp_path):
    """diffusers' save_lora_weights names text-encoder layers .lora_linear_layer.down/up (they were not counted), and a
    base lora_alpha that alpha_pattern overrides for every layer is no layer's alpha (it was listed)."""
    from adapt import cli
    from conftest import diffusers_lora_with_text_encoder
    te = diffusers_lora_with_text_encoder(tiny_base, tmp_path / "te")  # UNet alpha 4, text encoder alpha 8, rank 4
    tensors, header = lora.read(te)
    got = cli._layers(tensors, header["lora_adapter_metadata"])
    assert got["text_encoder_modules"] == 8 and got["alphas"] == [4.0, 8.0] and got["ranks"] == [4]
    meta = dict(header["lora_adapter_metadata"], **{"unet.lora_alpha": 16, "unet.r": 16,
                                                  "unet.alpha_pattern": {".*attn2.*": 4}})
    assert cli._layers(tensors, meta)["alphas"] == [4.0, 8.0]


def test_output_into_a_closed_pipe_stops_quietly(adapter_dir):
    """`adapt inspect ... | head -1`: the reader leaves before adapt has written; no traceback, SIGPIPE's status."""
    import os
    read, write = os.pipe()
    os.close(read)  # the reader has gone: every write fails with EPIPE (Python ignores SIGPIPE)
    exe = Path(sys.executable).parent / "adapt"
    r = subprocess.run([str(exe), "inspect", str(adapter_dir)], stdout=write, stderr=subprocess.PIPE, text=True, timeout=120)
    os.close(write)
    assert r.returncode == 141 and r.stderr == "", r.stderr


@pytest.mark.integration  # subprocess-heavy: `make test-integration`
def test_errors_are_one_clear_line(tiny_base, tmp_path):
    (tmp_path / "evil.bin").write_bytes(b"\x80\x04K\x01.")
    r = adapt_cli("inspect", tmp_path / "evil.bin")
    assert r.returncode == 2 and "pickle" in r.stderr and "Traceback" not in r.stderr
    r = adapt_cli("sample", "--base", tmp_path / "nope", "--out", tmp_path)
    assert r.returncode == 2 and "not found" in r.stderr and "Traceback" not in r.stderr
    r = adapt_cli("sample", "--base", tiny_base, "--prompt", "a face", "--device", "cuda", "--out", tmp_path)
    assert r.returncode == 2 and "CUDA is not available" in r.stderr and "Traceback" not in r.stderr



def test_eval_overrides_may_sit_between_flags():
    from adapt import cli
    a = cli.parse_args(["eval", "target_split=eval", "--adapter", "ad", "--strengths", "0.5", "num_target=4", "--out", "o"])
    assert a.overrides == ["target_split=eval"]
    cfg = cli.eval_config(a)
    assert cfg.num_target == 4 and cfg.target_split == "eval" and cfg.strengths == [0.5]
    # lists comma- or space-separated, as argparse users type them; an override right after one is still an override
    a = cli.parse_args(["eval", "--adapter", "ad", "--strengths", "0.4", "0.6,0.8", "--scales", "0", "1", "--modes",
                        "plain", "masked", "seeds=1", "--out", "o"])
    cfg = cli.eval_config(a)
    assert (cfg.strengths, cfg.scales, cfg.modes, cfg.seeds) == ([0.4, 0.6, 0.8], [0.0, 1.0], ["plain", "masked"], 1)
    for argv in (["sample", "x=1"], ["eval", "--adapter", "ad", "--bogus"]):  # no overrides there / not an override
        with pytest.raises(SystemExit):
            cli.parse_args(argv)

def test_device_and_dtype_choice():
    import torch
    assert model.pick_device("auto") == model.pick_device(None) == torch.device("cpu")  # this machine has no GPU
    assert model.pick_dtype("auto", torch.device("cpu")) == torch.float32
    assert model.pick_dtype("auto", torch.device("cuda")) == torch.float16
    with pytest.raises(model.ModelError, match="dtype 'fp8'"):
        model.pick_dtype("fp8", torch.device("cpu"))
    with pytest.raises(model.ModelError, match="device 'gpu0'"):
        model.pick_device("gpu0")


def test_sample_keeps_each_inputs_aspect_and_the_grid_pads(tiny_base, adapter_dir, tmp_path):
    """A portrait and a landscape photo run img2img at their own aspect (within --resolution² pixels, sides
    multiples of the VAE factor), the outputs are written at that size, and the grid pads rather than squashes."""
    from adapt import synth
    paths = []
    for name, aspect, scale in (("portrait.png", 0.5, 3.0), ("landscape.png", 1.5, 2.0)):
        img, _, _ = synth.make_photo("faces", "eval", 0, 64, aspect, scale)
        img.save(tmp_path / name)
        paths.append(tmp_path / name)
    r = adapt_cli("sample", "--base", tiny_base, "--adapter", adapter_dir, "--image", *paths, "--resolution", 128,
                  "--out", tmp_path / "s", "--grid", tmp_path / "grid.png", "--mask", "auto")
    assert r.returncode == 0, r.stderr
    sizes = [Image.open(tmp_path / "s" / f"img2img_00{i}.png").size for i in range(2)]
    assert sizes == [(88, 176), (144, 96)]  # 192x384 and 192x128 inputs at 128² px, multiples of 8
    for (w, h), src in zip(sizes, paths):
        sw, sh = Image.open(src).size
        assert abs(w / h - sw / sh) / (sw / sh) < 0.05 and w * h <= 128 * 128
    assert [Image.open(tmp_path / "s" / f"mask_00{i}.png").size for i in range(2)] == sizes
    g = Image.open(tmp_path / "grid.png")
    assert g.size == (4 * (144 + 2) + 2, 2 * (176 + 2) + 2)  # cells as large as the largest image, 4 columns


def _report(tmp_path, adapter, base, sha=None, **rec):
    """A minimal valid report.json (schema of adapt.report) recommending `rec` for `adapter`."""
    from adapt import report
    settings = {"adapter": str(adapter), "base": str(base), "steps": 10, "scheduler": "ddim", "guidance": 1.0,
                "prompt": "{caption} wearing sunglasses", "mask_timestep": 441, "mask_draws": 2, "mask_threshold": 0.4,
                "mask_close": 1, "mask_dilate": 1, "mask_blur": 0.5, "mask_paste": True,
                "adapter_sha256": sha or lora.weights_sha256(adapter)}
    recommended = {"strength": 0.7, "scale": 1.5, "mode": "masked", "rule": "test", "reach_metric": "detector_reach",
                   "preservation_metric": "preservation_ssim_outside_mask", "reach": 1.0, "preservation": 0.97,
                   "shape_pass": 0.5, **rec}
    r = {"version": report.REPORT_VERSION, "status": "ok", "settings": settings, "versions": {}, "classifier_accuracy": 1.0,
         "vae_ceiling": {}, "rows": [], "spearman": {}, "recommended": recommended, "optional_metrics": {}, "warnings": []}
    (tmp_path / "eval").mkdir(exist_ok=True)
    (tmp_path / "eval" / "report.json").write_text(json.dumps(r))
    return tmp_path / "eval"


def test_load_recommendation_checks_the_report(adapter_dir, tiny_base, tmp_path):
    from adapt import report
    rec = report.load_recommendation(_report(tmp_path, adapter_dir, tiny_base))  # the folder is enough
    assert (rec.strength, rec.scale, rec.mode, rec.steps, rec.guidance) == (0.7, 1.5, "masked", 10, 1.0)
    assert (rec.mask.threshold, rec.mask.close, rec.mask.draws, rec.mask.blur) == (0.4, 1, 2, 0.5)
    assert rec.figures == "detector_reach 1, shape_pass 0.5, preservation_ssim_outside_mask 0.97"
    assert report.load_recommendation(_report(tmp_path, adapter_dir, tiny_base, mode="plain")).mask is None
    with pytest.raises(report.RecommendationError, match=r"recommends no setting \(nothing met it"):
        report.load_recommendation(_report(tmp_path, adapter_dir, tiny_base, strength=None, note="nothing met it"))
    d = _report(tmp_path, adapter_dir, tiny_base)
    r = json.loads((d / "report.json").read_text())
    (d / "report.json").write_text(json.dumps({**r, "status": "refused", "reason": "classifier 0.6"}))
    with pytest.raises(report.RecommendationError, match=r"refused \(classifier 0.6\)"):
        report.load_recommendation(d)
    (d / "report.json").write_text(json.dumps({**r, "settings": {**r["settings"], "mask_blend": False}}))
    with pytest.raises(report.RecommendationError, match="without latent blending"):
        report.load_recommendation(d)
    (d / "report.json").write_text(json.dumps({**r, "version": 1}))
    with pytest.raises(report.RecommendationError, match="version 1, this adapt reads version 2"):
        report.load_recommendation(d)
    (d / "report.json").write_text("{")
    with pytest.raises(report.RecommendationError, match="not a readable report.json"):
        report.load_recommendation(d)
    with pytest.raises(report.RecommendationError, match="not found"):
        report.load_recommendation(tmp_path / "nowhere")


def test_recommended_refuses_another_adapter(adapter_dir, tiny_base, tmp_path):
    from adapt import cli, cli_sample
    img = tmp_path / "x.png"
    Image.new("RGB", (64, 64)).save(img)
    a = cli.build_parser().parse_args(["sample", "--adapter", str(adapter_dir), "--image", str(img), "--recommended",
                                       str(_report(tmp_path, adapter_dir, tiny_base, sha="ab" * 32))])
    with pytest.raises(cli.CliError, match=f"adapter {adapter_dir} has changed since the report evaluated it"):
        cli_sample._apply_recommended(a)  # the same folder, other weights
    (tmp_path / "o").mkdir()
    other = _report(tmp_path / "o", tmp_path / "elsewhere", tiny_base, sha="ab" * 32)
    a = cli.build_parser().parse_args(["sample", "--adapter", str(adapter_dir), "--image", str(img), "--recommended", str(other)])
    with pytest.raises(cli.CliError, match=r"the report evaluated adapter .*elsewhere \(weights sha256 abababababab\), not --adapter"):
        cli_sample._apply_recommended(a)
    a = cli.build_parser().parse_args(["sample", "--image", str(img), "--recommended", str(tmp_path / "eval")])
    with pytest.raises(cli.CliError, match=f"adapter {adapter_dir} has changed since the report evaluated it"):
        cli_sample._apply_recommended(a)  # no --adapter: the report's, whose weights are no longer the evaluated ones
    (tmp_path / "g").mkdir()
    gone = _report(tmp_path / "g", tmp_path / "gone", tiny_base, sha="ab" * 32)
    a = cli.build_parser().parse_args(["sample", "--image", str(img), "--recommended", str(gone)])
    with pytest.raises(cli.CliError, match=r"it evaluated adapter .*gone, which is not found from here .*; give --adapter"):
        cli_sample._apply_recommended(a)
    a = cli.build_parser().parse_args(["sample", "--adapter", str(adapter_dir), "--adapter", str(adapter_dir), "--image",
                                       str(img), "--recommended", str(tmp_path / "eval")])
    with pytest.raises(cli.CliError, match="give the one --adapter the report evaluated"):
        cli_sample._apply_recommended(a)
    # the evaluation decoded with a tuned VAE (adapt.decoder) that the adapter no longer ships: refused, unless opted out
    d = _report(tmp_path, adapter_dir, tiny_base)
    r = json.loads((d / "report.json").read_text())
    (d / "report.json").write_text(json.dumps({**r, "settings": {**r["settings"], "decoder": "/gone/vae"}}))
    argv = ["sample", "--adapter", str(adapter_dir), "--image", str(img), "--recommended", str(d)]
    with pytest.raises(cli.CliError, match=r"decoded the adapter's outputs with its tuned VAE /gone/vae, which --adapter .* "
                                           r"no longer ships .*--base-decoder"):
        cli_sample._apply_recommended(cli.build_parser().parse_args(argv))
    cli_sample._apply_recommended(cli.build_parser().parse_args(argv + ["--base-decoder"]))


def test_recommended_fills_unset_flags_and_explicit_ones_win(adapter_dir, tiny_base, tmp_path):
    from adapt import cli, cli_sample
    img = tmp_path / "x.png"
    Image.new("RGB", (64, 64)).save(img)
    rep = str(_report(tmp_path, adapter_dir, tiny_base))
    a = cli.build_parser().parse_args(["sample", "--adapter", str(adapter_dir), "--image", str(img), "--recommended", rep])
    cli_sample._apply_recommended(a)
    assert (a.base, a.strength, a.scale, a.steps, a.scheduler, a.guidance) == (str(tiny_base), 0.7, [1.5], 10, "ddim", 1.0)
    assert (a.mask, a.mask_threshold, a.mask_close, a.mask_draws, a.mask_blur, a.prompt) == \
        (["auto"], 0.4, 1, 2, 0.5, "{caption} wearing sunglasses")
    a = cli.build_parser().parse_args(["sample", "--adapter", str(adapter_dir), "--image", str(img), "--recommended", rep,
                                       "--scale", "1", "--mask-close", "3", "--guidance", "2"])
    cli_sample._apply_recommended(a)
    assert (a.scale, a.mask_close, a.guidance, a.strength) == ([1.0], 3, 2.0, 0.7)
    a = cli.build_parser().parse_args(["sample", "--image", str(img), "--strength", "0.5"])  # no report: the defaults
    cli_sample._apply_recommended(a)
    assert (a.base, a.guidance, a.prompt, a.mask, a.mask_threshold, a.mask_close, a.paste) == ("tiny-faces", 7.5, "", None, 0.5, 2, True)


@pytest.mark.integration  # two subprocess samples: `make test-integration`
def test_sample_at_the_recommended_setting_equals_the_flags_spelled_out(adapter_dir, tiny_base, tmp_path):
    img = tmp_path / "x.png"
    from adapt import synth
    synth.make("faces", "eval", 0)[0].save(img)
    # no --adapter: the one the report evaluated (its weights' sha256 still checked)
    r1 = adapt_cli("sample", "--image", img, "--recommended", _report(tmp_path, adapter_dir, tiny_base), "--out", tmp_path / "rec")
    assert r1.returncode == 0, r1.stderr
    assert "recommends: strength 0.7, scale 1.5, masked (detector_reach 1" in r1.stdout
    assert f"--adapter {adapter_dir}: the adapter the report evaluated" in r1.stdout
    r2 = adapt_cli("sample", "--base", tiny_base, "--adapter", adapter_dir, "--image", img, "--strength", 0.7, "--scale", 1.5,
                   "--steps", 10, "--scheduler", "ddim", "--guidance", 1.0, "--prompt", "{caption} wearing sunglasses",
                   "--mask", "auto", "--mask-threshold", 0.4, "--mask-close", 1, "--mask-draws", 2, "--mask-blur", 0.5, "--out", tmp_path / "flags")
    assert r2.returncode == 0, r2.stderr
    assert (f"note: --prompt '{{caption}} wearing sunglasses' takes each image's caption, and 1 of 1 have none (no "
            f"metadata row, .txt or .caption beside them), so it reads as empty for: {img}") in r2.stdout
    assert "2 draws, threshold 0.4, close 1, dilate 1" in r1.stdout and "2 draws, threshold 0.4, close 1" in r2.stdout
    for name in ("img2img_000.png", "mask_000.png"):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "rec" / name)), np.asarray(Image.open(tmp_path / "flags" / name)))


@pytest.mark.integration  # subprocess-heavy: `make test-integration`
def test_data_build_by_name_works_from_any_directory(tmp_path):
    """README's `adapt data build synth_sunglasses --out ...` typed outside the checkout finds this checkout's
    definition (as data.source=datasets/<name> does); an unknown name lists the ones there are."""
    exe = str(Path(sys.executable).parent / "adapt")
    for name in ("synth_sunglasses", "datasets/synth_faces"):
        r = subprocess.run([exe, "data", "build", name, "--out", "built " + name.replace("/", "_"), "--n", "2"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "built synth_sunglasses").glob("train_*.png"))) == 2
    r = subprocess.run([exe, "data", "build", "sunglases", "--out", "x", "--n", "2"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "no dataset definition 'sunglases'" in r.stderr and "synth_sunglasses" in r.stderr



@pytest.mark.integration  # subprocess-heavy: `make test-integration`
def test_a_hub_adapter_id_loads_through_the_hub_cache(tiny_base, adapter_dir, tmp_path):
    """`--adapter org/name` (as `pipe.load_lora_weights("org/name")` takes it) resolves through huggingface_hub's
    cache (refs -> snapshot, the layout a download leaves; offline here) and samples as the local folder does; a name
    that is neither local nor cached, and a typo under a local folder, are one clear line each."""
    import shutil
    commit = "89abcdef0123456789abcdef0123456789abcdef"
    repo = tmp_path / "hub" / "models--me--sunglasses-lora"
    shutil.copytree(adapter_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    Image.new("RGB", (64, 64), (150, 120, 100)).save(tmp_path / "face.png")
    (tmp_path / "runs").mkdir()
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1")
    exe = str(Path(sys.executable).parent / "adapt")

    def sample(adapter, out):
        return subprocess.run([exe, "--threads", "1", "sample", "--base", str(tiny_base), "--adapter", adapter, "--image",
                               "face.png", "--prompt", "a face", "--out", out], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
    for adapter, out in ((str(adapter_dir), "local"), ("me/sunglasses-lora", "fromhub"), (f"me/sunglasses-lora@{commit}", "rev")):
        r = sample(adapter, out)
        assert r.returncode == 0, r.stderr
    local = np.asarray(Image.open(tmp_path / "local" / "img2img_000.png"))
    for out in ("fromhub", "rev"):
        assert np.array_equal(local, np.asarray(Image.open(tmp_path / out / "img2img_000.png")))
    r = sample("me/no-such-lora", "x")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "'me/no-such-lora' is not a local file or folder" in r.stderr and "not in the local cache" in r.stderr
    for typo in ("runs/typo", "loras/x.safetensors"):  # runs/ exists here; a file name: local paths, never hub ids
        r = sample(typo, "y")
        assert r.returncode == 2 and r.stderr.strip() == f"error: adapter not found: {typo}", r.stderr
    from adapt import provenance  # the record names the hub id and commit, not this machine's cache folder
    rec = provenance.read(tmp_path / "fromhub" / "img2img_000.png")
    assert rec.adapters[0].path == f"me/sunglasses-lora@{commit}"
    assert f"--adapter me/sunglasses-lora@{commit}" in provenance.reproduce_command(rec)
    r = subprocess.run([exe, "inspect", "me/sunglasses-lora", "--json"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0 and json.loads(r.stdout)["facts"]["strength"] == 0.5, r.stderr


@pytest.mark.integration  # subprocess-heavy: `make test-integration`
def test_image_takes_a_folder_or_a_pattern_the_shell_left_alone(tiny_base, adapter_dir, tmp_path):
    """`--image photos/` samples every image in the folder (by name; not masks/, subfolders or hidden files), and a
    quoted 'photos/*.png' the files it matches, each with its own caption from the folder's metadata."""
    from adapt import synth
    src = synth.build_imagefolder("faces", tmp_path / "photos", n=2, split="eval")
    (src / ".hidden.png").write_bytes((src / "eval_000000.png").read_bytes())
    (src / "notes.txt").write_text("not an image")
    printed = []
    for given, out in ((src, "s1"), (f"{src}/*.png", "s2")):
        r = adapt_cli("sample", "--base", tiny_base, "--adapter", adapter_dir, "--image", given, "--prompt",
                      "{caption} wearing sunglasses", "--out", tmp_path / out)
        assert r.returncode == 0, r.stderr
        assert sorted(p.name for p in (tmp_path / out).glob("*.png")) == ["img2img_000.png", "img2img_001.png"]
        assert "note: --prompt" not in r.stdout  # every image found its caption
        printed.append(r.stdout)
    assert f"--image {src}: 2 image(s) in the folder" in printed[0]
    from adapt import provenance
    rec = provenance.read(tmp_path / "s1" / "img2img_001.png")
    assert rec.source == str((src / "eval_000001.png").resolve()) and rec.prompt.endswith("wearing sunglasses")
    assert rec.prompt.startswith(json.loads((src / "metadata.jsonl").read_text().splitlines()[1])["text"])
    a, b = (np.asarray(Image.open(tmp_path / d / "img2img_001.png")) for d in ("s1", "s2"))
    assert np.array_equal(a, b)
