"""Tensor-level delta between two TFLite models (issue 12 §1; docs/protocol.md, addition 9).

Codec only: the registry does not publish deltas yet and desired states do not offer them.

A retrained model keeps most of its weight buffers byte for byte. :func:`make_delta` splits
both flatbuffers into weight buffers (``Model.buffers``: the inline ``data`` vectors, or the
``offset``/``size`` ranges of the "large model" layout whose data follows the flatbuffer) and
everything else, the *skeleton*. The target is written as a list of segments:

* ``COPY`` a base buffer whose bytes equal the target buffer's (matched by content hash, so a
  buffer that moved to another index is still found);
* ``XOR`` a changed buffer as (target XOR base buffer of the same index and size), its bytes
  regrouped by position within the element ("byte shuffle": all sign/exponent bytes of a
  float32 tensor together) so that slightly fine-tuned floats become long zero runs; used only
  when zstd makes it smaller than the plain bytes;
* ``LITERAL`` bytes stored whole: the skeleton between buffers, and changed buffers.

The literal and XOR bytes travel in one zstd frame whose dictionary is the base bytes that
no segment copies (the base's skeleton, mostly), so an unchanged skeleton costs a few bytes
and a changed one is stored whole, compressed.
:func:`apply_delta` needs no flatbuffer parser: segments name byte ranges of the base, and
unchanged skeleton bytes next to copied buffers are copied with them, so an unchanged run of
buffers is one segment. Every size is checked before anything is allocated, zstd never
inflates past a size known in advance, and the result is compared with the target's sha256,
so a corrupt or hostile delta fails with :class:`DeltaError`.

Layout (little-endian)::

    header   (120 bytes) magic "MFDELTA1" · version u16 · flags u16 (0) · base size u64 · target size u64
             · base sha256 [32] · target sha256 [32] · segments u32 · table zstd size u64
             · payload size u64 · payload zstd size u64
    table    one zstd frame: segments (kind u8, element width u8, 2 pad bytes,
             base offset u64, length u64)…, in target order
    payload  one zstd frame whose dictionary is the base bytes no COPY/XOR segment reads:
             the LITERAL and (shuffled) XOR bytes in target order
"""

from __future__ import annotations

import enum
import hashlib
import struct
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import zstandard

from agent.download import ZSTD_MAX_WINDOW_BYTES

MAGIC = b"MFDELTA1"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sHHQQ32s32sIQQQ")
HEADER_SIZE = _HEADER.size
_SEGMENT = struct.Struct("<BBxxQQ")
# TFLite models have hundreds, at most a few thousand buffers. The cap bounds the table a
# delta can make the agent read (2**16 segments of 20 bytes = 1.25 MiB) whatever its header says.
MAX_ENTRIES = 1 << 16
LITERAL, COPY, XOR = 0, 1, 2
_WIDTHS = (1, 2, 4, 8)
_WINDOW_LOG = ZSTD_MAX_WINDOW_BYTES.bit_length() - 1
# Level used only to choose between plain and XOR for one buffer; the frame uses ``level``.
_CHOICE_LEVEL = 3


class DeltaFailure(enum.StrEnum):
    """Why a delta cannot be applied; the agent falls back to the full blob on any of them."""

    WRONG_BASE = "wrong_base"  # the base on the device is not the one the delta was made from
    TOO_LARGE = "too_large"  # the target exceeds max_output
    UNSUPPORTED = "unsupported"  # another format version or flags
    CORRUPT = "corrupt"  # anything else: truncated, bit-flipped, inconsistent
    TARGET_MISMATCH = "target_mismatch"  # the rebuilt bytes do not hash to the target's sha256


class DeltaError(Exception):
    """A delta that cannot be applied, with the reason the agent reports (:class:`DeltaFailure`)."""

    def __init__(self, code: DeltaFailure, message: str) -> None:
        super().__init__(message)
        self.code = code


class DeltaRefused(Exception):
    """:func:`make_delta` cannot express this pair as a delta (not TFLite, overlapping buffers…)."""


@dataclass(frozen=True)
class DeltaHeader:
    version: int
    base_size: int
    target_size: int
    base_sha256: str
    target_sha256: str
    segments: int
    table_zsize: int
    payload_size: int
    payload_zsize: int


@dataclass(frozen=True)
class _Buffer:
    index: int  # position in Model.buffers
    offset: int
    length: int
    width: int  # bytes per element of the tensor that reads it (1 when unknown)
    shape: tuple[int, ...] | None


_TYPE_WIDTHS = {"FLOAT32": 4, "INT32": 4, "UINT32": 4, "FLOAT16": 2, "INT16": 2, "UINT16": 2}
_TYPE_WIDTHS |= {"BFLOAT16": 2, "FLOAT64": 8, "INT64": 8, "UINT64": 8, "COMPLEX64": 8}


def _weight_buffers(model_bytes: bytes) -> list[_Buffer]:
    """The non-empty buffers of a TFLite flatbuffer, sorted by offset, checked for overlap."""
    # Imported here so that applying a delta needs no TFLite schema (only making one does).
    from ai_edge_litert import schema_py_generated as schema

    size = len(model_bytes)
    if size < 8 or model_bytes[4:8] != b"TFL3":
        raise DeltaRefused("not a TFLite flatbuffer (no TFL3 identifier)")
    type_names = {v: k for k, v in vars(schema.TensorType).items() if isinstance(v, int)}
    try:
        model = schema.Model.GetRootAs(model_bytes, 0)
        tensor_of: dict[int, tuple[int, tuple[int, ...]]] = {}
        for s in range(model.SubgraphsLength()):
            subgraph = model.Subgraphs(s)
            for t in range(subgraph.TensorsLength()):
                tensor = subgraph.Tensors(t)
                shape = tuple(int(d) for d in tensor.ShapeAsNumpy()) if tensor.ShapeLength() else ()
                width = _TYPE_WIDTHS.get(type_names.get(tensor.Type(), ""), 1)
                tensor_of.setdefault(tensor.Buffer(), (width, shape))
        buffers = []
        for i in range(model.BuffersLength()):
            buffer = model.Buffers(i)
            # TFLite reads external data when offset > 1 (1 is the serializer's placeholder).
            if buffer.Offset() > 1:
                offset, length = int(buffer.Offset()), int(buffer.Size())
            else:
                field = buffer._tab.Offset(4)  # Buffer.data, a [ubyte] vector
                length = buffer._tab.VectorLen(field) if field else 0
                offset = buffer._tab.Vector(field) if field else 0
            if length == 0:
                continue
            if offset + length > size:
                raise DeltaRefused(f"buffer {i} runs past the end of the file")
            width, shape = tensor_of.get(i, (1, None))
            buffers.append(_Buffer(i, offset, length, width if length % width == 0 else 1, shape))
    except (IndexError, struct.error, ValueError, TypeError) as exc:
        raise DeltaRefused(f"the flatbuffer is cut short or corrupt ({exc})") from exc
    buffers.sort(key=lambda b: (b.offset, b.index))
    unique: list[_Buffer] = []
    for buffer in buffers:
        if unique and buffer.offset < unique[-1].offset + unique[-1].length:
            if (buffer.offset, buffer.length) == (unique[-1].offset, unique[-1].length):
                continue  # two buffers sharing one data range: one range is enough
            raise DeltaRefused(f"buffers {unique[-1].index} and {buffer.index} overlap")
        unique.append(buffer)
    if len(unique) > MAX_ENTRIES:
        raise DeltaRefused(f"{len(unique)} buffers: more than the {MAX_ENTRIES} the format allows")
    return unique


def _unread(data: bytes | memoryview, segments: list[tuple[int, int, int, int]]) -> bytes:
    """The bytes of ``data`` (the base) that no COPY or XOR segment reads, in order.

    This is the payload frame's dictionary: the base's skeleton, plus the old bytes of any
    buffer stored whole, which is what a LITERAL segment most likely resembles.
    """
    reads = sorted((offset, offset + length) for kind, _, offset, length in segments if kind != LITERAL)
    view, pieces, cursor = memoryview(data), [], 0
    for start, end in reads:
        if start > cursor:
            pieces.append(view[cursor:start])
        cursor = max(cursor, end)
    pieces.append(view[cursor:])
    return b"".join(pieces)


def _shuffled_xor(new: memoryview, old: memoryview, width: int) -> bytes:
    xored = np.bitwise_xor(np.frombuffer(new, np.uint8), np.frombuffer(old, np.uint8))
    return xored.reshape(-1, width).T.tobytes()


def _unshuffle_xor_into(out: np.ndarray, shuffled: memoryview, old: memoryview, width: int) -> None:
    """Undo :func:`_shuffled_xor` into ``out``: one plane per byte position, then XOR."""
    old_bytes = np.frombuffer(old, np.uint8)
    if width == 1:
        np.bitwise_xor(np.frombuffer(shuffled, np.uint8), old_bytes, out=out)
        return
    columns, planes = out.reshape(-1, width), np.frombuffer(shuffled, np.uint8).reshape(width, -1)
    for position in range(width):  # column by column: far faster than a transposed copy
        columns[:, position] = planes[position]
    np.bitwise_xor(out, old_bytes, out=out)


def _dictionary(skeleton: bytes) -> zstandard.ZstdCompressionDict | None:
    if not skeleton:
        return None
    return zstandard.ZstdCompressionDict(skeleton, dict_type=zstandard.DICT_TYPE_RAWCONTENT)


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


def _extend_copies(segments: list[list[int]], base: np.ndarray, target: np.ndarray) -> list[list[int]]:
    """Grow COPY segments over the skeleton bytes around them that the base has too.

    Between two weight buffers lie a few bytes of flatbuffer (a vector length, padding); where
    they are unchanged the copies join, so an unchanged run of buffers costs one segment.
    Segments are [kind, width, base offset, length, target offset].
    """
    for i, segment in enumerate(segments):
        if segment[0] != LITERAL:
            continue
        before = segments[i - 1] if i else None
        if before and before[0] == COPY:
            start = before[2] + before[3]
            take = _common_prefix(target[segment[4] : segment[4] + segment[3]], base[start:])
            before[3] += take
            segment[3] -= take
            segment[4] += take
        after = segments[i + 1] if i + 1 < len(segments) else None
        if after and after[0] == COPY and segment[3]:
            take = _common_prefix(target[segment[4] : segment[4] + segment[3]][::-1], base[: after[2]][::-1])
            segment[3] -= take
            after[2] -= take
            after[3] += take
            after[4] -= take
    merged: list[list[int]] = []
    for segment in segments:
        if not segment[3]:
            continue
        last = merged[-1] if merged else None
        joins = last is not None and (
            last[0] == LITERAL == segment[0]
            or (last[0] == COPY == segment[0] and last[2] + last[3] == segment[2])
        )
        if joins:
            last[3] += segment[3]
        else:
            merged.append(segment)
    return merged


def make_delta(base: bytes, target: bytes, *, level: int = 19) -> bytes:
    """A delta that rebuilds ``target`` from ``base``; both must be TFLite models.

    Raises :class:`DeltaRefused` when either is not a TFLite flatbuffer the format can
    describe; the registry then ships the full blob only.
    """
    base_buffers, target_buffers = _weight_buffers(base), _weight_buffers(target)
    base_view, target_view = memoryview(base), memoryview(target)
    base_by_hash: dict[bytes, _Buffer] = {}
    base_by_index: dict[int, _Buffer] = {}
    for buffer in base_buffers:
        digest = hashlib.sha256(base_view[buffer.offset : buffer.offset + buffer.length]).digest()
        base_by_hash.setdefault(digest, buffer)
        base_by_index[buffer.index] = buffer
    chooser = zstandard.ZstdCompressor(level=_CHOICE_LEVEL)
    segments: list[list[int]] = []  # [kind, width, base offset, length, target offset]
    xor_bytes: dict[int, bytes] = {}  # target offset -> shuffled XOR of that buffer
    cursor = 0
    for buffer in target_buffers:
        if buffer.offset > cursor:
            segments.append([LITERAL, 1, 0, buffer.offset - cursor, cursor])
        cursor = buffer.offset + buffer.length
        data = target_view[buffer.offset : cursor]
        same = base_by_hash.get(hashlib.sha256(data).digest())
        if same is not None:
            segments.append([COPY, 1, same.offset, buffer.length, buffer.offset])
            continue
        old = base_by_index.get(buffer.index)
        if old is not None and old.length == buffer.length and old.shape == buffer.shape:
            shuffled = _shuffled_xor(data, base_view[old.offset : old.offset + old.length], buffer.width)
            if len(chooser.compress(shuffled)) < len(chooser.compress(data)):
                segments.append([XOR, buffer.width, old.offset, buffer.length, buffer.offset])
                xor_bytes[buffer.offset] = shuffled
                continue
        segments.append([LITERAL, 1, 0, buffer.length, buffer.offset])
    if len(target) > cursor:
        segments.append([LITERAL, 1, 0, len(target) - cursor, cursor])
    segments = _extend_copies(segments, np.frombuffer(base, np.uint8), np.frombuffer(target, np.uint8))
    if len(segments) > MAX_ENTRIES:
        raise DeltaRefused(f"{len(segments)} segments: more than the {MAX_ENTRIES} the format allows")

    payload = b"".join(
        xor_bytes[start] if kind == XOR else target_view[start : start + length]
        for kind, _, _, length, start in segments
        if kind != COPY
    )
    table_rows = [tuple(segment[:4]) for segment in segments]
    table = b"".join(_SEGMENT.pack(*row) for row in table_rows)
    table_frame = capped_compressor(level, len(table), None).compress(table)
    dictionary = _dictionary(_unread(base, table_rows))
    payload_frame = capped_compressor(level, len(payload), dictionary).compress(payload)
    header = _HEADER.pack(
        MAGIC,
        FORMAT_VERSION,
        0,
        len(base),
        len(target),
        hashlib.sha256(base).digest(),
        hashlib.sha256(target).digest(),
        len(segments),
        len(table_frame),
        len(payload),
        len(payload_frame),
    )
    return header + table_frame + payload_frame


def capped_compressor(level: int, size: int, dictionary: Any = None) -> zstandard.ZstdCompressor:
    """A zstd compressor for ``size`` bytes whose window agents accept (ZSTD_MAX_WINDOW_BYTES).

    With checksum and content size in the frame, as the registry writes its blobs.
    """
    params = zstandard.ZstdCompressionParameters.from_level(level, source_size=size)
    params = zstandard.ZstdCompressionParameters.from_level(
        level,
        source_size=size,
        window_log=min(params.window_log, _WINDOW_LOG),
        write_checksum=1,
        write_content_size=1,
    )
    return zstandard.ZstdCompressor(compression_params=params, dict_data=dictionary)


def read_header(delta: bytes | memoryview) -> DeltaHeader:
    """Parse and sanity-check the fixed header; raise :class:`DeltaError` if it is not one."""
    if len(delta) < HEADER_SIZE:
        raise DeltaError(DeltaFailure.CORRUPT, f"the delta is {len(delta)} bytes, shorter than its header")
    fields = _HEADER.unpack_from(delta, 0)
    if fields[0] != MAGIC:
        raise DeltaError(DeltaFailure.CORRUPT, "not a Modelfleet delta (wrong magic)")
    if fields[1] != FORMAT_VERSION:
        raise DeltaError(
            "unsupported", f"delta format version {fields[1]}; this agent reads {FORMAT_VERSION}"
        )
    header = DeltaHeader(fields[1], fields[3], fields[4], fields[5].hex(), fields[6].hex(), *fields[7:])
    if fields[2] != 0:
        raise DeltaError(DeltaFailure.UNSUPPORTED, f"delta flags {fields[2]:#x} are not understood")
    if header.segments > MAX_ENTRIES:
        raise DeltaError(DeltaFailure.CORRUPT, "the delta declares more table entries than the format allows")
    if header.payload_size > header.target_size:
        raise DeltaError(DeltaFailure.CORRUPT, "the delta's payload is larger than its target")
    if HEADER_SIZE + header.table_zsize + header.payload_zsize != len(delta):
        raise DeltaError(
            "corrupt",
            f"the delta is {len(delta)} bytes; its header describes "
            f"{HEADER_SIZE + header.table_zsize + header.payload_zsize}",
        )
    return header


_plain = threading.local()


def _plain_decompressor() -> zstandard.ZstdDecompressor:
    """One dictionary-less decompressor per thread: setting one up costs more than a small table."""
    if not hasattr(_plain, "decompressor"):
        _plain.decompressor = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW_BYTES)
    return _plain.decompressor


def _inflate(frame: memoryview, size: int, what: str, dictionary: Any = None) -> bytes:
    """Decompress one zstd frame that must hold exactly ``size`` bytes; never more."""
    try:
        declared = zstandard.get_frame_parameters(frame).content_size
        if declared != size:
            raise DeltaError(
                DeltaFailure.CORRUPT, f"the {what} frame holds {declared} bytes, the header says {size}"
            )
        if dictionary is None:
            decompressor = _plain_decompressor()
        else:
            decompressor = zstandard.ZstdDecompressor(
                dict_data=dictionary, max_window_size=ZSTD_MAX_WINDOW_BYTES
            )
        data = decompressor.decompress(frame, max_output_size=size)
    except zstandard.ZstdError as exc:
        raise DeltaError(DeltaFailure.CORRUPT, f"the {what} frame does not decompress: {exc}") from exc
    if len(data) != size:
        raise DeltaError(
            DeltaFailure.CORRUPT, f"the {what} frame holds {len(data)} bytes, the header says {size}"
        )
    return data


def _read_table(header: DeltaHeader, table: bytes) -> list[tuple[int, int, int, int]]:
    segments = list(_SEGMENT.iter_unpack(table))
    total = carried = 0
    for kind, width, offset, length in segments:
        total += length
        if kind == LITERAL:
            carried += length
        elif kind in (COPY, XOR):
            if length == 0 or offset + length > header.base_size:
                raise DeltaError(DeltaFailure.CORRUPT, "a delta segment reads past the end of the base")
            if kind == XOR:
                if width not in _WIDTHS or length % width:
                    raise DeltaError(DeltaFailure.CORRUPT, f"a delta XOR segment has element width {width}")
                carried += length
        else:
            raise DeltaError(DeltaFailure.CORRUPT, f"unknown delta segment kind {kind}")
    if total != header.target_size or carried != header.payload_size:
        raise DeltaError(DeltaFailure.CORRUPT, "the delta's segments do not add up to its target")
    return segments


def apply_delta(
    base: bytes | memoryview, delta: bytes | memoryview, *, max_output: int, base_sha256: str | None = None
) -> bytearray:
    """Rebuild the target from ``base``; raise :class:`DeltaError` (with a reason code) if not.

    Returns the bytes it built (a bytearray, not copied once more into ``bytes``).

    The result is checked against the target sha256 that the delta names; the agent must
    still compare that with the *target's* signed manifest. ``base_sha256`` is the base's
    sha256 when the caller already verified it (the agent's store keeps it from the base's
    manifest); without it the base is hashed here. Nothing larger than ``max_output`` (plus
    a table of at most ``MAX_ENTRIES`` entries) is ever allocated.
    """
    delta = memoryview(delta)
    header = read_header(delta)
    if header.target_size > max_output:
        raise DeltaError(
            "too_large", f"the delta rebuilds {header.target_size} bytes, more than the {max_output} allowed"
        )
    if len(base) != header.base_size:
        raise DeltaError(
            "wrong_base", f"the delta needs a {header.base_size}-byte base, not {len(base)} bytes"
        )
    have = base_sha256 if base_sha256 is not None else hashlib.sha256(base).hexdigest()
    if have != header.base_sha256:
        raise DeltaError(
            "wrong_base", f"the delta was made from base sha256 {header.base_sha256}, not {have}"
        )
    table_end = HEADER_SIZE + header.table_zsize
    table = _inflate(delta[HEADER_SIZE:table_end], header.segments * _SEGMENT.size, "table")
    segments = _read_table(header, table)
    dictionary = _dictionary(_unread(base, segments))
    payload = memoryview(_inflate(delta[table_end:], header.payload_size, "payload", dictionary))
    # Written in place: each byte of the target is copied once.
    base_view, out, position, taken = memoryview(base), bytearray(header.target_size), 0, 0
    out_view = memoryview(out)
    for kind, width, offset, length in segments:
        end = position + length
        if kind == COPY:
            out_view[position:end] = base_view[offset : offset + length]
        elif kind == LITERAL:
            out_view[position:end] = payload[taken : taken + length]
            taken += length
        else:
            shuffled, old = payload[taken : taken + length], base_view[offset : offset + length]
            _unshuffle_xor_into(np.frombuffer(out_view[position:end], np.uint8), shuffled, old, width)
            taken += length
        position = end
    if hashlib.sha256(out).hexdigest() != header.target_sha256:
        raise DeltaError(
            DeltaFailure.TARGET_MISMATCH, f"the rebuilt model's sha256 is not {header.target_sha256}"
        )
    return out
