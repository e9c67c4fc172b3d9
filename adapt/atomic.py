"""Atomic, checked writes: a file is either its old self or its complete new self, never half written.

Every writer goes to a temporary file in the same folder, is fsynced, then renamed over the target
(rename is atomic within one filesystem). Any failure, including safetensors' `SafetensorError` on a full
disk (it is not an OSError), becomes one `WriteError` that names the path and says the previous file is
intact; the temporary file is removed.
Logs are the exception: `append_line` appends in place, and a failure costs log lines, never the run.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

FILE_MODE = 0o644  # adapters and reports are meant to be shared (safetensors alone creates files 0600)


class WriteError(RuntimeError):
    """A file could not be written; the message names it, and the previous version (if any) is intact."""


def writable_dir(path: str | Path, what: str) -> Path:
    """`path` as an existing writable folder (created if missing), or a WriteError naming `what` (the flag, key or
    variable that chose it). os.access also sees read-only filesystems, which is what stops root."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise WriteError(f"{what} {p} is a file, not a folder")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WriteError(f"{what} {p}: cannot create it ({e.strerror})") from e
    if not os.access(p, os.W_OK | os.X_OK):
        raise WriteError(f"{what} {p} is not writable")
    return p


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _write(path: Path, fill) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fill(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        state = "the previous version is intact" if path.exists() else "nothing was written"
        raise WriteError(f"could not write {path}: {_reason(e)}; {state}") from e
    return path


def _reason(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    if "No space left" in text or getattr(e, "errno", None) == 28:
        return "no space left on the device"
    return f"{type(e).__name__}: {text}"


def write_safetensors(tensors: dict, path: str | Path, metadata: dict | None = None) -> Path:
    from safetensors.torch import save_file
    return _write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def write_text(path: str | Path, text: str) -> Path:
    return _write(Path(path), lambda tmp: tmp.write_text(text))


def write_bytes(path: str | Path, data: bytes) -> Path:
    return _write(Path(path), lambda tmp: tmp.write_bytes(data))


def write_image(img, path: str | Path, pnginfo=None) -> Path:
    """A PIL image, format from the suffix; `pnginfo` (PIL PngInfo: text chunks) for a PNG."""
    fmt = Path(path).suffix.lstrip(".").upper().replace("JPG", "JPEG") or "PNG"
    kw = {"pnginfo": pnginfo} if pnginfo is not None and fmt == "PNG" else {}
    return _write(Path(path), lambda tmp: img.save(tmp, format=fmt, **kw))


def write_figure(fig, path: str | Path, **kw) -> Path:
    """A matplotlib figure, format from the suffix."""
    fmt = Path(path).suffix.lstrip(".") or "png"
    return _write(Path(path), lambda tmp: fig.savefig(tmp, format=fmt, **kw))


_append_failed: set = set()


def append_line(path: str | Path, line: str) -> None:
    """Append one log line. A full disk costs log lines (said once per file on stderr), never the run: the
    checkpoints, written atomically, are what report a full disk."""
    try:
        with open(path, "a") as f:
            f.write(line + "\n")
    except OSError as e:
        if str(path) not in _append_failed:
            _append_failed.add(str(path))
            print(f"warning: cannot append to {path} ({e.strerror}); later lines there are lost", file=sys.stderr, flush=True)
