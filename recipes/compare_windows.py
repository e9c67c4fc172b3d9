"""Does the strength window matter? Train the demo adapter with window=img2img_exact and window=full
(same steps, seed and data), evaluate both, and compare target reach at matched preservation.

    python recipes/compare_windows.py [--out runs/compare_windows] [key=value overrides for both runs]

"Matched preservation": for each adapter, the highest lens-detector reach among strengths whose SSIM
outside the eye band stays >= the threshold (the eval's recommendation rule), plus reach at every strength.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import adapt
from adapt import config, evaluate

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/compare_windows")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args(argv)
    adapt.quiet()
    out = Path(a.out)
    results = {}
    for window in ("img2img_exact", "full"):
        run_dir = out / window
        cmd = [sys.executable, str(ROOT / "recipes/lora_img2img.py"), "--config", str(ROOT / "recipes/configs/tiny_sunglasses.yaml"),
               f"out_dir={run_dir}", f"objective.window={window}", "train.overwrite=true", "validation.steps=0", *a.overrides]
        subprocess.run(cmd, check=True)
        cfg = config.load(config.EvalConfig, ROOT / "recipes/configs/tiny_sunglasses_eval.yaml",
                          [f"adapter={run_dir}", f"out={run_dir / 'eval'}"])
        report = evaluate.run(cfg)
        rows = [r for r in report["rows"] if r["scale"] == 1.0 and r["mode"] == "plain"]
        results[window] = {"recommended": report["recommended"],
                           "by_strength": {r["strength"]: {k: r.get(k) for k in ("target_reach", "detector_reach",
                                           "preservation_ssim_outside_mask", "colour_drift_outside_mask")} for r in rows}}
    (out / "summary.json").write_text(json.dumps(results, indent=1))
    print(f"\n{'strength':>8} | {'exact: reach clf/det, SSIM-out':>32} | {'full: reach clf/det, SSIM-out':>31}")
    for s in results["full"]["by_strength"]:
        e, f = results["img2img_exact"]["by_strength"][s], results["full"]["by_strength"][s]
        print(f"{s:8g} | {e['target_reach']:10.2f} {e['detector_reach']:6.2f} {e['preservation_ssim_outside_mask']:12.3f} | "
              f"{f['target_reach']:10.2f} {f['detector_reach']:6.2f} {f['preservation_ssim_outside_mask']:12.3f}")
    for w, r in results.items():
        rec = r["recommended"]
        print(f"{w}: at matched preservation (SSIM-out >= threshold): strength {rec['strength']}, reach {rec.get('target_reach')}")


if __name__ == "__main__":
    main()
