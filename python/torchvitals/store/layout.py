"""The files of a run directory: their names, and how files are read and written safely.

Shared by the writer and the reader, so that neither imports the other::

    {run}/manifest.rank{R}.json
    {run}/{table}.rank{R}.{seg:06d}.arrows    # Arrow IPC stream: the segment being written
    {run}/{table}.rank{R}.{seg:06d}.parquet   # a closed segment, compacted (compaction.py)
    {run}/writer.rank{R}.lock          # held by the live writer of rank R

Every rank writes its own files, so ranks never coordinate (``docs/schema.md``).

Names are matched exactly: a rank is written without leading zeros and below
:data:`MAX_RANKS`, a segment number with six digits (more only from 1,000,000 on), so
a copy such as ``scalars.rank0.0.arrows`` or ``manifest.rank00.json`` is not a file of
the run (:func:`looks_like_run_file` tells the reader to warn about it).

Writing: nothing here writes through a symbolic link. New files are created with
``O_CREAT | O_EXCL | O_NOFOLLOW``; a file that is replaced (manifest, report) is written
to an exclusive temporary file in the same directory and renamed over the target, and a
symbolic link (or anything but a regular file) in the target's place is an error
(:class:`UnsafePathError`). Reading: only regular files are read (no FIFO, device or
directory), up to a size limit.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import stat
import zlib
from typing import Any

import numpy as np

__all__ = [
    "LOCK_RE",
    "MANIFEST_CHECKSUM_KEY",
    "MANIFEST_RE",
    "MAX_RANKS",
    "MAX_SEGMENTS",
    "PARQUET",
    "SEGMENT_FORMATS",
    "SEGMENT_RE",
    "STREAM",
    "NotRegularFileError",
    "UnsafePathError",
    "create_new",
    "lock_name",
    "looks_like_run_file",
    "manifest_bytes",
    "manifest_checksum",
    "manifest_name",
    "open_regular_file",
    "parse_manifest_name",
    "parse_segment_file",
    "parse_segment_name",
    "read_regular_file",
    "segment_name",
    "write_all",
    "write_file_atomic",
    "write_json_atomic",
]

#: Ranks are below this (a world of at most 2**20 processes); larger numbers in a file
#: name or a manifest are refused, so that nothing is ever sized by a hostile number.
MAX_RANKS = 1 << 20
#: Segment numbers are below this.
MAX_SEGMENTS = 10**9

#: Suffix of a segment being written: an Arrow IPC stream (crash-safe, appended to).
STREAM = "arrows"
#: Suffix of a closed segment compacted into a Parquet file (any engine scans it lazily).
PARQUET = "parquet"
SEGMENT_FORMATS = (STREAM, PARQUET)

_RANK = r"(?P<rank>0|[1-9][0-9]{0,6})"
#: File names of segments and manifests, exactly as segment_name and manifest_name write them.
SEGMENT_RE = re.compile(
    r"^(?P<table>[A-Za-z0-9_]+)\.rank"
    + _RANK
    + r"\.(?P<seg>[0-9]{6}|[1-9][0-9]{6,8})\.(?P<format>arrows|parquet)$"
)
MANIFEST_RE = re.compile(r"^manifest\.rank" + _RANK + r"\.json$")
LOCK_RE = re.compile(r"^writer\.rank" + _RANK + r"\.lock$")
# What a copy or a hand-made file of a run looks like: warned about, never read.
_LOOSE_RE = re.compile(
    r"^(?:[A-Za-z0-9_]+\.rank[0-9]+\.[0-9]+\.(?:arrows|parquet)|manifest\.rank[0-9]+\.json)$"
)


class UnsafePathError(FileExistsError, ValueError):
    """A file could not be written safely: a symbolic link, or something other than a
    regular file, is where it should go. (A ``ValueError`` too: a bad path given by the
    user, which the command line reports as such.)"""


class NotRegularFileError(OSError):
    """A file to read is not a regular file (a FIFO, a device, a directory, a socket)."""


def segment_name(table: str, rank: int, seg: int, fmt: str = STREAM) -> str:
    """File name of segment ``seg`` of ``table`` written by ``rank``: the stream being
    written (``fmt="arrows"``) or, once closed and compacted, ``fmt="parquet"``."""
    if fmt not in SEGMENT_FORMATS:
        raise ValueError(f"segment format {fmt!r}: expected one of {', '.join(SEGMENT_FORMATS)}")
    return f"{table}.rank{rank}.{seg:06d}.{fmt}"


def manifest_name(rank: int) -> str:
    """File name of the manifest written by ``rank``."""
    return f"manifest.rank{rank}.json"


def lock_name(rank: int) -> str:
    """File name of the lock the live writer of ``rank`` holds."""
    return f"writer.rank{rank}.lock"


def parse_segment_file(name: str) -> tuple[str, int, int, str] | None:
    """``(table, rank, seg, format)`` of an exact segment name (``format``: ``"arrows"``
    or ``"parquet"``), else ``None``."""
    m = SEGMENT_RE.match(name)
    if m is None:
        return None
    rank, seg = int(m["rank"]), int(m["seg"])
    if rank >= MAX_RANKS or seg >= MAX_SEGMENTS:
        return None
    return m["table"], rank, seg, m["format"]


def parse_segment_name(name: str) -> tuple[str, int, int] | None:
    """``(table, rank, seg)`` of an exact segment name of either format, else ``None``."""
    parsed = parse_segment_file(name)
    return parsed[:3] if parsed else None


def parse_manifest_name(name: str) -> int | None:
    """The rank of an exact manifest name, else ``None``."""
    m = MANIFEST_RE.match(name)
    if m is None or int(m["rank"]) >= MAX_RANKS:
        return None
    return int(m["rank"])


def looks_like_run_file(name: str) -> bool:
    """Whether ``name`` looks like a segment or manifest without being an exact name
    (``scalars.rank0.0.arrows``, ``layers.rank00.000000.parquet``,
    ``manifest.rank00.json``): a copy, never read."""
    return bool(_LOOSE_RE.match(name)) and not (
        parse_segment_name(name) or parse_manifest_name(name) is not None
    )


def _json_default(obj: Any) -> Any:
    # Manifests are built from user config: numpy/torch values, tuples, paths. Anything
    # else is stored as its str() rather than failing the run.
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if type(obj).__module__.startswith("torch") and hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return str(obj)


def json_text(obj: Any) -> str:
    """``obj`` as the indented, key-sorted JSON torchvitals writes (user values encoded)."""
    return json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n"


#: Manifest key of the manifest's own checksum (:func:`manifest_checksum`).
MANIFEST_CHECKSUM_KEY = "checksum"


def manifest_checksum(obj: dict[str, Any]) -> str:
    """``"crc32:XXXXXXXX"`` of a manifest (a JSON object as read back) without its
    checksum key: the CRC-32 of its compact, key-sorted JSON, so that it does not
    depend on the file's indentation."""
    body = {k: v for k, v in obj.items() if k != MANIFEST_CHECKSUM_KEY}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return f"crc32:{zlib.crc32(text.encode('ascii')):08x}"


def manifest_bytes(obj: dict[str, Any]) -> bytes:
    """The file content of a manifest: ``obj`` as JSON with its checksum added."""
    plain = json.loads(json_text(obj))  # user values encoded as they will be read back
    plain[MANIFEST_CHECKSUM_KEY] = manifest_checksum(plain)
    return json_text(plain).encode("utf-8")


# ------------------------------------------------------------------------------ writing

_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Write every byte of ``data`` to ``fd`` (``os.write`` may write less than asked)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:  # pragma: no cover - os.write raises rather than return 0 on a full disk
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[n:]


def create_new(name: str, *, dir_fd: int | None = None, mode: int = 0o644) -> int:
    """Create ``name`` (relative to ``dir_fd``) as a new file and return its descriptor.

    ``O_EXCL | O_NOFOLLOW``: anything already there, a symbolic link included, is an error
    (``FileExistsError``; a link is reported as :class:`UnsafePathError`)."""
    try:
        return os.open(name, _NEW_FILE, mode, dir_fd=dir_fd)
    except FileExistsError:
        try:
            is_link = stat.S_ISLNK(os.lstat(name, dir_fd=dir_fd).st_mode)
        except OSError:
            is_link = False
        if is_link:
            raise UnsafePathError(
                errno.EEXIST, "a symbolic link is in the way (torchvitals never writes "
                "through links)", name,
            ) from None  # fmt: skip
        raise


def _check_target(name: str, dir_fd: int | None, shown: str) -> None:
    """A file about to be replaced must be a regular file, or not exist."""
    try:
        st = os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise UnsafePathError(
            errno.EEXIST, "a symbolic link is in the way (torchvitals never writes through "
            "links); remove it first", shown,
        )  # fmt: skip
    if not stat.S_ISREG(st.st_mode):
        raise UnsafePathError(
            errno.EEXIST, f"not a regular file ({_kind(st.st_mode)}); refusing to replace it", shown
        )


def write_file_atomic(
    path: str | os.PathLike[str], data: bytes, *, dir_fd: int | None = None
) -> None:
    """Replace the file at ``path`` with ``data`` atomically, never through a link.

    ``data`` goes to a new exclusive temporary file in the same directory (``O_EXCL |
    O_NOFOLLOW``), is ``fsync``ed and renamed over ``path``: a reader, or a crash, sees the
    old file or the new one, never half of one. A symbolic link or anything but a regular
    file at ``path`` is an :class:`UnsafePathError`. With ``dir_fd``, ``path`` is a name
    in that directory.
    """
    path = os.fspath(path)
    own_dir = dir_fd is None
    if own_dir:
        directory, name = os.path.split(os.path.abspath(path))
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    else:
        name = path
    try:
        _check_target(name, dir_fd, path)
        tmp = f".{name}.{secrets.token_hex(6)}.tmp"
        fd = create_new(tmp, dir_fd=dir_fd)
        try:
            try:
                write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            _check_target(name, dir_fd, path)
            os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)
            raise
    finally:
        if own_dir:
            os.close(dir_fd)


def write_json_atomic(path: str, obj: Any, *, dir_fd: int | None = None) -> None:
    """Write ``obj`` as JSON to ``path`` with :func:`write_file_atomic`."""
    write_file_atomic(path, json_text(obj).encode("utf-8"), dir_fd=dir_fd)


# ------------------------------------------------------------------------------ reading


def _kind(mode: int) -> str:
    for test, what in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISLNK, "a symbolic link"),
    ):
        if test(mode):
            return what
    return "not a regular file"


def open_regular_file(path: str | os.PathLike[str], limit: int):
    """The regular file at ``path`` opened for reading (a binary file object), checked as
    :func:`read_regular_file` checks it (no FIFO, device or directory; at most ``limit``
    bytes), for readers that read parts of it (Parquet row groups)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFileError(
                errno.EINVAL, f"not a regular file ({_kind(st.st_mode)}); not read", os.fspath(path)
            )
        if st.st_size > limit:
            raise ValueError(
                f"{os.fspath(path)}: {st.st_size} bytes, more than the {limit} allowed"
            )
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular_file(path: str | os.PathLike[str], limit: int) -> bytes:
    """The bytes of the regular file at ``path``, at most ``limit`` of them.

    Opened without blocking (a FIFO cannot stall the reader) and checked on the open
    descriptor: anything but a regular file is a :class:`NotRegularFileError`, a larger
    file a ``ValueError``; both name the path. A file that grows meanwhile is read up to
    the size it had when opened.
    """
    with open_regular_file(path, limit) as f:
        fd = f.fileno()
        size = min(os.fstat(fd).st_size, limit)  # checked at open; never more
        data = os.read(fd, size)  # one read, straight into the result, as a rule
        if len(data) < size:  # over 2 GiB (one read's limit), or truncated meanwhile
            parts = [data]
            left = size - len(data)
            while left > 0:
                chunk = os.read(fd, min(left, 1 << 30))
                if not chunk:
                    break
                parts.append(chunk)
                left -= len(chunk)
            data = b"".join(parts)
        return data
