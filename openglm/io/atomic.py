"""Atomic file and directory writes, free of torch so that the data pipeline can use them too.

A file is written to a temporary name beside its target, fsync'ed and renamed over it; a directory
is filled under a temporary name and swapped into place (`install_dir`), so a crash never leaves a
half-written file or directory where a reader looks.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

def umasked(mode: int) -> int:
    """`mode` less the process umask: what open() and mkdir() would give, which mkstemp (0600) and
    mkdtemp (0700) do not."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


FAULT_ENV = "OPENGLM_FAULT_PAUSE"
ASIDE_MARK = ".old-"  # `.checkpoint-N.old-XXXX`: the previous copy, moved aside where no swap is possible


def fault_point(name: str) -> None:
    """A test hook for fault injection: when $OPENGLM_FAULT_PAUSE names this point, log it and
    block here forever, so a test can kill the process at exactly this moment of a save."""
    if os.environ.get(FAULT_ENV) == name:
        log.warning("fault point %s reached; pausing", name)
        while True:
            time.sleep(1)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing directory entries in one atomic step (Linux renameat2 RENAME_EXCHANGE);
    False where the C library or the file system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.chmod(tmp, umasked(0o666))
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_dir_atomic(final: Path, fill: Callable[[Path], None]) -> None:
    """Build a directory with `fill(tmp)` under a temporary name beside `final`, then put it in
    place with `install_dir`, so a crash never leaves a half-written directory at `final`."""
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    os.chmod(tmp, umasked(0o777))
    try:
        fill(tmp)
        fault_point("save-filled")
        install_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def install_dir(tmp: Path, final: Path) -> None:
    """Rename the complete directory `tmp` to `final`. An existing `final` is swapped with it in
    one step and only then deleted; where no swap is possible it is first moved aside to
    `.NAME.old-XXXX` (which `restore_aside` puts back after a crash), never deleted first."""
    if not final.exists():
        os.replace(tmp, final)
    elif _exchange(tmp, final):
        fault_point("save-swapped")
        shutil.rmtree(tmp)  # the previous copy, now under the temporary name
    else:
        aside = final.with_name(f".{final.name}{ASIDE_MARK}{secrets.token_hex(4)}")
        os.replace(final, aside)
        try:
            os.replace(tmp, final)
        except BaseException:
            os.replace(aside, final)
            raise
        shutil.rmtree(aside)


def restore_aside(folder: Path) -> None:
    """Put back a previous checkpoint copy moved aside by a save that crashed before its
    replacement was renamed in (`write_dir_atomic` on a platform without an atomic swap)."""
    name = folder.name[1:].partition(ASIDE_MARK)[0]
    if folder.name.startswith(".") and ASIDE_MARK in folder.name and not (folder.parent / name).exists():
        os.replace(folder, folder.parent / name)
        log.warning("restored %s, moved aside by a save that did not complete", folder.parent / name)
