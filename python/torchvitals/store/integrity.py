"""Checksums of record batches, and the verified reading of an Arrow IPC stream segment.

**What is checksummed.** Every record batch the writer appends carries, in its message's
custom metadata, ``torchvitals.checksum = "crc32:XXXXXXXX"``: the CRC-32 (``zlib.crc32``)
of, in this order,

1. the segment's schema message (its flatbuffer metadata),
2. the batch's dictionaries (each dictionary column's dictionary, serialized as a one-column
   record batch message), so a damaged dictionary message cannot relabel a batch,
3. the batch's own message metadata, with the eight checksum digits read as ``00000000``,
4. the batch's message body (every buffer, padding included).

So a change anywhere in what decodes to the batch's values (schema, dictionaries, row
and buffer counts, offsets, null counts, values) changes the checksum. The schema of a
checksummed segment also carries ``torchvitals.checksums = "crc32"`` in its metadata.

**Reading** (:func:`read_stream`): the stream is walked message by message; every record
batch is decoded on its own (schema + current dictionaries + the batch), validated with
``validate(full=True)`` and checked against its checksum *before* any value is used. A
batch that fails is skipped and reported (:class:`Damage`: offset, rows, why); a message
that cannot be read at all is skipped by scanning for the next message start, so one bad
byte costs one batch, not the rest of the segment. Segments written before checksums
existed (no checksum anywhere) are accepted after full validation.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

import pyarrow as pa

__all__ = [
    "CHECKSUM_KEY",
    "SCHEMA_FLAG",
    "Damage",
    "Sealer",
    "StreamContents",
    "checksum_metadata",
    "read_stream",
    "with_checksum_flag",
]

#: Key of the checksum in a record batch's custom metadata.
CHECKSUM_KEY = "torchvitals.checksum"
#: Key in a checksummed segment's schema metadata.
SCHEMA_FLAG = b"torchvitals.checksums"
_TAG = b"crc32:"
_ZEROS = b"00000000"
_CONTINUATION = b"\xff\xff\xff\xff"
_EOS = _CONTINUATION + b"\x00\x00\x00\x00"


def checksum_metadata() -> dict[str, str]:
    """The custom metadata a batch is written with (the digits are filled in by :class:`Sealer`)."""
    return {CHECKSUM_KEY: (_TAG + _ZEROS).decode()}


def with_checksum_flag(schema: pa.Schema) -> pa.Schema:
    """``schema`` with the metadata that marks a checksummed segment."""
    meta = dict(schema.metadata or {})
    meta[SCHEMA_FLAG] = b"crc32"
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


def _batch_crc(
    schema_crc: int, batch: pa.RecordBatch, dict_columns: list[int], metadata: bytes, body
) -> int:
    crc = schema_crc
    for i in dict_columns:
        crc = _dictionary_crc(batch.column(i).dictionary, crc)
    crc = zlib.crc32(metadata, crc)
    return zlib.crc32(body, crc) if body is not None else crc


def _tag_position(metadata: bytes) -> int:
    """Where the checksum digits are in a message's metadata; -1 without a (single) tag."""
    i = metadata.find(_TAG)
    if i < 0 or metadata.find(_TAG, i + 1) >= 0 or i + len(_TAG) + 8 > len(metadata):
        return -1
    return i + len(_TAG)


class Sealer:
    """Fills in the checksums of the batches of one stream, on the bytes the Arrow stream
    writer produced for each ``write_batch`` (schema and dictionary messages, then the
    record batch message, which is last)."""

    def __init__(self) -> None:
        self._schema_crc: int | None = None
        self._dict_columns: list[int] | None = None

    def seal(self, chunk: bytes, batch: pa.RecordBatch) -> bytes:
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
        crc = _batch_crc(self._schema_crc, batch, self._dict_columns, metadata, message.body)
        out = bytearray(chunk)
        at = metadata.address - buf.address + pos
        out[at : at + 8] = b"%08x" % crc
        return bytes(out)


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
        out, data = self.out, self.data
        try:
            message, pos = self.message_at(0)
            if message.type != "schema":
                raise ValueError(f"the first message is a {message.type}, not a schema")
            out.schema = pa.ipc.read_schema(message)
        except (pa.ArrowException, OSError, EOFError, ValueError) as exc:
            out.damage.append(Damage(0, None, f"no readable schema: {_describe(exc)}"))
            out.clean_end = False
            return out
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
                return out
            try:
                message, end = self.message_at(pos)
            except (pa.ArrowException, OSError, EOFError, ValueError) as exc:
                nxt = self.next_start(pos)
                self.damaged(Damage(pos, None, f"unreadable message: {_describe(exc)}"))
                out.clean_end = False
                pos = nxt
                continue
            if message.type == "record batch":
                self.batch(pos, data[pos:end], message)
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
        return out

    def decode(self, raw: bytes) -> pa.RecordBatch:
        if self.fast is not None:
            try:
                return self.fast.read_next_batch()
            except (pa.ArrowException, OSError, EOFError, ValueError, StopIteration):
                self.fast = None
        parts = [self.schema_bytes]
        for dict_id in sorted(self.dictionaries):
            parts += self.dictionaries[dict_id]
        parts.append(raw)
        with pa.ipc.open_stream(pa.py_buffer(b"".join(parts))) as reader:
            return reader.read_next_batch()

    def batch(self, pos: int, raw: bytes, message: pa.ipc.Message) -> None:
        out = self.out
        rows = None
        try:
            batch = self.decode(raw)
            rows = batch.num_rows
            batch.validate(full=True)
            metadata = bytes(message.metadata)
            at = _tag_position(metadata)
            if at >= 0:
                written = metadata[at : at + 8]
                blanked = metadata[:at] + _ZEROS + metadata[at + 8 :]
                crc = _batch_crc(self.schema_crc, batch, self.dict_columns, blanked, message.body)
                if b"%08x" % crc != written:
                    raise ValueError(
                        f"checksum mismatch (written {written.decode('ascii', 'replace')}, "
                        f"read {crc:08x})"
                    )
                out.checksummed = True
            elif out.checksummed:
                raise ValueError("checksum missing in a checksummed segment")
            else:
                crc = zlib.crc32(raw)
        except (pa.ArrowException, OSError, EOFError, ValueError, StopIteration) as exc:
            self.damaged(Damage(pos, rows, f"record batch skipped: {_describe(exc)}"))
            return
        out.batches.append(batch)
        out.checksums.append(crc)


def read_stream(data: bytes) -> StreamContents:
    """Every intact record batch of the Arrow IPC stream ``data``, and what was damaged.

    Never raises for damaged input: what could not be read is in ``damage``.
    """
    return _Walk(data).run()
