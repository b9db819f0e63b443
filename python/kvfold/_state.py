"""Saving, loading and checkpoints: the Python side of kvfold's state."""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from typing import Any, NoReturn, Union

import numpy as np

from . import _core, rules

PathLike = Union[str, bytes, "os.PathLike[str]", "os.PathLike[bytes]"]


def _path(path: Any) -> str:
    if not isinstance(path, (str, bytes, os.PathLike)):
        raise TypeError(f"path: expected a str or os.PathLike, got {type(path).__name__}")
    return os.fsdecode(os.fspath(path))


def write_atomically(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` holds either its old content or all of ``data``.

    The bytes go to a temporary file in the same folder, which is flushed to disk (fsync) and then
    renamed over ``path``; the folder is fsynced so the rename itself survives a power cut. If
    anything fails (a full disk, an error, an interrupt), the temporary file is removed and ``path``
    is untouched. A crash can leave only a hidden temporary file ``.kvfold-PID-RANDOM.tmp``.
    When ``path`` is a symbolic link, the file it points to is written and the link stays.
    """
    target = os.path.realpath(_path(path))
    folder = os.path.dirname(target)
    # A short name of its own, so any name that fits the folder fits its temporary file too.
    tmp = os.path.join(folder, f".kvfold-{os.getpid()}-{secrets.token_hex(4)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(tmp, flags, 0o666)  # the umask applies, as for any new file
    try:
        try:
            with contextlib.suppress(OSError):  # keep the mode of the file being replaced
                old = os.stat(target)
                if stat.S_ISREG(old.st_mode) and hasattr(os, "fchmod"):
                    os.fchmod(fd, stat.S_IMODE(old.st_mode))
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if hasattr(os, "O_DIRECTORY"):  # POSIX: make the rename durable
        dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def read_file(path: PathLike) -> bytes:
    """The bytes of a kvfold state file, checked before they are read: a regular file (not a pipe or
    a device, which could block or never end) whose length is the one its header declares."""
    target = _path(path)
    if not stat.S_ISREG(os.stat(target).st_mode):
        raise ValueError(f"path: expected a regular file, got {target!r} which is not one")
    # O_NONBLOCK: if a pipe replaced the file since the check, opening it does not wait for a writer.
    fd = os.open(target, os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"path: expected a regular file, got {target!r} which is not one")
        size = info.st_size
        header = f.read(_core.STATE_HEADER)
        declared = _core._state_size(header)
        if declared != size:
            raise ValueError(
                f"data: invalid kvfold state: {target!r} holds {size} bytes, its header declares {declared}"
            )
        return header + f.read(declared - len(header))


class Checkpoint:
    """An immutable snapshot of a ``MemoryCache``, made by ``cache.checkpoint()``.

    It holds a copy of the cache's state (``nbytes`` bytes) and its configuration. ``rollback``
    restores it bit-exactly into the cache it came from or into any other cache of the same
    configuration (rule and every constructor argument, ``batch_size`` included); any other cache
    raises ValueError. Taking and restoring a checkpoint each cost one copy of the state.
    """

    __slots__ = ("_state", "_rule")
    _state: _core.Checkpoint
    _rule: rules.Rule

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("Checkpoint: made by MemoryCache.checkpoint(), not directly")

    @classmethod
    def _wrap(cls, state: _core.Checkpoint, rule: rules.Rule) -> "Checkpoint":
        cp = object.__new__(cls)
        object.__setattr__(cp, "_state", state)
        object.__setattr__(cp, "_rule", rule)
        return cp

    def __setattr__(self, name: str, value: Any) -> NoReturn:
        raise AttributeError(f"Checkpoint is immutable; cannot set {name!r}")

    def __delattr__(self, name: str) -> NoReturn:
        raise AttributeError(f"Checkpoint is immutable; cannot delete {name!r}")

    @property
    def rule(self) -> rules.Rule:
        """The rule of the cache the checkpoint was taken from."""
        return self._rule

    @property
    def batch_size(self) -> int:
        return self._state.batch_size

    @property
    def length(self) -> np.ndarray:
        """Tokens seen per row when the checkpoint was taken (a copy), (B,) int64."""
        return self._state.length

    @property
    def nbytes(self) -> int:
        """Bytes the checkpoint holds: the same as the cache's ``nbytes``."""
        return self._state.nbytes

    def __copy__(self) -> "Checkpoint":
        return self  # immutable

    def __deepcopy__(self, memo: Any) -> "Checkpoint":
        return self

    def __reduce__(self) -> NoReturn:
        raise TypeError("Checkpoint: cannot be pickled; persist the cache with to_bytes() or save() instead")

    def __repr__(self) -> str:
        lengths = self.length.tolist()
        shown = lengths if len(lengths) <= 8 else lengths[:8] + ["..."]
        return f"Checkpoint(rule={self._rule!r}, batch_size={self.batch_size}, length={shown}, nbytes={self.nbytes})"
