"""Every image `adapt sample` writes says how it was made (adapt.provenance): WebUI's 'parameters' text, adapt's
record, and `adapt inspect IMAGE.png`, whose command makes the same image again from its source alone."""

import hashlib
import json
import re
import shlex

import numpy as np
import pytest
from PIL import Image

from adapt import lora, provenance, synth
from conftest import on_its_terminal, signals_as_in_a_terminal
from test_cli import adapt_cli, adapter_dir  # noqa: F401  (the module fixture: a random adapter with strength 0.5)

# WebUI's infotext grammar (modules/infotext_utils.py): prompt lines, then one line of "Key: value" pairs, a value
# either a JSON-quoted string or running to the next comma; the line counts as parameters with >= 3 pairs.
WEBUI_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def webui_parse(text: str) -> tuple[str, dict]:
    *lines, last = text.strip().split("\n")
    pairs = WEBUI_PARAM.findall(last)
    assert len(pairs) >= 3, last
    return "\n".join(lines), {k: json.loads(v) if v.startswith('"') else v for k, v in pairs}


def tensor_data_sha256(path) -> str:
    data = open(path, "rb").read()
    n = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + n:]).hexdigest()


def test_each_output_records_how_it_was_made_and_its_command_makes_it_again(tiny_base, adapter_dir, tmp_path):
    srcs = []
    for i in range(3):
        img, _, _ = synth.make("faces", "eval", i)
        img.save(tmp_path / f"face {i}.png")  # a space in the name: the printed command must quote it
        srcs.append(tmp_path / f"face {i}.png")
    r = adapt_cli("sample", "--base", tiny_base, "--adapter", adapter_dir, "--scale", 1.5, "--image", *srcs,
                  "--prompt", "a face, wearing sunglasses", "--seed", 5, "--mask", "auto", "--mask-close", 0, "--mask-dilate", 0,
                  "--out", tmp_path / "my samples")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "my samples" / "img2img_002.png"
    (hint,) = re.findall(r"`(adapt inspect [^`]+)`", r.stdout + r.stderr)  # the printed hint runs as pasted
    assert shlex.split(hint)[2] == str(tmp_path / "my samples" / "img2img_000.png")
    rec = provenance.read(out)
    assert (rec.kind, rec.seed, rec.strength, rec.steps, rec.scheduler) == ("img2img", 7, 0.5, 10, "ddim")  # seed 5 + index 2
    assert rec.source == str(srcs[2].resolve()) and rec.source_sha256 == hashlib.sha256(srcs[2].read_bytes()).hexdigest()
    assert (rec.width, rec.height) == Image.open(out).size == (64, 64)
    [ad] = rec.adapters
    assert ad.sha256 == lora.weights_sha256(adapter_dir) and ad.scale == 1.5
    assert ad.short_hash == tensor_data_sha256(lora.weights_path(adapter_dir))[:12]
    assert rec.mask.source == "auto" and 0 < rec.mask.area < 1 and rec.mask.settings["close"] == 0

    prompt, params = webui_parse(Image.open(out).info["parameters"])
    name = adapter_dir.name
    assert prompt == f"a face, wearing sunglasses <lora:{name}:1.5>"
    assert params["Seed"] == "7" and params["Size"] == "64x64" and params["Denoising strength"] == "0.5"
    assert params["Steps"] == "10" and params["Sampler"] == "DDIM" and params["Lora hashes"] == f"{name}: {ad.short_hash}"

    r = adapt_cli("inspect", out, "--json")
    assert r.returncode == 0, r.stderr
    cmd = shlex.split(json.loads(r.stdout)["reproduce"])
    assert cmd[:2] == ["adapt", "sample"]
    r = adapt_cli(*cmd[1:], "--out", tmp_path / "again")
    assert r.returncode == 0, r.stderr
    again = np.asarray(Image.open(tmp_path / "again" / "img2img_000.png"))
    # the third image alone, from its record. Its mask and noise come from its own seed, so only float rounding
    # differs: CPU kernels may block a batch of 3 and of 1 differently (an Intel Xeon moved 1 of 12,288 values by one
    # level; an AMD Zen 4 gave the same bytes)
    d = np.abs(again.astype(int) - np.asarray(Image.open(out)).astype(int))
    assert d.max() <= 1 and (d > 0).mean() < 1e-3, (d.max(), (d > 0).mean())
    r = adapt_cli(*cmd[1:], "--out", tmp_path / "again2")  # the same command in the same batch: bit for bit
    assert r.returncode == 0, r.stderr
    assert np.array_equal(again, np.asarray(Image.open(tmp_path / "again2" / "img2img_000.png")))
    assert provenance.read(tmp_path / "again" / "img2img_000.png").seed == 7


def test_txt2img_records_and_honours_resolution(tiny_base, tmp_path):
    r = adapt_cli("sample", "--base", tiny_base, "--prompt", "a face", "--num-images", 2, "--steps", 3, "--seed", 3,
                  "--resolution", 32, "--out", tmp_path)
    assert r.returncode == 0, r.stderr
    recs = [provenance.read(tmp_path / f"txt2img_00{i}.png") for i in range(2)]
    assert [(x.kind, x.seed, x.width, x.height, x.adapters, x.strength) for x in recs] == [("txt2img", 3, 32, 32, [], None),
                                                                                        ("txt2img", 4, 32, 32, [], None)]
    assert Image.open(tmp_path / "txt2img_001.png").size == (32, 32)  # --resolution used to be ignored by txt2img


def test_records_are_checked_and_images_without_one_are_named(tmp_path):
    rec = provenance.SampleRecord(kind="txt2img", prompt="p", seed=0, steps=1, scheduler="ddim", guidance=1.0, width=8,
                                  height=8, resolution=8, base="b", base_resolved="b")
    assert provenance.SampleRecord.from_json(rec.to_json()) == rec
    newer = json.loads(rec.to_json()) | {"version": provenance.RECORD_VERSION + 1}
    with pytest.raises(provenance.ProvenanceError, match="newer than this adapt reads"):
        provenance.SampleRecord.from_json(json.dumps(newer))
    with pytest.raises(provenance.ProvenanceError, match="needs its source image"):
        provenance.SampleRecord(**{**json.loads(rec.to_json()), "kind": "img2img"})
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    r = adapt_cli("inspect", tmp_path / "plain.png")
    assert r.returncode == 2 and "no adapt record" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.integration  # a real signal to a subprocess: `make test-integration`
@pytest.mark.parametrize("stop", ["ctrl_c", "dropped_terminal"])
def test_a_stop_keeps_the_images_already_finished(stop, tiny_base, tmp_path):
    """Ctrl-C (a real SIGINT), or an ssh session that drops: `adapt sample` runs on a real pseudo-terminal as its
    controlling terminal and the master side closes, so the kernel hangs it up (SIGHUP) and every later write to
    the terminal fails. Either way the finished images stay, whole and each with its record, and the exit is 130."""
    import os
    import select
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path
    img = tmp_path / "face.png"
    synth.make("faces", "eval", 0)[0].save(img)
    out = tmp_path / "s"
    cmd = [str(Path(sys.executable).parent / "adapt"), "--threads", "1", "sample", "--base", str(tiny_base),
           "--image", *[str(img)] * 40, "--strength", "1", "--steps", "400", "--out", str(out)]
    if stop == "ctrl_c":
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=signals_as_in_a_terminal)
    else:
        master, slave = os.openpty()
        p = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, start_new_session=True, preexec_fn=on_its_terminal)
        os.close(slave)
    deadline = time.time() + 120
    while not (out / "img2img_007.png").exists() and p.poll() is None and time.time() < deadline:
        if stop == "dropped_terminal" and select.select([master], [], [], 0.05)[0]:
            os.read(master, 65536)  # read the terminal, as sshd does
        time.sleep(0.05)  # the first batch of 8 is written as soon as it is done
    if stop == "ctrl_c":
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
        assert p.returncode == 130 and "Traceback" not in err, err[-2000:]
    else:
        os.close(master)  # the connection is gone; what adapt says after this goes nowhere
        assert p.wait(timeout=120) == 130
    kept = sorted(out.glob("img2img_*.png"))
    assert 8 <= len(kept) < 40
    if stop == "ctrl_c":
        assert f"interrupted: {len(kept)} of 40 image(s) were finished" in err
    assert [provenance.read(k).seed for k in kept] == list(range(len(kept)))  # whole files, each with its record
    assert not list(out.glob(".*"))  # no temporary file left half written
