"""What a resumed run may change, and putting the run back as it was (the recipe's resume policy).

A checkpoint records the flat config it trained with and the fingerprints of its base and data. A resume that
would change what the run is (its data, base, objective, LoRA shape) is refused with both values named; the
optimizer's settings change only when train.resume_allow names them (adapt.facts classifies each key).
"""

from __future__ import annotations

import json
from pathlib import Path

from adapt import atomic, checkpoint, config, lora
from adapt import facts as facts_mod


def check_config(cfg, saved: dict, resume: Path) -> None:
    """Refuse a resume that would change what the run is (naming each key with both values)."""
    if "run" not in saved:
        raise checkpoint.CheckpointError(f"{resume} was written by an older adapt without a run record; "
                                         "start a new run (or resume with that adapt version)")
    step = saved["step"]
    if step > cfg.train.max_steps:
        raise config.ConfigError(f"train.max_steps={cfg.train.max_steps} is below the checkpoint's step {step} "
                                 f"({resume}); raise train.max_steps to continue training")
    if step == cfg.train.max_steps and (resume.parent / lora.WEIGHTS_NAME).is_file():
        raise config.ConfigError(f"{resume} is at step {step} = train.max_steps and the adapter is written: nothing "
                                 "to train; raise train.max_steps to continue training")
    now = facts_mod.flat(config.to_dict(cfg))
    changes, refused = facts_mod.resume_changes(saved["run"]["config"], now, list(cfg.train.resume_allow))
    if refused:
        lines = "; ".join(f"{k}: checkpoint {changes[k][0]!r}, now {changes[k][1]!r}" for k in refused)
        opt = [k for k in refused if facts_mod.classify(k) == "optimizer"]
        hint = (f" Optimizer settings may change if you say so: train.resume_allow=[{','.join(opt)}]." if opt else "")
        raise config.ConfigError(f"resuming from {resume} would change what this run is: {lines}. Start a new run "
                                 f"(another out_dir) for a different setting.{hint}")


def check_fingerprints(cfg, saved: dict, run: dict, resume: Path) -> dict:
    """The base and data must be the very ones the checkpoint trained on; returns the allowed config changes."""
    old = saved["run"]
    for key, what in (("base_fingerprint", "base model weights"), ("data_fingerprint", "training data"),
                      ("init_fingerprint", "weights of the adapter it started from (lora.init_from)")):
        if old.get(key) != run[key]:
            raise config.ConfigError(f"resuming from {resume}: the {what} differ from the checkpoint's ({key} "
                                     f"{old.get(key)} vs {run[key]}); the same settings now read other content")
    changes, _ = facts_mod.resume_changes(old["config"], run["config"], list(cfg.train.resume_allow))
    return {k: v for k, v in changes.items() if facts_mod.classify(k) != "free" or k == "train.max_steps"}


def apply_optim_settings(opt, lr_sched, cfg) -> None:
    """Put this run's optimizer settings into the restored state (load_state_dict brings the checkpoint's back)."""
    o = cfg.optim
    for g in opt.param_groups:
        g.update(weight_decay=o.weight_decay, betas=tuple(o.betas), eps=o.eps, initial_lr=o.lr)
    lr_sched.base_lrs = [o.lr] * len(opt.param_groups)
    for g, lam in zip(opt.param_groups, lr_sched.lr_lambdas):
        g["lr"] = o.lr * lam(lr_sched.last_epoch)
    lr_sched._last_lr = [g["lr"] for g in opt.param_groups]


def notes(resumes: list[dict]) -> list[str]:
    if not resumes:
        return []
    lines = ["resumed run: the settings below are the ones in force now"]
    for r in resumes:
        lines.append(f"resumed at step {r['step']} from {r['checkpoint']}; changed: {r['changed'] or 'nothing'}")
    return lines


def truncate_log(path: Path, step: int):
    """Keep log rows up to the resumed step, so the log of a resumed run reads as one run."""
    if not path.exists():
        return
    rows = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= step]
    atomic.write_text(path, "".join(r + "\n" for r in rows))
