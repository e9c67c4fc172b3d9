"""GPU check: adapt's recipe and diffusers' reference LoRA trainer side by side on one GPU.

    python recipes/gpu_check.py --out runs/gpu_check [--peer DIR] [--cases sd15,sdxl] [--compile] [--deadline S] [--tiny]

Cases (random weights in the published shapes, since a GPU box here reaches no hub):
  sd15  SD 1.5 architecture, 512 px, bf16, batch 4, rank 8
  sdxl  SDXL architecture, 1024 px, bf16, gradient checkpointing, batch 1, rank 8
Each case runs adapt (the shipped GPU config, cross_attn preset) and, when --peer holds diffusers'
examples/text_to_image/train_text_to_image_lora{,_sdxl}.py (read from a diffusers snapshot, never
committed), the reference on the same data, steps, batch, rank and precision. Printed per run:
steady samples/s (second half of the steps), peak GPU memory (nvidia-smi, whole device, CUDA context
included; adapt also reports torch's max_memory_allocated), the loss over the first and last quarter of
the steps, and the seconds from launch to the first step. --tiny runs the same path on tiny models at
64 px on CPU (the test suite does this). Results: <out>/results.json and <out>/results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    "sd15": dict(res=512, batch=4, steps=100, gc=False, config="sd15_sunglasses.yaml", ref="train_text_to_image_lora.py"),
    "sdxl": dict(res=1024, batch=1, steps=100, gc=True, config="sdxl_sunglasses.yaml", ref="train_text_to_image_lora_sdxl.py"),
}
SYNC = 10  # train.log_every for adapt's runs: the loss is read back from the device every SYNC steps


def build_base(case: str, where: Path, tiny: bool) -> Path:
    import torch
    if (where / "model_index.json").is_file():
        return where
    if tiny:
        from adapt.tiny import save_tiny_pipeline, save_tiny_sdxl_pipeline
        return (save_tiny_sdxl_pipeline if case == "sdxl" else save_tiny_pipeline)(where)
    from adapt import archs
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if case == "sdxl":
        pipe = archs.build_sdxl_pipeline(dtype=torch.bfloat16, device=dev)
    else:
        pipe = archs.build_sd15_pipeline(dtype=torch.bfloat16)
    pipe.save_pretrained(where, safe_serialization=True)
    del pipe
    return where


class GpuMemory:
    """Peak device memory in MB over a run, polled from nvidia-smi (None without one)."""

    def __init__(self):
        self.peak, self._stop = None, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _read(self):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=5).stdout
            return int(out.split()[0])
        except (OSError, ValueError, IndexError, subprocess.SubprocessError):
            return None

    def _poll(self):
        while not self._stop.is_set():
            v = self._read()
            if v is not None:
                self.peak = max(self.peak or 0, v)
            time.sleep(0.25)

    def __enter__(self):
        self.idle = self._read()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _quarters(losses: list[float]) -> tuple[float | None, float | None]:
    q = max(1, len(losses) // 4)
    mean = lambda xs: round(sum(xs) / len(xs), 5) if xs else None
    return mean(losses[:q]), mean(losses[-q:])


def _launch(tiny: bool, mixed: str) -> list[str]:
    acc = [str(Path(sys.executable).parent / "accelerate"), "launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", mixed, "--dynamo_backend", "no"]
    return acc + (["--cpu"] if tiny else [])


def run_adapt(case, c, base, data, out, tiny, preset="cross_attn", timeout=600, compile_mode="off") -> dict:
    name = f"adapt {preset}" + (f" compile={compile_mode}" if compile_mode != "off" else "")
    run_dir = out / f"adapt_{case}_{preset}" if compile_mode == "off" else out / f"adapt_{case}_{preset}_compile"
    sync = 1 if tiny else SYNC  # the tiny CPU path runs 3 steps: every step a sync point
    cmd = _launch(tiny, "bf16") + [str(ROOT / "recipes/lora_img2img.py"), "--config", str(ROOT / "recipes/configs" / c["config"]),
                                   f"model.base={base}", f"data.source={data}", f"data.resolution={c['res']}",
                                   f"train.batch_size={c['batch']}", f"train.max_steps={c['steps']}", "lora.rank=8", "lora.alpha=8",
                                   f"lora.preset={preset}", f"train.gradient_checkpointing={str(c['gc']).lower()}",
                                   "data.random_flip=false", "train.checkpointing_steps=0", "validation.source=null", f"train.log_every={sync}",
                                   f"train.compile={compile_mode}", f"out_dir={run_dir}", "train.overwrite=true"] + (["train.num_threads=1"] if tiny else [])
    t0 = time.time()
    with GpuMemory() as mem:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    wall = time.time() - t0
    if r.returncode != 0:
        return {"trainer": name, "error": (r.stderr or r.stdout)[-1500:]}
    rows = [json.loads(l) for l in (run_dir / "logs/train_log.jsonl").read_text().splitlines() if l.strip()]
    fx = json.loads(__import__("safetensors").safe_open(str(run_dir / "pytorch_lora_weights.safetensors"), "pt").metadata()["adapt"])
    # rows of steps the device had finished: the sync points (every `sync` steps, and the last); the rows between
    # them carry the time the host queued their step
    half = [x for x in rows[len(rows) // 2:] if x["step"] % sync == 0 or x is rows[-1]]
    steady = (half[-1]["step"] - half[0]["step"]) / (half[-1]["time"] - half[0]["time"]) \
        if len(half) > 1 and half[-1]["time"] > half[0]["time"] else None
    first, last = _quarters([x["loss"] for x in rows])
    return {"trainer": name, "steps": len(rows), "steady_it_s": steady and round(steady, 3),
            "samples_s": steady and round(steady * c["batch"], 3), "wall_s": round(wall, 1),
            "first_step_after_s": round(rows[0]["time"] - t0, 1), "peak_gpu_mb": mem.peak and mem.peak - (mem.idle or 0),
            "torch_peak_mb": fx["figures"].get("peak_cuda_mb"), "loss_first_quarter": first, "loss_last_quarter": last}


def run_reference(case, c, base, data, out, tiny, peer: Path, timeout=600) -> dict:
    script = peer / c["ref"]
    cmd = _launch(tiny, "bf16") + [str(script), "--pretrained_model_name_or_path", str(base), "--train_data_dir", str(data),
                                   "--resolution", str(c["res"]), "--train_batch_size", str(c["batch"]),
                                   "--max_train_steps", str(c["steps"]), "--learning_rate", "1e-4", "--lr_warmup_steps", "0",
                                   "--rank", "8", "--output_dir", str(out / f"reference_{case}"), "--seed", "0",
                                   "--dataloader_num_workers", "0", "--mixed_precision", "bf16", "--checkpointing_steps", "100000"]
    if c["gc"]:
        cmd.append("--gradient_checkpointing")
    t0 = time.time()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with GpuMemory() as mem:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=out, env=env)
    wall = time.time() - t0
    log = (r.stdout + r.stderr).replace("\r", "\n")
    if r.returncode != 0:
        return {"trainer": "reference", "error": log[-1500:]}
    rates = re.findall(rf"(\d+)/{c['steps']} \[[0-9:]+<[0-9:?]+, +([0-9.]+)(s/it|it/s)", log)
    losses = [float(x) for x in re.findall(r"step_loss=([0-9.eE+-]+)", log)]
    rate = None
    if rates:
        v = float(rates[-1][1])
        rate = v if rates[-1][2] == "it/s" else 1 / v
    first, last = _quarters(losses)
    return {"trainer": "reference", "steps": c["steps"], "steady_it_s": rate and round(rate, 3),
            "samples_s": rate and round(rate * c["batch"], 3), "wall_s": round(wall, 1), "first_step_after_s": None,
            "peak_gpu_mb": mem.peak and mem.peak - (mem.idle or 0), "torch_peak_mb": None,
            "loss_first_quarter": first, "loss_last_quarter": last, "note": "tqdm's smoothed rate"}


def _table(results: dict) -> str:
    lines = [f"device: {results['device']}, torch {results['torch']}", "",
             "| case | trainer | samples/s | peak GPU MB (smi) | torch peak MB | first step after s | wall s | loss first→last quarter |",
             "|---|---|---|---|---|---|---|---|"]
    for case, r in results["cases"].items():
        for x in r["runs"]:
            if "error" in x:
                lines.append(f"| {case} | {x['trainer']} | error: {x['error'][-200:]!r} | | | | | |")
                continue
            lines.append(f"| {case} | {x['trainer']} | {x['samples_s']} | {x['peak_gpu_mb']} | {x['torch_peak_mb']} | "
                         f"{x['first_step_after_s']} | {x['wall_s']} | {x['loss_first_quarter']} → {x['loss_last_quarter']} |")
    lines += [f"skipped: {x}" for x in results["skipped"]]
    return "\n".join(lines) + "\n"


def _write(results: dict, dests: list[Path]) -> None:
    """After every run: a lease that ends mid-plan still leaves the finished runs on disk."""
    for d in dests:
        d.mkdir(parents=True, exist_ok=True)
        (d / "results.json").write_text(json.dumps(results, indent=1))
        (d / "results.md").write_text(_table(results))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--results", default=None, help="also write results.json/.md here after every run (default: --out only)")
    ap.add_argument("--peer", default=None, help="folder holding diffusers' reference scripts (optional)")
    ap.add_argument("--cases", default="sd15,sdxl")
    ap.add_argument("--tiny", action="store_true", help="tiny models, 64 px, 3 steps, CPU: the path, not the speed")
    ap.add_argument("--all-attn", action="store_true", help="also run adapt with the reference's layers (all_attn)")
    ap.add_argument("--compile", nargs="?", const="all", default=None, metavar="CASES",
                    help="also run adapt with train.compile=regional (steady it/s after the warm-up, and the first step's "
                    "delay, against the eager run): for every case, or the comma-separated CASES")
    ap.add_argument("--steps", type=int, default=None, help="override every case's step count")
    ap.add_argument("--no-reference", action="store_true", help="run adapt only")
    ap.add_argument("--timeout", type=int, default=420, help="seconds per trainer run")
    ap.add_argument("--deadline", type=int, default=None, help="seconds for the whole check: each run gets what is left "
                    "(at most --timeout) and runs that would get under 30 s are skipped and listed, so results land in time")
    a = ap.parse_args(argv)
    t_start = time.time()
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    dests = [out] + ([Path(a.results).resolve()] if a.results else [])
    from adapt import synth
    import torch
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    results = {"device": device, "torch": torch.__version__, "cases": {}, "skipped": []}
    peer = Path(a.peer).resolve() if a.peer else None
    cases = {}
    for case in a.cases.split(","):
        c = dict(CASES[case])
        if a.tiny:
            c.update(res=64, steps=3, batch=2)
        if a.steps:
            c.update(steps=a.steps)
        cases[case] = c
        results["cases"][case] = {"settings": c, "runs": []}
    # The plan: each case's eager adapt run and its reference first (the comparison the issue asks for), then the
    # extra adapt variants, so a short lease still returns the headline pairs.
    plan = []
    for case, c in cases.items():
        plan.append((case, "adapt"))
        if peer and not a.no_reference and (peer / c["ref"]).is_file():
            plan.append((case, "reference"))
    plan += [(case, "all_attn") for case in cases if a.all_attn]
    plan += [(case, "compile") for case in cases if a.compile and (a.compile == "all" or case in a.compile.split(","))]
    prepared = {}
    for case, what in plan:
        c = cases[case]
        timeout = a.timeout if a.deadline is None else min(a.timeout, int(a.deadline - (time.time() - t_start)) - 5)
        if timeout < 30:
            results["skipped"].append(f"{case} {what}: {timeout + 5}s left of --deadline")
            print(f"[gpu_check] skipped {case} {what}: out of time", flush=True)
            continue
        if case not in prepared:
            data = out / f"data_{c['res']}"  # rendered at the training size: adapt skips images under half of it
            if not (data / "metadata.jsonl").is_file():
                synth.build_imagefolder("sunglasses", data, n=8 if a.tiny else 32, split="train", size=c["res"])
            t0 = time.time()
            prepared[case] = (build_base(case, out / f"base_{case}", a.tiny), data)
            print(f"[gpu_check] {case}: base built in {time.time() - t0:.0f}s", flush=True)
        base, data = prepared[case]
        try:
            if what == "reference":
                run = run_reference(case, c, base, data, out, a.tiny, peer, timeout=timeout)
            else:
                run = run_adapt(case, c, base, data, out, a.tiny, preset="all_attn" if what == "all_attn" else "cross_attn",
                                timeout=timeout, compile_mode="regional" if what == "compile" else "off")
        except subprocess.TimeoutExpired:
            run = {"trainer": what, "error": f"timed out after {timeout}s"}
        results["cases"][case]["runs"].append(run)
        print(f"[gpu_check] {case}: {run}", flush=True)
        _write(results, dests)
    _write(results, dests)
    print(_table(results))
    return 0 if all("error" not in x for r in results["cases"].values() for x in r["runs"]) and not results["skipped"] else 1


if __name__ == "__main__":
    sys.exit(main())
