"""The run directory a writer owns: its lock, its identity, and the files created in it.

- **One writer per rank.** The writer of rank ``R`` holds ``writer.rank{R}.lock`` (an
  ``flock`` on an open file, released by the kernel when the process dies, so a killed
  job never leaves a stale lock). The file holds the pid, host and start time of the
  holder, for the message a second writer gets (:class:`RunDirectoryInUse`).
- **Identity.** The directory is opened once and every file is created relative to
  that descriptor; :meth:`RunDirectory.check` compares the path's device and inode with
  the open directory's, so a directory deleted, moved away or replaced while the run
  writes is noticed (the writer calls it at every flush).
- **No writes through links.** Files are created with ``O_EXCL | O_NOFOLLOW``
  (:func:`torchvitals.store.layout.create_new`), the manifest replaced atomically
  (:func:`torchvitals.store.layout.write_file_atomic`).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import os
import socket
import stat

from .layout import create_new, lock_name, write_all, write_file_atomic

__all__ = ["RunDirectory", "RunDirectoryInUse"]


class RunDirectoryInUse(RuntimeError):
    """Another live writer holds this rank's lock in the run directory."""


_LOCK_FLAGS = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0)


class RunDirectory:
    """The open run directory of one rank's writer (writer thread and close only)."""

    def __init__(self, path: str, rank: int):
        self.path = path
        self.rank = rank
        self.fd: int | None = None
        self._identity: tuple[int, int] | None = None
        self._lock_fd: int | None = None

    # ------------------------------------------------------------------ set-up

    def open(self) -> None:
        """Create the directory if needed, open it and take this rank's lock.

        Raises ``OSError`` when the directory cannot be made or opened, and
        :class:`RunDirectoryInUse` when another live writer holds the lock."""
        os.makedirs(self.path, exist_ok=True)
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self._lock(fd)
        except BaseException:
            os.close(fd)
            raise
        st = os.fstat(fd)
        self.fd, self._identity = fd, (st.st_dev, st.st_ino)

    def _lock(self, dir_fd: int) -> None:
        name = lock_name(self.rank)
        for _ in range(8):  # the name may be unlinked and re-created between open and flock
            fd = os.open(name, _LOCK_FLAGS, 0o644, dir_fd=dir_fd)
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise OSError(f"{os.path.join(self.path, name)} is not a regular file")
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise RunDirectoryInUse(self._in_use_message(fd, name)) from None
                try:
                    now = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                except FileNotFoundError:
                    now = None
                if now is None or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                    os.close(fd)  # the file we locked is no longer the lock: again
                    continue
                holder = {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "since": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                }
                os.ftruncate(fd, 0)
                os.lseek(fd, 0, os.SEEK_SET)
                write_all(fd, (json.dumps(holder) + "\n").encode())
                self._lock_fd = fd
                return
            except BaseException:
                with contextlib.suppress(OSError):
                    os.close(fd)
                raise
        raise OSError(f"could not take the lock {os.path.join(self.path, name)}")

    def _in_use_message(self, fd: int, name: str) -> str:
        try:
            holder = json.loads(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
            who = f"pid {holder['pid']} on {holder['host']} since {holder['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            who = "another process"
        return (
            f"torchvitals run directory {self.path} is in use: rank {self.rank} is already "
            f"being written by {who} (lock {name}); two writers of one rank would mix their "
            "rows and corrupt each other's segments"
        )

    def close(self) -> None:
        """Release the lock (removing its file) and the directory."""
        if self._lock_fd is not None:
            if self.fd is not None:
                with contextlib.suppress(OSError):
                    os.unlink(lock_name(self.rank), dir_fd=self.fd)
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)
            self._lock_fd = None
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None

    # ------------------------------------------------------------------ while writing

    def check(self) -> str | None:
        """``None`` while the path still names the directory opened; otherwise what
        happened to it: ``"deleted"``, ``"moved away"`` or ``"replaced by another
        directory"``."""
        if self.fd is None:
            return None
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            st = None
        except OSError:
            return None  # cannot tell (permissions): keep writing where we are
        if st is not None and (st.st_dev, st.st_ino) == self._identity:
            return None
        try:
            gone = os.fstat(self.fd).st_nlink == 0
        except OSError:
            gone = True
        if gone:
            return "deleted"
        return "moved away" if st is None else "replaced by another directory"

    def create(self, name: str) -> int:
        """A new file ``name`` in the directory (exclusive, never through a link)."""
        if self.fd is None:
            raise OSError(f"run directory {self.path} is not open")
        return create_new(name, dir_fd=self.fd)

    def replace(self, name: str, data: bytes) -> None:
        """Replace the file ``name`` in the directory atomically with ``data``."""
        if self.fd is None:
            raise OSError(f"run directory {self.path} is not open")
        write_file_atomic(name, data, dir_fd=self.fd)

    def exists(self, name: str, identity: tuple[int, int]) -> bool:
        """Whether ``name`` is still the file with ``(st_dev, st_ino)`` ``identity``."""
        if self.fd is None:
            return False
        try:
            st = os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == identity

    def names(self) -> list[str]:
        if self.fd is None:
            return []
        return os.listdir(self.fd)
