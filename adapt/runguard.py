"""What keeps a training run safe around it: one writer per out_dir, and a graceful stop.

- `OutDirLock`: a pid file `out_dir/.adapt.lock` (pid, host, start time) created with O_EXCL. A second run
  into the same folder is refused naming the running pid; a lock whose process is gone (killed, machine
  rebooted) is stale and taken over with a note.
- `Stopper`: SIGINT (Ctrl-C), SIGTERM (a scheduler's stop) and SIGHUP (the terminal went away: an ssh session
  dropped) ask the loop to stop after the current step; the recipe then writes a checkpoint and exits 130 / 143 /
  129. A second SIGINT or SIGTERM aborts at once. A signal the process was started with ignored (a script's
  background job: SIGINT; nohup: SIGHUP) stays ignored. If the launcher that started this process dies (e.g.
  `accelerate launch` killed), the trainer stops the same way instead of running on orphaned. Under DDP every
  rank takes the decision together (`requested` all-reduces it), so no rank waits forever in a collective.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from pathlib import Path

import torch

LOCK_NAME = ".adapt.lock"


class LockError(RuntimeError):
    """Another live process holds the out_dir."""


def alive(pid: int) -> bool:
    """Whether process `pid` exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutDirLock:
    def __init__(self, out_dir: str | Path):
        self.path = Path(out_dir) / LOCK_NAME
        self.held = False

    def acquire(self, log=print) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    other = json.loads(self.path.read_text())
                except (OSError, ValueError):
                    other = {}
                pid, host = other.get("pid"), other.get("host")
                if isinstance(pid, int) and host == me["host"] and alive(pid):
                    raise LockError(f"{self.path.parent} is in use by another training run (pid {pid}, started "
                                    f"{other.get('started')}); wait for it, stop it, or choose another out_dir")
                if isinstance(pid, int) and host not in (None, me["host"]):
                    raise LockError(f"{self.path.parent} is locked by pid {pid} on host {host}; if that run is "
                                    f"gone, delete {self.path}")
                log(f"note: removing the stale lock of pid {pid} (no longer running) in {self.path.parent}")
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return
        raise LockError(f"could not take the lock {self.path}")

    def release(self) -> None:
        if self.held:
            try:
                if json.loads(self.path.read_text()).get("pid") == os.getpid():
                    self.path.unlink()
            except (OSError, ValueError):
                pass
            self.held = False


SIGHUP = getattr(signal, "SIGHUP", None)  # the terminal went away (an ssh session dropped); not on Windows
SIGNALS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, SIGHUP) if s is not None)


def terminal_fds() -> list[int]:
    """stdout / stderr where they are a terminal; asked before any hang-up, since a hung-up terminal no longer says so."""
    return [fd for fd in (1, 2) if os.isatty(fd)]


def silence_terminal(fds: list[int]) -> None:
    """After a hang-up, writing to the terminal fails (EIO) and would end a run before it saves its work: what was
    meant for the terminal file descriptors `fds` goes to /dev/null from here on."""
    null = os.open(os.devnull, os.O_WRONLY)
    for fd in fds:
        os.dup2(null, fd)
    os.close(null)


def hangup_as_interrupt() -> None:
    """For commands that keep their finished work on Ctrl-C (adapt sample, adapt eval): a hang-up (SIGHUP, an ssh
    session gone) raises KeyboardInterrupt too, once, with the terminal silenced first. Kept ignored under nohup."""
    if SIGHUP is None or signal.getsignal(SIGHUP) is signal.SIG_IGN:
        return
    terminal = terminal_fds()

    def handle(signum, frame):
        signal.signal(SIGHUP, signal.SIG_IGN)  # the next hang-up must not break the saving of partial work
        silence_terminal(terminal)
        raise KeyboardInterrupt

    signal.signal(SIGHUP, handle)


class Stopper:
    """Turns SIGINT / SIGTERM / SIGHUP / launcher death into a request to stop after the current step."""

    def __init__(self, say=print, poll_s: float = 1.0):
        self.signum: int | None = None
        self.say = say
        self._parent = os.getppid()
        self._prev = {}
        self._terminal = terminal_fds()
        for s in SIGNALS:
            # A signal this process was started with ignored stays ignored, as in every Unix program: a
            # non-interactive shell starts `cmd &` with SIGINT ignored so that Ctrl-C meant for the script's
            # foreground command does not stop its background jobs.
            if signal.getsignal(s) is not signal.SIG_IGN:
                self._prev[s] = signal.signal(s, self._handle)
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch_parent, args=(poll_s,), daemon=True)
        self._watcher.start()

    def _handle(self, signum, frame):
        hangup = signum == SIGHUP
        if hangup:
            silence_terminal(self._terminal)  # the recipe's train.log keeps every line
            self._terminal = []
        if self.signum is not None:
            if hangup:
                return  # hang-ups come more than once (the shell, the launcher's exit): not a request to abort
            raise KeyboardInterrupt  # a second signal: abort now, without a checkpoint
        self.signum = signum
        self.say(f"{signal.Signals(signum).name} received: stopping after this step and writing a checkpoint "
                 + ("(the terminal went away; this log keeps the messages)" if hangup else "(send it again to abort without one)"))

    def _watch_parent(self, poll_s: float):
        while not self._stop.wait(poll_s):
            if os.getppid() != self._parent and self.signum is None:
                self.signum = signal.SIGTERM
                self.say(f"the launcher (pid {self._parent}) is gone: stopping after this step and writing a checkpoint")
                return

    def requested(self, acc=None) -> int | None:
        """The signal to stop for, agreed by every process (max over ranks), or None."""
        if acc is not None and acc.num_processes > 1:
            flag = torch.tensor([self.signum or 0], device=acc.device)
            agreed = int(acc.reduce(flag, "max").item())
            return agreed or None
        return self.signum

    def close(self):
        # Joined, not left to finish on its own: a thread that ends while the interpreter exits may drop the last
        # reference to this Stopper, and with it `say`'s closure (the Accelerator, the model's tensors). Freeing a
        # tensor there takes the GIL inside a C++ destructor, which a finalizing CPython answers with pthread_exit:
        # "terminate called without an active exception", SIGABRT instead of the recipe's exit code (1 run in 20).
        self._stop.set()
        self._watcher.join(timeout=10)  # close() runs in the thread that made the Stopper, never in the watcher
        for s, h in self._prev.items():
            signal.signal(s, h)
