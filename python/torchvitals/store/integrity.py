"""Checksums of record batches, and the verified reading of an Arrow IPC stream segment.

**What is checksummed.** Every record batch the writer appends carries, in its message's
custom metadata, ``torchvitals.checksum = "tvsum:" + 24 hex digits``:

- 8 digits: the CRC-32 (``zlib.crc32``) of, in this order, the segment's schema message
  (its flatbuffer metadata), the batch's dictionaries (each dictionary column's values),
  so a damaged dictionary message cannot relabel a batch, and the batch's own message
  metadata with the 24 digits read as zeros (row count, buffer offsets and lengths, null
  counts);
- 16 digits: :func:`nh64` of the message body (every buffer, padding included), a 64-bit
  multilinear hash of its 8-byte words with fixed odd keys (the NH family of UMAC), several
  times as fast as ``zlib.crc32`` (compiled, ``csrc/checksum.cpp``), so that checking costs
  the reader and the writer little. Any change of one word (so any single-byte error, or any burst
  within 8 aligned bytes) always changes it.

So a change anywhere in what decodes to the batch's values (schema, dictionaries, row
and buffer counts, offsets, null counts, values) changes the checksum. The schema of a
checksummed segment also carries ``torchvitals.checksums = "tvsum"`` in its metadata.

**Reading** (:func:`read_stream`): the stream is walked message by message; every record
batch is decoded (schema + current dictionaries + the batch), validated with
``validate(full=True)`` and checked against its checksum *before* any value is used. A
batch that fails is skipped and reported (:class:`Damage`: offset, rows, why); a message
that cannot be read at all is skipped by scanning for the next message start, so one bad
byte costs one batch, not the rest of the segment. Segments written before checksums
existed (no checksum anywhere) are accepted after full validation.
"""

from __future__ import annotations

import os
import struct
import threading
import zlib
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from torchvitals import _C

__all__ = [
    "CHECKSUM_KEY",
    "SCHEMA_FLAG",
    "Damage",
    "Sealer",
    "StreamContents",
    "checksum_metadata",
    "nh64",
    "read_stream",
    "verified_batches",
    "with_checksum_flag",
]

#: Key of the checksum in a record batch's custom metadata.
CHECKSUM_KEY = "torchvitals.checksum"
#: Key in a checksummed segment's schema metadata.
SCHEMA_FLAG = b"torchvitals.checksums"
_TAG = b"tvsum:"
_DIGITS = 24
_ZEROS = b"0" * _DIGITS
_CONTINUATION = b"\xff\xff\xff\xff"
_EOS = _CONTINUATION + b"\x00\x00\x00\x00"


def checksum_metadata() -> dict[str, str]:
    """The custom metadata a batch is written with (the digits are filled in by :class:`Sealer`)."""
    return {CHECKSUM_KEY: (_TAG + _ZEROS).decode()}


def with_checksum_flag(schema: pa.Schema) -> pa.Schema:
    """``schema`` with the metadata that marks a checksummed segment."""
    meta = dict(schema.metadata or {})
    meta[SCHEMA_FLAG] = b"tvsum"
    return schema.with_metadata(meta)


_STRING = pa.string()


def _dictionary_crc(d: pa.Array, crc: int) -> int:
    """CRC of a dictionary's values: strings from their buffers (offsets starting at 0, no
    nulls, as both the writer and the IPC reader have them), anything else serialized."""
    if d.type == _STRING and d.offset == 0 and d.null_count == 0:
        n = len(d)
        _validity, offsets, data = d.buffers()
        offsets = memoryview(offsets)[: 4 * (n + 1)] if offsets is not None else b""
        if len(offsets) == 4 * (n + 1) and struct.unpack_from("<i", offsets, 0)[0] == 0:
            end = struct.unpack_from("<i", offsets, 4 * n)[0]
            crc = zlib.crc32(b"%d:" % n, crc)
            crc = zlib.crc32(offsets, crc)
            return zlib.crc32(memoryview(data)[:end] if data is not None else b"", crc)
    return zlib.crc32(pa.RecordBatch.from_arrays([d], ["d"]).serialize(), crc)


def _dictionary_columns(schema: pa.Schema) -> list[int]:
    return [i for i, f in enumerate(schema) if pa.types.is_dictionary(f.type)]


def _prefix_crc(
    schema_crc: int, batch: pa.RecordBatch, dict_columns: list[int], metadata: bytes
) -> int:
    """CRC-32 of the schema, the batch's dictionaries and its metadata (digits zeroed)."""
    crc = schema_crc
    for i in dict_columns:
        crc = _dictionary_crc(batch.column(i).dictionary, crc)
    return zlib.crc32(metadata, crc)


NH_WORDS = 1 << 16  # words per block: the keys of one block
#: The keys of nh64: fixed forever (they are part of the file format).
NH_KEYS = np.random.default_rng(0x7476_6974_616C_73).integers(
    0, 1 << 63, NH_WORDS, dtype=np.uint64
) * np.uint64(2) + np.uint64(1)
NH_STEP = 0x9E37_79B9_7F4A_7C15  # odd: blocks are chained by multiplication mod 2**64


def nh64(data) -> int:
    """64-bit multilinear hash of ``data``: its little-endian 8-byte words times fixed odd
    keys, summed mod 2**64 per block of 65,536 words, blocks chained by an odd multiplier,
    the length folded in first and a tail of fewer than 8 bytes last. Computed by the
    compiled engine (``csrc/checksum.cpp``, without the GIL, so the reader's threads hash
    in parallel); tests/store/test_checksum.py holds the NumPy definition it must match."""
    raw = np.frombuffer(memoryview(data if data is not None else b"").cast("B"), dtype=np.uint8)
    if raw.size == 0:
        return 0
    return _C.nh64(raw.ctypes.data, raw.size, NH_KEYS.ctypes.data, NH_WORDS, NH_STEP)


def _checksum(prefix_crc: int, body) -> bytes:
    return b"%08x%016x" % (prefix_crc, nh64(body))


def _tag_position(metadata: bytes) -> int:
    """Where the checksum digits are in a message's metadata; -1 without a (single) tag."""
    i = metadata.find(_TAG)
    if i < 0 or metadata.find(_TAG, i + 1) >= 0 or i + len(_TAG) + _DIGITS > len(metadata):
        return -1
    return i + len(_TAG)


class Sealer:
    """Fills in the checksums of the batches of one stream, on the bytes the Arrow stream
    writer produced for each ``write_batch`` (schema and dictionary messages, then the
    record batch message, which is last)."""

    def __init__(self) -> None:
        self._schema_crc: int | None = None
        self._dict_columns: list[int] | None = None

    def seal(self, chunk: bytearray, batch: pa.RecordBatch) -> bytearray:
        """Fill in the checksum of the record batch at the end of ``chunk``, in place."""
        buf = pa.py_buffer(chunk)
        reader = pa.BufferReader(buf)
        message = None
        while reader.tell() < len(chunk):
            message = pa.ipc.read_message(reader)
            if message.type == "schema":
                self._schema_crc = zlib.crc32(message.metadata)
        if message is None or message.type != "record batch" or self._schema_crc is None:
            raise ValueError("torchvitals: the stream writer produced no record batch to seal")
        metadata = message.metadata
        pos = _tag_position(bytes(metadata))
        if pos < 0:
            raise ValueError("torchvitals: the record batch has no checksum placeholder")
        if self._dict_columns is None:
            self._dict_columns = _dictionary_columns(batch.schema)
        prefix = _prefix_crc(self._schema_crc, batch, self._dict_columns, metadata)
        digits = _checksum(prefix, message.body)
        at = metadata.address - buf.address + pos
        del reader, message, metadata, buf  # let go of the views before writing into it
        chunk[at : at + _DIGITS] = digits
        return chunk


@dataclass(frozen=True)
class Damage:
    """Part of a segment that was not read: a skipped batch or an unreadable region."""

    offset: int  #: byte offset of the message (or region) in the file
    rows: int | None  #: rows of the skipped batch as its header says; None when unknown
    error: str  #: why it was skipped


@dataclass
class StreamContents:
    """What :func:`read_stream` recovered from one segment."""

    schema: pa.Schema | None = None
    batches: list[pa.RecordBatch] = field(default_factory=list)
    damage: list[Damage] = field(default_factory=list)
    checksums: list[int] = field(default_factory=list)  #: of the batches kept, in order
    checksummed: bool = False  #: the segment carries checksums (written by a checksumming writer)
    clean_end: bool = True  #: ended with the end-of-stream marker or at a batch boundary


def _u16(b: bytes, o: int) -> int:
    return struct.unpack_from("<H", b, o)[0]


def _u32(b: bytes, o: int) -> int:
    return struct.unpack_from("<I", b, o)[0]


def _field(b: bytes, table: int, index: int) -> int | None:
    """Position of field ``index`` of the flatbuffer table at ``table``; None if absent."""
    vtable = table - struct.unpack_from("<i", b, table)[0]
    slot = vtable + 4 + 2 * index
    if slot + 2 > vtable + _u16(b, vtable):
        return None
    off = _u16(b, slot)
    return table + off if off else None


def _dictionary_key(metadata: bytes) -> tuple[int, bool]:
    """``(id, isDelta)`` of a DictionaryBatch message (``Message.header``, flatbuffers)."""
    try:
        root = _u32(metadata, 0)
        header = _field(metadata, root, 2)
        if header is None:
            raise ValueError("dictionary message without a header")
        header += _u32(metadata, header)
        at = _field(metadata, header, 0)
        dict_id = struct.unpack_from("<q", metadata, at)[0] if at is not None else 0
        at = _field(metadata, header, 2)
        delta = bool(metadata[at]) if at is not None else False
        return dict_id, delta
    except (struct.error, IndexError) as exc:
        raise ValueError(f"unreadable dictionary message header ({exc})") from exc


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


class _Walk:
    """The reading of one segment's bytes (see :func:`read_stream`)."""

    def __init__(self, data: bytes):
        self.data = data
        self.buf = pa.py_buffer(data)
        self.out = StreamContents()
        self.schema_bytes = b""
        self.schema_crc = 0
        self.dictionaries: dict[int, list[bytes]] = {}
        self.dict_columns: list[int] = []
        # While nothing is damaged, one stream reader decodes the batches in step with the
        # walk (zero-copy); after any damage each batch is decoded on its own.
        self.fast: pa.ipc.RecordBatchStreamReader | None = None
        # (offset, batch, CRC of all but the body, body, checksum written or None)
        self.pending: list[tuple[int, pa.RecordBatch, int, object, bytes | None]] = []
        self.tagged = False  # some batch carries a checksum
        # a large segment's bodies are hashed on a pool while the walk goes on
        self.pool = _checksum_pool() if len(data) >= PARALLEL_BYTES else None
        self.hashes: list[Future] = []

    def damaged(self, damage: Damage) -> None:
        self.out.damage.append(damage)
        self.fast = None

    def message_at(self, pos: int) -> tuple[pa.ipc.Message, int]:
        reader = pa.BufferReader(self.buf)
        reader.seek(pos)
        message = pa.ipc.read_message(reader)
        return message, reader.tell()

    def next_start(self, pos: int) -> int:
        """The next offset after ``pos`` where a readable dictionary or batch message (or
        the end-of-stream marker) starts; ``len(data)`` if there is none."""
        data = self.data
        at = pos
        while True:
            at = data.find(_CONTINUATION, at + 1)
            if at < 0:
                return len(data)
            if at % 8:
                continue
            if data[at : at + 8] == _EOS:
                return at
            try:
                message, _end = self.message_at(at)
            except (pa.ArrowException, OSError, EOFError, ValueError):
                continue
            if message.type in ("dictionary", "record batch"):
                return at

    def run(self) -> StreamContents:
        for _ in self.walk():
            pass
        return self.finish()

    def walk(self) -> Iterator[None]:
        """Walk the messages; yields after each record batch put in ``pending``."""
        out, data = self.out, self.data
        try:
            message, pos = self.message_at(0)
            if message.type != "schema":
                raise ValueError(f"the first message is a {message.type}, not a schema")
            out.schema = pa.ipc.read_schema(message)
        except (pa.ArrowException, OSError, EOFError, ValueError) as exc:
            out.damage.append(Damage(0, None, f"no readable schema: {_describe(exc)}"))
            out.clean_end = False
            return
        self.schema_bytes = data[:pos]
        self.schema_crc = zlib.crc32(message.metadata)
        out.checksummed = SCHEMA_FLAG in (out.schema.metadata or {})
        self.dict_columns = _dictionary_columns(out.schema)
        try:
            self.fast = pa.ipc.open_stream(self.buf)
        except (pa.ArrowException, OSError, EOFError, ValueError):
            self.fast = None
        while pos < len(data):
            if data[pos : pos + 8] == _EOS:
                if pos + 8 != len(data):
                    extra = len(data) - pos - 8
                    self.damaged(
                        Damage(pos + 8, None, f"{extra} byte(s) after the end of the stream")
                    )
                    out.clean_end = False
                break
            try:
                message, end = self.message_at(pos)
            except (pa.ArrowException, OSError, EOFError, ValueError) as exc:
                nxt = self.next_start(pos)
                self.damaged(Damage(pos, None, f"unreadable message: {_describe(exc)}"))
                out.clean_end = False
                pos = nxt
                continue
            if message.type == "record batch":
                self.batch(pos, end, message)
                yield
            elif message.type == "dictionary":
                try:
                    dict_id, delta = _dictionary_key(bytes(message.metadata))
                except ValueError as exc:
                    self.damaged(Damage(pos, None, _describe(exc)))
                else:
                    kept = self.dictionaries.setdefault(dict_id, [])
                    if not delta:
                        kept.clear()
                    kept.append(data[pos:end])
            else:
                self.damaged(Damage(pos, None, f"unexpected {message.type} message"))
            pos = end

    def decode(self, pos: int, end: int) -> pa.RecordBatch:
        if self.fast is not None:
            try:
                return self.fast.read_next_batch()
            except (pa.ArrowException, OSError, EOFError, ValueError, StopIteration):
                self.fast = None
        parts = [self.schema_bytes]
        for dict_id in sorted(self.dictionaries):
            parts += self.dictionaries[dict_id]
        parts.append(self.data[pos:end])
        with pa.ipc.open_stream(pa.py_buffer(b"".join(parts))) as reader:
            return reader.read_next_batch()

    def batch(self, pos: int, end: int, message: pa.ipc.Message) -> None:
        """Decode and validate one batch; its checksum is checked in :meth:`finish`."""
        rows = None
        try:
            batch = self.decode(pos, end)
            rows = batch.num_rows
            batch.validate(full=True)
            metadata = bytes(message.metadata)
            at = _tag_position(metadata)
            if at >= 0:
                written = metadata[at : at + _DIGITS]
                blanked = metadata[:at] + _ZEROS + metadata[at + _DIGITS :]
                prefix = _prefix_crc(self.schema_crc, batch, self.dict_columns, blanked)
                self.pending.append((pos, batch, prefix, message.body, written))
                if self.pool is not None:
                    self.hashes.append(self.pool.submit(nh64, message.body))
                self.tagged = True
            elif self.out.checksummed:
                raise ValueError("checksum missing in a checksummed segment")
            else:  # written before checksums: validated only; the hash is its fingerprint
                raw = memoryview(self.data)[pos:end]
                self.pending.append((pos, batch, 0, raw, None))
                if self.pool is not None:
                    self.hashes.append(self.pool.submit(nh64, raw))
        except (pa.ArrowException, OSError, EOFError, ValueError, StopIteration) as exc:
            self.damaged(Damage(pos, rows, f"record batch skipped: {_describe(exc)}"))

    def finish(self) -> StreamContents:
        """Check the batches' checksums (the bodies' CRCs on several threads when there is
        much to read) and keep the intact batches, in order."""
        out = self.out
        if self.pool is not None:
            sums = [f.result() for f in self.hashes]
        else:
            sums = [nh64(body) for _pos, _batch, _prefix, body, _written in self.pending]
        if self.tagged:
            out.checksummed = True
            for (pos, batch, _prefix, _body, written), _sum in zip(self.pending, sums, strict=True):
                if written is None:
                    out.damage.append(
                        Damage(pos, batch.num_rows, "record batch skipped: checksum missing in "
                               "a checksummed segment")
                    )  # fmt: skip
        for (pos, batch, prefix, _body, written), body_sum in zip(self.pending, sums, strict=True):
            if written is None and self.tagged:
                continue
            digits = b"%08x%016x" % (prefix, body_sum)
            if written is not None and digits != written:
                shown = written.decode("ascii", "replace")
                out.damage.append(
                    Damage(pos, batch.num_rows, f"record batch skipped: checksum mismatch "
                           f"(written {shown}, read {digits.decode()})")
                )  # fmt: skip
                continue
            out.batches.append(batch)
            out.checksums.append(int(digits, 16))
        out.damage.sort(key=lambda d: d.offset)
        return out


#: A segment of this many bytes or more has its batches' bodies hashed on a thread pool
#: (NumPy releases the GIL) while the walk goes on.
PARALLEL_BYTES = 8 << 20
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _checksum_pool() -> ThreadPoolExecutor | None:
    """The pool hashing bodies; None on one CPU."""
    global _pool
    workers = min(8, os.cpu_count() or 1)
    if workers < 2:
        return None
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(workers, thread_name_prefix="torchvitals-checksum")
    return _pool


def verified_batches(data) -> Iterator[tuple[pa.RecordBatch, int]]:
    """The record batches of a stream segment that must be intact (one being compacted),
    one at a time with their checksums (as in :attr:`StreamContents.checksums`), each
    checked (``validate(full=True)`` and its checksum) before it is yielded, so only one
    batch is decoded at a time. ``data``: bytes or a read-only ``mmap``. Raises
    ``ValueError`` at the first damage of any kind, naming its offset."""
    walk = _Walk(data)
    walk.pool = None  # one batch at a time: nothing to hash ahead
    for _ in walk.walk():
        if walk.out.damage:
            break
        pos, batch, prefix, body, written = walk.pending.pop()
        if written is None and (walk.out.checksummed or walk.tagged):
            raise ValueError(f"record batch at byte {pos}: checksum missing")
        digits = b"%08x%016x" % (prefix, nh64(body))
        if written is not None and digits != written:
            raise ValueError(f"record batch at byte {pos}: checksum mismatch")
        del body
        yield batch, int(digits, 16)
    if walk.out.damage:
        first = walk.out.damage[0]
        raise ValueError(f"at byte {first.offset}: {first.error}")
    if not walk.out.clean_end:
        raise ValueError("the stream does not end at a batch boundary")


def read_stream(data: bytes, schema: pa.Schema | None = None) -> StreamContents:
    """Every intact record batch of the Arrow IPC stream ``data``, and what was damaged.

    ``schema``: the schema the segment should have. When nothing could be read with the
    segment's own schema message (damaged), the walk is tried again with this one in its
    place; the checksums (which cover the schema) decide whether it was the right one.
    Never raises for damaged input: what could not be read is in ``damage``.
    """
    out = _Walk(data).run()
    if schema is None or out.batches or not out.damage:
        return out
    first = _Walk(data)
    try:
        _message, start = first.message_at(0)
    except (pa.ArrowException, OSError, EOFError, ValueError):
        start = first.next_start(0)
    if start >= len(data):
        return out
    own = schema.serialize().to_pybytes()
    if data[:start] == own:
        return out  # the schema message was intact: nothing more to try
    alt = _Walk(own + data[start:]).run()
    if not alt.batches:
        return out
    shift = start - len(own)
    alt.damage = [Damage(0, 0, "schema message damaged; read with the table's schema")] + [
        Damage(d.offset + shift, d.rows, d.error) for d in alt.damage
    ]
    alt.clean_end = False
    return alt
