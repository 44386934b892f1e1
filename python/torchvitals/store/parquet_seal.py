"""The checksums of a compacted (Parquet) segment, over its bytes as written.

Parquet's page CRCs cover page data, not the footer, which says where every page lies
and how to decode it: a damaged footer can change values while every CRC still checks.
So the footer's key-value metadata carries

- :data:`GROUPS_KEY`: for each row group, the checksum of the file's bytes from where the
  group begins (byte 0 for the first) to where the next one begins (the footer, for the
  last), ``;``-separated;
- :data:`FOOTER_KEY`: the checksum of the footer (the Thrift ``FileMetaData`` between the
  data and the 8-byte tail) with its own digits read as ``0``.

A checksum is 24 hex digits, as for a stream's batches (:mod:`.integrity`): the CRC-32
(``zlib.crc32``) and the :func:`~.integrity.nh64` of the bytes. nh64 alone misses some
errors of two bits (two flipped top bits of words in one block cancel out); CRC-32
catches every error of up to three bits, and nh64 gives 64 bits against the rest.

The Parquet writer writes both as zeros; :func:`seal` fills them in, in place (the same
length, so the footer stays valid). The reader checks the footer before trusting any of
it and a row group's bytes before decoding them, so every byte of the file is covered
and a damaged row group is skipped alone. Hashing the encoded bytes costs a fraction of
hashing the decoded values (a histogram's bins decode to about 10 times their size).
"""

from __future__ import annotations

import os
import zlib
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .integrity import nh64

__all__ = ["FOOTER_KEY", "GROUPS_KEY", "FileSeal", "placeholders", "seal"]

GROUPS_KEY = b"torchvitals.group_checksums"
FOOTER_KEY = b"torchvitals.footer_checksum"
_DIGITS = 24
_ZEROS = b"0" * _DIGITS
_TAIL = 8  # footer length (4 bytes, little-endian) and b"PAR1"


def _checksum(data: Any) -> bytes:
    return b"%08x%016x" % (zlib.crc32(data), nh64(data))


def placeholders(groups: int) -> dict[bytes, bytes]:
    """The key-value metadata a file of ``groups`` row groups is written with."""
    return {GROUPS_KEY: b";".join([_ZEROS] * groups), FOOTER_KEY: _ZEROS}


def _footer_start(size: int, tail: bytes) -> int:
    if size < 12 or len(tail) != _TAIL or tail[4:] != b"PAR1":
        raise ValueError("no Parquet tail")
    start = size - _TAIL - int.from_bytes(tail[:4], "little")
    if start < 4:
        raise ValueError("the tail's footer length is larger than the file")
    return start


def _group_bounds(meta: pq.FileMetaData, footer_start: int) -> list[tuple[int, int]]:
    """``(begin, end)`` of each row group's bytes: consecutive, from 0 to the footer."""
    starts = []
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        offsets = []
        for c in range(group.num_columns):
            col = group.column(c)
            offsets.append(col.dictionary_page_offset if col.has_dictionary_page else None)
            offsets.append(col.data_page_offset)
        starts.append(min(o for o in offsets if o is not None) if offsets else footer_start)
    if not starts:
        return []
    bounds = list(zip([0, *starts[1:]], [*starts[1:], footer_start], strict=True))
    if any(not 0 <= begin <= end <= footer_start for begin, end in bounds):
        raise ValueError("the footer's row groups are out of order")
    return bounds


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _value_at(footer: bytes | bytearray, key: bytes, value: bytes) -> int:
    """Where ``value``, the value of ``key``, lies in the serialized footer: found as the
    whole Thrift ``KeyValue`` entry (two binary fields, then the struct's end), the last
    one, since the key-value metadata follows the row groups, whose statistics may hold
    any name, and nothing after it holds a name."""
    entry = b"\x18" + _varint(len(key)) + key + b"\x18" + _varint(len(value))
    at = footer.rfind(entry + value + b"\x00")
    if at < 0:
        raise ValueError(f"{key.decode()} is not in the footer")
    return at + len(entry)


def _footer_checksum(footer: bytes | bytearray, at: int) -> bytes:
    zeroed = bytearray(footer)
    zeroed[at : at + _DIGITS] = _ZEROS
    return _checksum(zeroed)


def seal(data: bytearray) -> None:
    """Fill in the checksums of the Parquet file ``data``, written with
    :func:`placeholders`."""
    footer_start = _footer_start(len(data), bytes(data[-_TAIL:]))
    meta = pq.read_metadata(pa.BufferReader(pa.py_buffer(data)))
    view = memoryview(data)
    sums = b";".join(_checksum(view[b:e]) for b, e in _group_bounds(meta, footer_start))
    written = meta.metadata[GROUPS_KEY]
    if len(sums) != len(written):
        raise ValueError(f"{meta.num_row_groups} row groups, checksum places for another count")
    footer = data[footer_start : len(data) - _TAIL]
    at = _value_at(footer, GROUPS_KEY, written)
    footer[at : at + len(sums)] = sums
    at = _value_at(footer, FOOTER_KEY, _ZEROS)
    footer[at : at + _DIGITS] = _footer_checksum(footer, at)
    data[footer_start : len(data) - _TAIL] = footer


def _fileno(source: Any) -> int | None:
    try:
        return source.fileno()
    except (AttributeError, OSError):  # io.UnsupportedOperation is an OSError
        return None


def _size(source: Any) -> int:
    if isinstance(source, pa.NativeFile):
        return source.size()
    fd = _fileno(source)
    if fd is not None:
        return os.fstat(fd).st_size
    return source.seek(0, os.SEEK_END)


def _read_at(source: Any, offset: int, length: int) -> Any:
    """``length`` bytes of ``source`` (a pyarrow file or a binary file object) from
    ``offset``; fewer at its end."""
    if isinstance(source, pa.NativeFile):
        source.seek(offset)
        return source.read_buffer(length)  # a view of an in-memory file, no copy
    fd = _fileno(source)
    if fd is not None:
        return os.pread(fd, length, offset)
    source.seek(offset)
    return source.read(length)


class FileSeal:
    """The checked checksums of one opened Parquet segment."""

    def __init__(self, source: Any, meta: pq.FileMetaData) -> None:
        """Check the footer of ``source`` (ValueError when it is not the footer that was
        sealed)."""
        values = meta.metadata or {}
        if FOOTER_KEY not in values or GROUPS_KEY not in values:
            raise ValueError("the footer holds no checksums")
        size = _size(source)
        footer_start = _footer_start(size, bytes(_read_at(source, size - _TAIL, _TAIL)))
        footer = bytes(_read_at(source, footer_start, size - _TAIL - footer_start))
        want = values[FOOTER_KEY]
        if _footer_checksum(footer, _value_at(footer, FOOTER_KEY, want)) != want:
            raise ValueError("footer checksum mismatch")
        self._source = source
        self._bounds = _group_bounds(meta, footer_start)
        self._sums = values[GROUPS_KEY].split(b";") if self._bounds else []
        if len(self._sums) != len(self._bounds):
            raise ValueError("the footer's checksums do not match its row groups")

    def check_group(self, i: int) -> None:
        """ValueError unless row group ``i``'s bytes are the ones written."""
        begin, end = self._bounds[i]
        data = _read_at(self._source, begin, end - begin)
        if len(data) != end - begin or _checksum(data) != self._sums[i]:
            raise ValueError("checksum mismatch")
