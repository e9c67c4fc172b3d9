"""Test-only fault injection, loaded through PYTHONPATH by tests (never by users): ADAPT_FAULT=<point>:<step>.

  sigkill_after_step:N     SIGKILL when step N+1 starts drawing its batch (the state of "killed right after step N")
  sigkill_in_checkpoint:N  SIGKILL after checkpoint-N is fully written to its temporary folder, before the rename
  raise_on_rank<R>_at_step:N  RuntimeError on DDP rank R when step N+1 starts
  sigint_after_step:N      SIGINT to this process as step N+1 starts (a real Ctrl-C: step N+1 finishes, then it stops)
  sigterm_after_step:N     the same with SIGTERM (a scheduler's stop)
  sigterm_on_rank<R>_after_step:N  SIGTERM to DDP rank R only (the ranks must agree to stop together)
  fill_disk_after_step:N   after step N, fill the filesystem of $ADAPT_FILL_DIR (a real full disk from then on)

The hooks wrap adapt's functions when their modules are imported, so the recipe carries no test seams.
"""
import importlib.abc
import importlib.machinery
import os
import pathlib
import signal
import sys

FAULT = os.environ.get("ADAPT_FAULT", "")
point, _, at = FAULT.partition(":")
at = int(at) if at.isdigit() else -1


def _fill(folder):
    """Write zeros until the filesystem says ENOSPC: every later write there fails for real."""
    with open(os.path.join(folder, "filler"), "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass


def _patch_trainstep(mod):
    original = mod.step_generator

    def step_generator(seed, step, micro, rank):
        if micro == 0 and step == at:  # step is 0-based: step index N is the (N+1)-th step
            if point == "sigkill_after_step":
                os.kill(os.getpid(), signal.SIGKILL)
            if point == "sigint_after_step":
                os.kill(os.getpid(), signal.SIGINT)
            if point in ("sigterm_after_step", f"sigterm_on_rank{rank}_after_step"):
                os.kill(os.getpid(), signal.SIGTERM)
            if point == "fill_disk_after_step":
                _fill(os.environ["ADAPT_FILL_DIR"])
            if point == f"raise_on_rank{rank}_at_step":
                raise RuntimeError(f"injected fault {FAULT}")
        return original(seed, step, micro, rank)

    mod.step_generator = step_generator


if point == "sigkill_in_checkpoint":
    _rename = pathlib.Path.rename

    def rename(self, target):
        if self.name.startswith(f".checkpoint-{at}."):
            os.kill(os.getpid(), signal.SIGKILL)
        return _rename(self, target)

    pathlib.Path.rename = rename


class _Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "adapt.trainstep":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        loader = spec.loader
        exec_module = loader.exec_module

        def patched(module):
            exec_module(module)
            _patch_trainstep(module)

        loader.exec_module = patched
        return spec


if point:
    sys.meta_path.insert(0, _Hook())
