"""Off the happy path, as users meet it: the real entry points (subprocess, `accelerate launch` where the README
uses it), real signals, a real full filesystem, files made by hand. Each test asserts the message, the exit code,
that no traceback escaped, and what is on disk afterwards."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from adapt import checkpoint, lora, runguard, synth
from conftest import ROOT, on_its_terminal, read_log, recipe_args, run_recipe, signals_as_in_a_terminal

pytestmark = pytest.mark.integration




def _ok(r):
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "Traceback" not in r.stderr


def _refused(r, *needles, code=2):
    assert r.returncode == code, (r.returncode, (r.stdout + r.stderr)[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    for n in needles:
        assert n in r.stderr, (n, r.stderr[-2000:])


def _weights(out):
    return lora.read(out)[0]


# ---------------------------------------------------------------- 1, 11: resume compatibility and edges

def test_resume_refuses_identity_changes_and_applies_allowed_optimizer_changes(tiny_base, sg_folder, tmp_path):
    out, ref = tmp_path / "o", tmp_path / "ref"
    common = ["train.max_steps=4", "train.checkpointing_steps=2"]
    _ok(run_recipe(recipe_args(tiny_base, sg_folder, out, *common), launcher="python"))
    resume = ["train.resume_from_checkpoint=latest", "train.max_steps=6"]
    r = run_recipe(recipe_args(tiny_base, sg_folder, out, *common[1:], *resume, "optim.lr=0.01"), launcher="python")
    _refused(r, "optim.lr: checkpoint 0.001, now 0.01", "train.resume_allow=[optim.lr]")
    r = run_recipe(recipe_args(tiny_base, sg_folder, out, *common[1:], *resume, "lora.rank=8", "data.num_images=4"), launcher="python")
    _refused(r, "lora.rank: checkpoint 4, now 8", "data.num_images: checkpoint 8, now 4")
    other = synth.build_imagefolder("sunglasses", tmp_path / "other", n=8, split="val")
    r = run_recipe(recipe_args(tiny_base, other, out, *common[1:], *resume), launcher="python")
    _refused(r, "data.source: checkpoint")
    r = run_recipe(recipe_args(tiny_base, sg_folder, out, *common[1:], "train.resume_from_checkpoint=latest", "train.max_steps=3"), launcher="python")
    _refused(r, "train.max_steps=3 is below the checkpoint's step 4")
    r = run_recipe(recipe_args(tiny_base, sg_folder, out, *common[1:], "train.resume_from_checkpoint=latest", "train.max_steps=4"), launcher="python")
    _refused(r, "nothing to train")
    assert (out / lora.WEIGHTS_NAME).is_file() and [p.name for p in checkpoint.list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]

    # The same continuation without and with an allowed lr change: the change is applied, logged and recorded.
    import shutil
    shutil.copytree(out, ref)
    _ok(run_recipe(recipe_args(tiny_base, sg_folder, ref, *common[1:], *resume), launcher="python"))
    r = run_recipe(recipe_args(tiny_base, sg_folder, out, *common[1:], *resume, "optim.lr=0.01", "train.resume_allow=[optim.lr]"), launcher="python")
    _ok(r)
    lrs = [row["lr"] for row in read_log(out)]
    assert lrs[:4] == [0.001] * 4 and lrs[4:] == [0.01, 0.01]
    a, b = _weights(ref), _weights(out)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) > 1e-4  # the new lr really trained
    f = lora.facts(out)
    assert f.optim["lr"] == 0.01 and f.resumes[-1]["changed"] == {"optim.lr": [0.001, 0.01], "train.max_steps": [4, 6]}
    assert "resumed at step 4 from checkpoint-4; changed:" in (out / "config.yaml").read_text()
    assert "optim.lr 0.001 -> 0.01" in (out / "README.md").read_text()


def test_latest_in_an_empty_folder_is_an_error_not_a_fresh_start(tiny_base, sg_folder, tmp_path):
    r = run_recipe(recipe_args(tiny_base, sg_folder, tmp_path / "empty", "train.resume_from_checkpoint=latest"), launcher="python")
    _refused(r, "no intact checkpoint in", "drop the key to start a new run")
    assert not (tmp_path / "empty" / lora.WEIGHTS_NAME).exists()


# ---------------------------------------------------------------- 2, 4: checkpoint history, damage, full disk

def test_resume_from_older_checkpoint_starts_a_clean_branch(tiny_base, sg_folder, tmp_path):
    out = tmp_path / "o"
    _ok(run_recipe(recipe_args(tiny_base, sg_folder, out, "train.max_steps=6", "train.checkpointing_steps=2", "train.checkpoints_total_limit=3"),
                   launcher="python"))
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    r = run_recipe(recipe_args(tiny_base, sg_folder, out, "train.max_steps=5", "train.checkpointing_steps=2", "train.checkpoints_total_limit=1",
                         f"train.resume_from_checkpoint={out / 'checkpoint-2'}"), launcher="python")
    _ok(r)
    assert "moved the 2 checkpoint(s) written after it" in r.stdout
    # pruning by write order kept the checkpoint just written, not the abandoned run's higher step numbers
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["checkpoint-5"]
    assert sorted(p.name for p in (out / "abandoned").glob("*/checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    assert checkpoint.resolve(out, "latest").name == "checkpoint-5"


def test_damaged_latest_checkpoint_falls_back_to_the_previous_intact_one(tiny_base, sg_folder, tmp_path):
    out = tmp_path / "o"
    _ok(run_recipe(recipe_args(tiny_base, sg_folder, out, "train.max_steps=4", "train.checkpointing_steps=2"), launcher="python"))
    lf = out / "checkpoint-4" / "lora.safetensors"
    lf.write_bytes(lf.read_bytes()[: lf.stat().st_size // 2])  # truncated, as a crash mid-copy leaves it
    r = run_recipe(recipe_args(tiny_base, sg_folder, out, "train.max_steps=6", "train.checkpointing_steps=2", "train.resume_from_checkpoint=latest"),
                   launcher="python")
    _ok(r)
    assert "skipping damaged checkpoint" in r.stdout and "lora.safetensors is unreadable" in r.stdout
    assert "resumed from" in r.stdout and "at step 2" in r.stdout
    (out / "checkpoint-6" / "optimizer.safetensors").unlink()
    r = run_recipe(recipe_args(tiny_base, sg_folder, out, "train.max_steps=8", f"train.resume_from_checkpoint={out / 'checkpoint-6'}"), launcher="python")
    _refused(r, "optimizer.safetensors is missing")


def test_corrupted_latent_cache_is_recomputed(tiny_base, sg_folder, tmp_path):
    cache = tmp_path / "cache"
    _ok(run_recipe(recipe_args(tiny_base, sg_folder, tmp_path / "a", "train.max_steps=1", f"data.cache_dir={cache}"), launcher="python"))
    (f,) = (cache / "latents").glob("*.safetensors")
    f.write_bytes(b"garbage" * 10)
    r = run_recipe(recipe_args(tiny_base, sg_folder, tmp_path / "b", "train.max_steps=1", f"data.cache_dir={cache}"), launcher="python")
    _ok(r)
    assert "is unreadable" in r.stdout and "recomputing it" in r.stdout and f.stat().st_size > 1000


@pytest.fixture
def small_fs(tmp_path):
    """A real 3 MiB tmpfs (root and mount rights needed; skipped with the reason otherwise)."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip() or r.returncode}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(fs):
    """Write fs/filler until the filesystem is full (ENOSPC)."""
    with open(fs / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass


def test_read_only_out_dir_and_cache_are_named(tiny_base, sg_folder, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {r.stderr.strip() or r.returncode}")
    try:  # root can write anywhere except on a read-only filesystem, so this is how "unwritable" is tested as root
        r = run_recipe(recipe_args(tiny_base, sg_folder, ro / "o", "train.max_steps=1"), launcher="python")
        _refused(r, f"out_dir {ro / 'o'}: cannot create it")
        r = run_recipe(recipe_args(tiny_base, sg_folder, tmp_path / "o", "train.max_steps=1"), launcher="python", env_extra={"ADAPT_CACHE": str(ro)})
        _refused(r, f"ADAPT_CACHE {ro} is not writable")
    finally:
        subprocess.run(["umount", "-l", str(ro)], capture_output=True)


def test_full_disk_at_the_final_save_loses_nothing(tiny_base, sg_folder, small_fs):
    out = small_fs / "o"
    env = {"ADAPT_FAULT": "fill_disk_after_step:3", "ADAPT_FILL_DIR": str(small_fs)}
    r = run_recipe(recipe_args(tiny_base, sg_folder, out, "train.max_steps=4", "train.checkpointing_steps=2", "validation.source=null"),
                   launcher="accelerate", env_extra=env)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]  # accelerate launch -q exits 1
    assert "error: could not write checkpoint at step 4" in r.stderr and "no space left" in r.stderr
    assert "Previous checkpoint intact:" in r.stderr and "checkpoint-2" in r.stderr
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["checkpoint-2"]
    assert not list(out.glob(".checkpoint-*")) and not (out / lora.WEIGHTS_NAME).exists()
    (small_fs / "filler").unlink()  # the user frees space and resumes: the run completes exactly
    r = run_recipe(recipe_args(tiny_base, sg_folder, out, "train.max_steps=4", "train.checkpointing_steps=2", "train.resume_from_checkpoint=latest"),
                   launcher="python")
    _ok(r)
    assert (out / lora.WEIGHTS_NAME).is_file() and [x["step"] for x in read_log(out)] == [1, 2, 3, 4]


def test_full_disk_during_an_adapter_write_keeps_the_previous_adapter(tiny_base, small_fs):
    import torch
    from adapt import atomic, model
    from adapt.facts import AdapterFacts
    pipe, _ = model.load_base(str(tiny_base))
    lora.attach(pipe.unet, "cross_attn", rank=4)
    path = lora.save(small_fs, pipe.unet, AdapterFacts(architecture="sd", strength=0.5))
    before = path.read_bytes()
    _fill(small_fs)
    for p in pipe.unet.parameters():
        p.data.add_(1.0) if p.requires_grad else None
    with pytest.raises(atomic.WriteError, match="no space left on the device; the previous version is intact"):
        lora.save(small_fs, pipe.unet, AdapterFacts(architecture="sd", strength=0.5))
    assert path.read_bytes() == before and sorted(p.name for p in small_fs.iterdir()) == ["filler", lora.WEIGHTS_NAME]
    with pytest.raises(checkpoint.CheckpointError, match="no space left on the device.*Previous checkpoint intact: none"):
        checkpoint.save(small_fs, 1, {"w": torch.zeros(4096)}, torch.optim.SGD([torch.zeros(1, requires_grad=True)]), {})
    assert not [p for p in small_fs.iterdir() if p.name.startswith(".")]


def test_a_full_disk_costs_log_lines_said_once_never_the_run(small_fs, capsys):
    from adapt import atomic
    log = small_fs / "train.log"
    atomic.append_line(log, "first")
    _fill(small_fs)
    for i in range(3):
        atomic.append_line(log, "x" * 8192 + str(i))  # more than a page: tmpfs has no room for it
    err = capsys.readouterr().err
    assert err.count(f"warning: cannot append to {log} (No space left on device)") == 1, err
    assert log.read_text().startswith("first\n")


# ---------------------------------------------------------------- 3, 5: signals, launcher death, concurrent runs

def _launch(base, data, out, *extra, env_extra=None, terminal: int | None = None):
    """`accelerate launch` in its own session (so a test can signal its process group like a terminal does); with
    `terminal` (a pty's slave fd) that pty is its stdio and controlling terminal, as a login shell's job has it."""
    bindir = Path(sys.executable).parent
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(env_extra or {}))
    cmd = [str(bindir / "accelerate"), "launch", "-q", "--config_file", str(ROOT / "accelerate_config.yaml"),
           str(ROOT / "recipes" / "lora_img2img.py"), *recipe_args(base, data, out, *extra)]
    if terminal is None:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True, preexec_fn=signals_as_in_a_terminal)
    return subprocess.Popen(cmd, env=env, stdin=terminal, stdout=terminal, stderr=terminal, start_new_session=True,
                            preexec_fn=on_its_terminal)


def _wait_for_steps(out, n, proc, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        log = out / "logs" / "train_log.jsonl"
        if log.exists() and len(log.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    raise AssertionError("training did not reach the step")


def _trainer_pid(launcher_pid):
    kids = subprocess.run(["ps", "-o", "pid=", "--ppid", str(launcher_pid)], capture_output=True, text=True).stdout.split()
    return int(kids[0])


def test_ctrl_c_under_accelerate_launch_checkpoints_and_says_how_to_resume(tiny_base, sg_folder, tmp_path):
    out = tmp_path / "o"
    p = _launch(tiny_base, sg_folder, out, "train.max_steps=100000", "train.checkpointing_steps=0", "validation.source=null")
    _wait_for_steps(out, 3, p)
    trainer = _trainer_pid(p.pid)
    os.killpg(p.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
    stdout, stderr = p.communicate(timeout=120)
    while runguard.alive(trainer):
        time.sleep(0.1)
    assert "interrupted at step" in stdout and "train.resume_from_checkpoint=latest" in stdout, stdout[-2000:]
    assert "lora_img2img.py" not in stderr and "adapt/" not in stderr  # no trace from adapt (accelerate's launcher may add its own)
    (ck,) = checkpoint.list_checkpoints(out)
    step = int(ck.name.split("-")[1])
    assert [x["step"] for x in read_log(out)] == list(range(1, step + 1)) and not (out / lora.WEIGHTS_NAME).exists()
    assert not (out / ".adapt.lock").exists()
    r = run_recipe(recipe_args(tiny_base, sg_folder, out, f"train.max_steps={step + 2}", "train.resume_from_checkpoint=latest"), launcher="python")
    _ok(r)
    assert f"at step {step}" in r.stdout


def test_a_dropped_terminal_checkpoints_like_ctrl_c(tiny_base, sg_folder, tmp_path):
    """An ssh session drops: `accelerate launch` runs on a real pseudo-terminal as its controlling terminal, and the
    terminal's master side closes. The kernel hangs the terminal up: SIGHUP to the launcher, then to the trainer's
    group as the launcher dies, and every later write to the terminal fails. The trainer finishes its step, writes a
    checkpoint and says so in train.log."""
    import select
    out = tmp_path / "o"
    master, slave = os.openpty()
    p = _launch(tiny_base, sg_folder, out, "train.max_steps=100000", "train.checkpointing_steps=0",
                "validation.source=null", terminal=slave)
    os.close(slave)
    t0, seen = time.time(), b""
    log = out / "logs" / "train_log.jsonl"
    while not (log.exists() and len(log.read_text().splitlines()) >= 3):  # read the terminal, as sshd does
        assert p.poll() is None and time.time() - t0 < 120, seen[-2000:]
        if select.select([master], [], [], 0.1)[0]:
            seen += os.read(master, 65536)
    trainer = _trainer_pid(p.pid)
    os.close(master)  # the connection is gone
    p.wait(timeout=120)
    t0 = time.time()
    while runguard.alive(trainer) and time.time() - t0 < 120:
        time.sleep(0.1)
    assert not runguard.alive(trainer)
    text = (out / "train.log").read_text()
    assert "SIGHUP received" in text and "interrupted at step" in text, text[-2000:]
    (ck,) = checkpoint.list_checkpoints(out)
    step = int(ck.name.split("-")[1])
    assert f"interrupted at step {step}" in text and [x["step"] for x in read_log(out)] == list(range(1, step + 1))
    assert not (out / ".adapt.lock").exists()
    r = run_recipe(recipe_args(tiny_base, sg_folder, out, f"train.max_steps={step + 1}", "train.resume_from_checkpoint=latest"),
                   launcher="python")
    _ok(r)


def test_sigterm_exit_code_and_killed_launcher_stops_the_trainer(tiny_base, sg_folder, tmp_path):
    for sig, code in (("sigint", 130), ("sigterm", 143)):
        out = tmp_path / sig
        r = run_recipe(recipe_args(tiny_base, sg_folder, out, "train.max_steps=6"), launcher="python",
                       env_extra={"ADAPT_FAULT": f"{sig}_after_step:3"})  # arrives as step 4 starts: step 4 finishes
        assert r.returncode == code and "interrupted at step 4" in r.stdout and "Traceback" not in r.stderr, r.stderr[-2000:]
        assert [p.name for p in checkpoint.list_checkpoints(out)] == ["checkpoint-4"] and len(read_log(out)) == 4

    out2 = tmp_path / "o2"
    p = _launch(tiny_base, sg_folder, out2, "train.max_steps=100000", "validation.source=null")
    _wait_for_steps(out2, 2, p)
    trainer = _trainer_pid(p.pid)
    os.kill(p.pid, signal.SIGKILL)  # the launcher dies; its trainer must not run on orphaned
    p.wait()
    t0 = time.time()
    while runguard.alive(trainer) and time.time() - t0 < 60:
        time.sleep(0.1)
    assert not runguard.alive(trainer), "trainer still running after its launcher died"
    assert len(checkpoint.list_checkpoints(out2)) == 1 and "launcher" in (out2 / "train.log").read_text()


def test_ddp_ranks_agree_to_stop_when_one_is_signalled(tiny_base, sg_folder, tmp_path):
    out = tmp_path / "ddp"
    # only rank 1 is told, during step 3; the ranks agree at the next sync point (train.log_every=5): step 5
    r = run_recipe(recipe_args(tiny_base, sg_folder, out, "train.max_steps=50", "train.log_every=5"), nproc=2, timeout=300,
                   env_extra={"ADAPT_FAULT": "sigterm_on_rank1_after_step:2"})
    assert r.returncode != 0 and "interrupted at step 5" in r.stdout, (r.stdout + r.stderr)[-3000:]
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["checkpoint-5"]
    assert [x["step"] for x in read_log(out)] == [1, 2, 3, 4, 5]
    r = run_recipe(recipe_args(tiny_base, sg_folder, out, "train.max_steps=6", "train.resume_from_checkpoint=latest"), nproc=2, timeout=300)
    _ok(r)
    assert "all 2 ranks hold identical LoRA weights" in r.stdout


def test_second_run_into_the_same_out_dir_is_refused_and_stale_locks_are_taken_over(tiny_base, sg_folder, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import socket
        (out / ".adapt.lock").write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname(), "started": "now"}))
        r = run_recipe(recipe_args(tiny_base, sg_folder, out, "train.max_steps=1"), launcher="python")
        _refused(r, f"in use by another training run (pid {sleeper.pid}")
        assert not (out / "logs").exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    r = run_recipe(recipe_args(tiny_base, sg_folder, out, "train.max_steps=1"), launcher="python")
    _ok(r)
    assert f"removing the stale lock of pid {sleeper.pid}" in r.stdout and not (out / ".adapt.lock").exists()


# ---------------------------------------------------------------- 6, 7: files the user owns, data

def test_data_build_never_mixes_folders(tmp_path):
    adapt = str(Path(sys.executable).parent / "adapt")
    out = tmp_path / "d"
    assert subprocess.run([adapt, "data", "build", "synth_faces", "--out", str(out), "--n", "3"], cwd=ROOT).returncode == 0
    r = subprocess.run([adapt, "data", "build", "synth_sunglasses", "--out", str(out), "--n", "2"], cwd=ROOT, capture_output=True, text=True)
    _refused(r, "exists and is not empty; pass --overwrite")
    assert len(list(out.glob("*.png"))) == 3
    r = subprocess.run([adapt, "data", "build", "synth_sunglasses", "--out", str(out), "--n", "2", "--overwrite"], cwd=ROOT,
                       capture_output=True, text=True)
    _ok(r)
    assert len(list(out.glob("*.png"))) == 2 and len((out / "metadata.jsonl").read_text().splitlines()) == 2


def test_bom_and_outside_symlinks_and_caption_templates(tiny_base, sg_folder, tmp_path):
    import shutil
    data = tmp_path / "data"
    shutil.copytree(sg_folder, data)
    meta = (data / "metadata.jsonl").read_bytes()
    (data / "metadata.jsonl").write_bytes(b"\xef\xbb\xbf" + meta)  # saved by Notepad
    outside = tmp_path / "elsewhere.png"
    shutil.copy(sg_folder / "train_000000.png", outside)
    (data / "link.png").symlink_to(outside)
    r = run_recipe(recipe_args(tiny_base, data, tmp_path / "o", "train.max_steps=1", "data.num_images=null",
                         "data.default_caption=a photo of {name}"), launcher="python")
    _ok(r)
    assert "8 images usable, 1 skipped" in r.stdout and "symlink points outside the dataset folder" in r.stdout
    assert "byte-order mark" in r.stdout and "default used" not in r.stdout  # every listed image kept its caption
    report = json.loads((tmp_path / "o" / "logs" / "data_report.json").read_text())
    assert report["kept"] == 8 and report["skipped"]["symlink points outside the dataset folder"] == ["link.png"]


# ---------------------------------------------------------------- 8: adapters from elsewhere

def test_adapter_from_another_base_warns_and_bad_files_are_one_line(tiny_base, tiny_v_base, sg_folder, tmp_path):
    out = tmp_path / "o"
    _ok(run_recipe(recipe_args(tiny_base, sg_folder, out, "train.max_steps=1"), launcher="python"))
    adapt = str(Path(sys.executable).parent / "adapt")
    img = str(sg_folder / "train_000000.png")
    r = subprocess.run([adapt, "--threads", "1", "sample", "--base", str(tiny_v_base), "--adapter", str(out), "--image", img,
                        "--steps", "4", "--out", str(tmp_path / "s")], capture_output=True, text=True)
    _ok(r)
    assert f"was trained on {tiny_base}, this pipeline is {tiny_v_base}" in r.stdout + r.stderr
    bad = tmp_path / "bad"
    bad.mkdir()
    data = (out / lora.WEIGHTS_NAME).read_bytes()
    (bad / lora.WEIGHTS_NAME).write_bytes(data[: len(data) // 3])
    for argv in (["inspect", str(bad)], ["export", str(bad), "--format", "kohya", "--out", str(tmp_path / "k.safetensors")],
                 ["sample", "--adapter", str(bad), "--image", img]):
        r = subprocess.run([adapt, *argv], capture_output=True, text=True)
        _refused(r, "not a readable .safetensors file")


def test_final_checkpoint_lets_a_finished_run_continue(tiny_base, sg_folder, tmp_path):
    out = tmp_path / "o"
    _ok(run_recipe(recipe_args(tiny_base, sg_folder, out, "train.max_steps=3", "train.checkpointing_steps=0"), launcher="python"))
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["checkpoint-3"]
    r = run_recipe(recipe_args(tiny_base, sg_folder, out, "train.max_steps=5", "train.resume_from_checkpoint=latest"), launcher="python")
    _ok(r)
    assert np.array([x["step"] for x in read_log(out)]).tolist() == [1, 2, 3, 4, 5] and lora.facts(out).steps_trained == 5


# ---------------------------------------------------------------- the decoder phase (decoder.steps), off the path

def test_ctrl_c_during_the_decoder_phase_and_a_full_disk_at_its_save(tiny_base, sg_folder, tmp_path, small_fs):
    """A real Ctrl-C to the launcher's process group while the decoder trains: exit 130, one line saying nothing was
    saved and how to start again, no vae/ and no checkpoint. Then a real full filesystem when vae/ is written: one
    error line, nothing half-written; after space is freed the same command runs through."""
    out = tmp_path / "o"
    p = _launch(tiny_base, sg_folder, out, "decoder.steps=100000", "train.max_steps=2", "validation.source=null")
    t0 = time.time()
    while not (out / "train.log").exists() or "decoder: fine-tuning" not in (out / "train.log").read_text():
        assert p.poll() is None and time.time() - t0 < 120, p.communicate()
        time.sleep(0.1)
    time.sleep(2)  # inside the decoder's loop
    os.killpg(p.pid, signal.SIGINT)
    stdout, stderr = p.communicate(timeout=120)
    assert "SIGINT during the decoder fine-tuning: it was not saved and no LoRA step ran" in stdout, stdout[-2000:]
    assert "lora_img2img.py" not in stderr and "adapt/" not in stderr
    assert not (out / "vae").exists() and not checkpoint.list_checkpoints(out) and not (out / ".adapt.lock").exists()
    r = run_recipe(recipe_args(tiny_base, sg_folder, out, "decoder.steps=3", "train.max_steps=2", "validation.source=null"),
                   launcher="python")  # the same out_dir, started again (with fewer decoder steps, to be quick)
    _ok(r)

    out = small_fs / "o"
    filler = small_fs / "filler"
    with open(filler, "wb") as f:  # leave ~150 kB: room for config and logs, not for the 344 kB VAE
        f.write(b"\0" * (3 * 2**20 - 150 * 2**10))
    args = recipe_args(tiny_base, sg_folder, out, "decoder.steps=3", "train.max_steps=2", "validation.source=null")
    r = run_recipe(args, launcher="python")
    _refused(r, f"could not write {out / 'vae' / 'diffusion_pytorch_model.safetensors'}: no space left on the device",
             "no LoRA step ran: free space and rerun the same command")
    assert not (out / "vae").exists() or not any((out / "vae").iterdir())  # no half-written file left behind
    assert not checkpoint.list_checkpoints(out)
    filler.unlink()
    r = run_recipe(args, launcher="python")  # the same command, as the message says
    _ok(r)
    assert (out / "vae" / "config.json").is_file() and lora.facts(out).decoder["steps"] == 3
