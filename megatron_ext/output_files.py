"""The rules every tool that writes files derived from its inputs follows (``tools/*.py``).

* :func:`check_outputs`, called before any input is read: an output may not be one of the inputs, neither
  by the same path, nor through a symlink, nor as a hard link of it (same device and inode); a directory
  output may not contain an input (writing into it could replace that input). An output that already exists
  is refused unless the tool's overwrite flag (``--overwrite``) was given. Each refusal is one
  :class:`~megatron_ext.errors.ConfigError` naming the option and the path.
* :func:`write_error`: an ``OSError`` raised while writing an output becomes one
  :class:`~megatron_ext.errors.DataError` naming the path and the cause in words (read-only file system,
  disk full, permission denied, ...), instead of a traceback. The tools write under temporary names and
  rename at the end, and remove the temporary files on any error, so a failed run leaves no partial output.
"""
from __future__ import annotations

import errno
import os
from typing import Iterable, Optional, Sequence, Tuple

from megatron_ext.errors import ConfigError, DataError

_CAUSES = {
    errno.EROFS: "read-only file system",
    errno.ENOSPC: "no space left on the device (disk full)",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EFBIG: "file too large for the file system",
    errno.ENOENT: "the directory does not exist",
}


def _norm(path: str) -> str:
    return os.path.realpath(os.path.abspath(os.path.expanduser(str(path))))


def same_file(a: str, b: str) -> bool:
    """True when ``a`` and ``b`` name one file: the same path after resolving symlinks, or a hard link of it."""
    if _norm(a) == _norm(b):
        return True
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def _inside(path: str, directory: str) -> bool:
    p, d = _norm(path), _norm(directory)
    return p == d or p.startswith(d.rstrip(os.sep) + os.sep)


def check_outputs(
    outputs: Sequence[Tuple[str, str]],
    inputs: Iterable[Optional[str]],
    overwrite: bool = False,
    overwrite_flag: Optional[str] = "--overwrite",
) -> None:
    """Refuse outputs that are inputs, and existing outputs without ``overwrite``.

    ``outputs``: ``(option, path)`` pairs, e.g. ``("--output-prefix", "data/x_text_document.bin")``; a path
    that is (or will be) a directory ends with ``os.sep`` or exists as a directory. ``inputs``: the paths
    the tool reads (``None`` entries are skipped). ``overwrite_flag``: the option that allows replacing an
    existing output, named in the message (``None``: existing outputs are allowed).
    """
    ins = [str(p) for p in inputs if p]
    for key, out in outputs:
        is_dir = str(out).endswith(os.sep) or os.path.isdir(out)
        for inp in ins:
            if same_file(out, inp):
                raise ConfigError(
                    f"{key}: the output {out} is the input {inp} (same file{_how(out, inp)}); writing it "
                    f"would destroy the input -- choose another output path"
                )
            if is_dir and _inside(inp, out):
                raise ConfigError(
                    f"{key}: the output directory {out} contains the input {inp}; writing into it could "
                    f"replace the input -- choose another output directory"
                )
        if overwrite_flag and not overwrite and _exists_nonempty(out, is_dir):
            what = "directory" if is_dir else "file"
            raise ConfigError(
                f"{key}: the output {what} {out} already exists; pass {overwrite_flag} to replace it "
                f"(or choose another output path)"
            )


def _exists_nonempty(path: str, is_dir: bool) -> bool:
    if is_dir:
        try:
            return bool(os.listdir(path))
        except OSError:
            return False
    return os.path.lexists(path)


def _how(a: str, b: str) -> str:
    if os.path.abspath(a) == os.path.abspath(b):
        return ""
    if _norm(a) == _norm(b):
        return " through a symlink"
    return ", a hard link"


def write_error(exc: OSError, path: str, key: Optional[str] = None,
                note: str = "no output was written") -> DataError:
    """A one-line error for ``exc``, raised while writing ``path`` (``key``: the option naming it; ``note``: what
    the caller left behind)."""
    cause = _CAUSES.get(exc.errno) or (exc.strerror or str(exc))
    prefix = f"{key}: " if key else ""
    return DataError(f"{prefix}cannot write {path}: {cause}; {note}")


def fsync_path(path: str) -> None:
    """fsync a file or directory by path (a directory's entries: the names of the files just written or renamed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    """fsync directory ``path`` (``""``: the working directory) so a rename in it is durable; file systems that
    cannot fsync a directory are skipped."""
    try:
        fsync_path(path or ".")
    except OSError:  # pragma: no cover - some file systems cannot fsync a directory
        pass


__all__ = ["check_outputs", "fsync_dir", "fsync_path", "same_file", "write_error"]
