"""train.mixed_precision / model.dtype = auto (adapt/precision.py): the choice per device, the CPU flag as a real
/proc/cpuinfo shows it, the log line, and the recipe run as users run it (auto on this machine, a resume that keeps
its checkpoint's precision)."""

from pathlib import Path

import pytest

from adapt import precision
from conftest import read_log, recipe_args, run_recipe

# The head of one processor's entry in /proc/cpuinfo, as Linux prints it (AMD EPYC Zen 4; flags abridged).
ZEN4 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9R14
flags\t\t: fpu vme de pse tsc msr avx2 avx512f avx512dq avx512_bf16 clzero xsaveerptr
bugs\t\t: sysret_ss_attrs
"""
XEON = ZEN4.replace("AMD EPYC 9R14", "Intel(R) Xeon(R) CPU @ 2.50GHz").replace(" avx512_bf16", "")
SPR = XEON.replace("avx512dq", "avx512dq amx_bf16 amx_tile")


def test_cpu_flag_read_from_cpuinfo(tmp_path):
    for text, want in ((ZEN4, "avx512_bf16"), (XEON, None), (SPR, "amx_bf16")):
        (tmp_path / "cpuinfo").write_text(text)
        assert precision.cpu_bf16_flag(tmp_path / "cpuinfo") == want
    assert precision.cpu_bf16_flag(tmp_path / "missing") is None  # macOS, Windows: no /proc


@pytest.mark.parametrize("mp, dt, device, cuda_bf16, flag, want", [
    ("auto", "auto", "cpu", False, "avx512_bf16", ("bf16", "bfloat16")),
    ("auto", "auto", "cpu", False, None, ("no", "float32")),
    ("auto", "auto", "cuda", True, None, ("bf16", "bfloat16")),
    ("auto", "auto", "cuda", False, None, ("no", "float32")),  # T4 / V100: fp16 only by choice
    ("auto", "auto", "mps", False, None, ("no", "float32")),
    ("bf16", "auto", "cpu", False, None, ("bf16", "bfloat16")),  # the weights follow the autocast type
    ("fp16", "auto", "cuda", False, None, ("fp16", "float16")),
    ("no", "auto", "cpu", False, "avx512_bf16", ("no", "float32")),
    ("auto", "float32", "cpu", False, "avx512_bf16", ("no", "float32")),  # fp32 weights mean fp32
    ("auto", "bfloat16", "cpu", False, None, ("bf16", "bfloat16")),
    ("bf16", "float32", "cpu", False, None, ("bf16", "float32")),  # both given: as given
])
def test_choose(mp, dt, device, cuda_bf16, flag, want):
    p = precision.choose(mp, dt, device, cuda_bf16, flag)
    assert (p.mixed_precision, p.dtype) == want
    assert (p.why == "") == ("auto" not in (mp, dt))


@pytest.mark.parametrize("major, hip, want", [(7, None, ("no", "float32")),    # T4 (7.5), V100 (7.0): bf16 emulated
                                               (8, None, ("bf16", "bfloat16")),  # A100, RTX 30xx and newer
                                               (9, None, ("bf16", "bfloat16")),  # H100
                                               (0, "6.2", ("bf16", "bfloat16"))])  # ROCm
def test_cuda_auto_needs_bf16_in_hardware(monkeypatch, major, hip, want):
    """torch.cuda.is_bf16_supported() answers True on a T4 (it can make bf16 tensors, emulated): auto must read the
    compute capability instead, or a T4 trains in emulated bf16, several times slower than fp32."""
    import types

    import torch
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # what a T4 answers by default
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(major=major, minor=5))
    monkeypatch.setattr(torch.version, "hip", hip)
    p = precision.for_device("auto", "auto", torch.device("cuda", 0))
    assert (p.mixed_precision, p.dtype) == want
    # bf16 chosen explicitly (the SD configs) on a GPU that emulates it: the log says so and names the fast settings
    bf16 = precision.choose("bf16", "bfloat16", "cuda")
    note = precision.gpu_note(bf16, precision.cuda_native_bf16(torch.device("cuda", 0)))
    assert ("emulated" in note and "train.mixed_precision=fp16 model.dtype=float16" in note) == (want[0] == "no")
    assert note.startswith("precision: bf16")


def test_auto_follows_what_accelerate_launch_asked_for_and_a_config_value_says_it_wins():
    """`accelerate launch --mixed_precision fp16 <script>` is how diffusers' examples run; its default is "no"."""
    p = precision.choose("auto", "auto", "cpu", False, "amx_bf16", launcher="bf16")
    assert (p.mixed_precision, p.dtype, p.why) == ("bf16", "bfloat16", "auto: as accelerate launch --mixed_precision bf16")
    p = precision.choose("auto", "auto", "cpu", False, None, launcher="fp16")  # emulated here: 0.013x fp32 on a Xeon
    assert (p.mixed_precision, p.why) == ("no", "auto: this CPU has no native bf16 (bf16 is emulated, slower than fp32); "
                                                "accelerate launch's --mixed_precision fp16 is not used: this CPU has no "
                                                "fp16 in hardware (train.mixed_precision=fp16 forces it)")
    p = precision.choose("auto", "auto", "cuda", False, None, launcher="bf16")  # a T4
    assert p.mixed_precision == "no" and p.why.endswith("this GPU has no bf16 in hardware (train.mixed_precision=bf16 forces it)")
    assert precision.choose("auto", "auto", "mps", launcher="fp16").why.endswith(
        "auto trains in fp32 on mps (train.mixed_precision=fp16 forces it)")
    p = precision.choose("auto", "auto", "cuda", True, None, launcher="fp16")
    assert (p.mixed_precision, p.dtype) == ("fp16", "float16")
    p = precision.choose("no", "float32", "cuda", True, None, launcher="fp16")
    assert (p.mixed_precision, p.why) == ("no", "accelerate launch's --mixed_precision fp16 is not used: "
                                                "train.mixed_precision=no decides")
    p = precision.choose("auto", "bfloat16", "cuda", True, None, launcher="fp16")
    assert p.why == ("train.mixed_precision=auto: as model.dtype=bfloat16; accelerate launch's --mixed_precision fp16 "
                     "is not used: model.dtype=bfloat16 decides")
    for quiet in ("no", None, "fp8"):  # the launcher's default, no launcher, a type adapt does not train in
        assert precision.choose("auto", "auto", "cpu", False, None, launcher=quiet).why.startswith("auto: this CPU has no")
    assert precision.choose("bf16", "bfloat16", "cpu", launcher="bf16").why == ""


def test_resume_keeps_the_checkpoints_precision():
    p = precision.choose("auto", "auto", "cpu", False, "avx512_bf16", checkpoint=("no", "float32"))
    assert (p.mixed_precision, p.dtype, p.why) == ("no", "float32", "auto: as the resumed checkpoint trained")
    p = precision.choose("bf16", "auto", "cpu", False, None, checkpoint=("no", "float32"))  # an explicit value wins
    assert (p.mixed_precision, p.dtype) == ("bf16", "bfloat16")


def test_cpu_note():
    fp32, bf16 = precision.Precision("no", "float32", ""), precision.Precision("bf16", "bfloat16", "auto: x")
    assert precision.cpu_note(fp32, 0.6) == "precision: fp32; this CPU's bf16 matmul runs 0.6x fp32"
    assert "model.dtype=bfloat16 train.mixed_precision=bf16 is likely faster" in precision.cpu_note(fp32, 2.3)
    assert precision.cpu_note(bf16, 2.3) == "precision: bf16 (auto: x); this CPU's bf16 matmul runs 2.3x fp32"
    assert "train.mixed_precision=no) is likely faster" in precision.cpu_note(bf16, 0.6)
    fp16 = precision.Precision("fp16", "float16", "auto: as accelerate launch --mixed_precision fp16")
    assert precision.cpu_note(fp16, 0.6, 0.1) == ("precision: fp16 (auto: as accelerate launch --mixed_precision fp16); "
                                                  "this CPU's fp16 matmul runs 0.1x fp32; fp32 (model.dtype=float32 "
                                                  "train.mixed_precision=no) is likely faster here")
    # bf16 weights without autocast were labelled "fp32" before
    assert precision.label("no", "bfloat16") == "bf16 weights, no autocast"
    assert precision.label("bf16", "float32") == "bf16 autocast, fp32 weights"


def _machine_flag() -> str | None:
    """This machine's native-bf16 flag, read independently of adapt."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = {f for line in text.splitlines() if line.startswith("flags") for f in line.split(":", 1)[1].split()}
    return next((f for f in ("avx512_bf16", "amx_bf16") if f in flags), None)


def test_recipe_auto_then_resume_keeps_the_checkpoints_precision(tiny_base, sg_folder, tmp_path):
    """The documented launch with precision left to auto: the log says what it chose and why, config.yaml records the
    concrete values; a resume with auto keeps the checkpoint's fp32 even where auto would now pick bf16."""
    import yaml
    out = tmp_path / "auto"
    r = run_recipe(recipe_args(tiny_base, sg_folder, out, "train.mixed_precision=auto", "train.max_steps=2"))
    assert r.returncode == 0, r.stderr[-3000:]
    flag = _machine_flag()
    want = f"precision: bf16 (auto: this CPU has native bf16 dot products ({flag}))" if flag else \
        "precision: fp32 (auto: this CPU has no native bf16"
    assert want in r.stdout
    used = yaml.safe_load((out / "config.yaml").read_text())
    assert (used["train"]["mixed_precision"], used["model"]["dtype"]) == (("bf16", "bfloat16") if flag else ("no", "float32"))

    out = tmp_path / "fp32"  # tiny_test.yaml trains in fp32 ...
    r = run_recipe(recipe_args(tiny_base, sg_folder, out, "train.max_steps=2"), launcher="python")
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_recipe(recipe_args(tiny_base, sg_folder, out, "train.mixed_precision=auto", "train.max_steps=3",  # ... auto resumes it
                               "train.resume_from_checkpoint=latest"), launch_args=["--mixed_precision", "bf16"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert ("precision: fp32 (auto: as the resumed checkpoint trained; accelerate launch's --mixed_precision bf16 is "
            "not used: the resumed checkpoint's precision decides)") in r.stdout
    assert [row["step"] for row in read_log(out)] == [1, 2, 3]


@pytest.mark.integration  # an `accelerate launch` run: `make test-integration`
def test_recipe_auto_weighs_accelerate_launch_mixed_precision(tiny_base, sg_folder, tmp_path):
    """diffusers' examples run `accelerate launch --mixed_precision fp16 ...`: on this machine's CPU fp16 is emulated
    (and bf16 is, unless the CPU has the flag), so auto keeps what the CPU computes fast and says why."""
    import yaml
    out = tmp_path / "o"
    r = run_recipe(recipe_args(tiny_base, sg_folder, out, "train.mixed_precision=auto", "model.dtype=auto",
                               "train.max_steps=1"), launch_args=["--mixed_precision", "fp16"])
    assert r.returncode == 0, r.stderr[-3000:]
    flag = _machine_flag()
    assert ("accelerate launch's --mixed_precision fp16 is not used: this CPU has no fp16 in hardware "
            "(train.mixed_precision=fp16 forces it)") in r.stdout
    used = yaml.safe_load((out / "config.yaml").read_text())
    assert (used["train"]["mixed_precision"], used["model"]["dtype"]) == (("bf16", "bfloat16") if flag else ("no", "float32"))
