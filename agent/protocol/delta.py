"""Tensor-level delta between two TFLite models (issue 12 §1; docs/protocol.md, addition 9).

Codec only: the registry does not publish deltas yet and desired states do not offer them.

A retrained model keeps most of its weight buffers byte for byte. :func:`make_delta` splits
both flatbuffers into weight buffers (``Model.buffers``: the inline ``data`` vectors, or the
``offset``/``size`` ranges of the "large model" layout whose data follows the flatbuffer) and
everything else, the *skeleton*. The target is written as a list of segments:

* ``COPY`` a base buffer whose bytes equal the target buffer's (matched by content hash, so a
  buffer that moved to another index is still found);
* ``SUB`` / ``XOR`` a changed buffer as (target - base per element, mod 2**(8 x width)) or
  (target XOR base) against the base buffer of the same index and size, its bytes regrouped
  by position within the element ("byte shuffle": all high bytes of a tensor together), so
  that int8 values re-quantized a few steps away (SUB) or slightly moved floats (XOR) become
  long runs of zeros and small numbers; the smallest under zstd wins, plain bytes included;
* ``LITERAL`` bytes stored whole: the skeleton between buffers, and changed buffers. A
  changed skeleton stretch (a re-quantized layer's new scales) with a same-length base
  counterpart is SUB or XOR against it instead, when that is smaller.

The literal and transformed bytes travel in one payload whose zstd dictionary is the base
bytes that no segment reads (the base's skeleton, mostly), so an unchanged skeleton costs
a few bytes and a changed one is stored whole, compressed.
:func:`apply_delta` needs no flatbuffer parser: segments name byte ranges of the base, and
unchanged skeleton bytes next to copied buffers are copied with them, so an unchanged run of
buffers is one segment. Every size is checked before anything is allocated, zstd never
inflates past a size known in advance, and the result is compared with the target's sha256,
so a corrupt or hostile delta fails with :class:`DeltaError`.

Layout (format 2; sizes are LEB128 varints, so a small model's header is ~25 bytes)::

    header   magic "MFDL" · version u8 (2) · flags u8 · base size · target size · segments
             · table size as stored · [table size, with FLAG_TABLE_ZSTD] · payload size
             · [payload size as stored, with FLAG_PAYLOAD_ZSTD]
             · base sha256 [32] + target sha256 [32] with FLAG_HASHES, else base sha256 [:8]
    table    per segment, in target order: kind | width code << 3 (u8), then for COPY/XOR/SUB
             the base offset minus the target position (zigzag varint), then the length
             (varint); stored, or one zstd frame
    payload  the LITERAL and (shuffled) XOR/SUB bytes in target order; stored, or one zstd
             frame whose dictionary is the base bytes no COPY/XOR/SUB segment reads
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

MAGIC = b"MFDL"
FORMAT_VERSION = 2
_OLD_MAGIC = b"MFDELTA1"  # format 1 (120-byte fixed header), refused as unsupported
# Header flags (docs/protocol.md, addition 9).
FLAG_HASHES = 1  # the full base and target sha256 follow; else only the base's first 8 bytes
FLAG_TABLE_ZSTD = 2  # the table is a zstd frame; else stored
FLAG_PAYLOAD_ZSTD = 4  # the payload is a zstd frame (dictionary: the unread base); else stored
_FLAGS = FLAG_HASHES | FLAG_TABLE_ZSTD | FLAG_PAYLOAD_ZSTD
_BASE_PREFIX = 8  # bytes of the base's sha256 a delta without FLAG_HASHES names
_MAX_VARINT = 10  # LEB128 of a u64
# The longest header: magic, version, flags, seven varints, both sha256. read_header needs at
# most this many bytes; a delta without FLAG_HASHES and with small sizes has a ~20-byte header.
HEADER_SIZE = len(MAGIC) + 2 + 7 * _MAX_VARINT + 64
# TFLite models have hundreds, at most a few thousand buffers. The cap bounds the table a
# delta can make the agent read (2**16 rows of at most 21 bytes = 1.3 MiB) whatever it says.
MAX_ENTRIES = 1 << 16
_MAX_ROW = 1 + 2 * _MAX_VARINT
LITERAL, COPY, XOR, SUB = 0, 1, 2, 3
_WIDTHS = (1, 2, 4, 8)
_WINDOW_LOG = ZSTD_MAX_WINDOW_BYTES.bit_length() - 1
# Level used only to choose a buffer's transform; the frames use ``level``.
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
    base_sha256: str  # hex: the whole digest with FLAG_HASHES, else its first 8 bytes
    target_sha256: str | None  # hex, or None when the delta leaves it to the signed manifest
    segments: int
    table_zsize: int  # bytes of the table as stored
    payload_size: int
    payload_zsize: int  # bytes of the payload as stored
    table_size: int = 0  # bytes of the table once decompressed
    flags: int = 0
    header_size: int = 0  # bytes of this header in the delta


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


def _transformed(kind: int, new: memoryview, old: memoryview, width: int) -> bytes:
    """XOR or SUB (target - base per element, mod 2**(8 x width)), bytes shuffled by position.

    Regrouping the bytes by their position in the element puts the unchanged high bytes of
    slightly moved values together, as long zero runs.
    """
    unsigned = np.dtype(f"<u{width}")
    a, b = np.frombuffer(new, unsigned), np.frombuffer(old, unsigned)
    changed = np.bitwise_xor(a, b) if kind == XOR else np.subtract(a, b)
    return changed.view(np.uint8).reshape(-1, width).T.tobytes()


_UNSIGNED = {width: np.dtype(f"<u{width}") for width in _WIDTHS}


def _untransform_into(out: memoryview, kind: int, shuffled: memoryview, old: memoryview, width: int) -> None:
    """Undo :func:`_transformed` into ``out``: one plane per byte position, then XOR or add."""
    if width == 1:
        elements = np.frombuffer(out, np.uint8)
        changes = np.frombuffer(shuffled, np.uint8)
    else:
        columns = np.frombuffer(out, np.uint8).reshape(-1, width)
        planes = np.frombuffer(shuffled, np.uint8).reshape(width, -1)
        for position in range(width):  # column by column: far faster than a transposed copy
            columns[:, position] = planes[position]
        elements = changes = np.frombuffer(out, _UNSIGNED[width])
    ufunc = np.bitwise_xor if kind == XOR else np.add  # unsigned add wraps mod 2**(8 x width)
    ufunc(changes, np.frombuffer(old, _UNSIGNED[width]), out=elements)


def _untransform_bytewise(out: memoryview, base: memoryview, pieces: list[tuple[int, int, int, int]]) -> None:
    """Undo the width-1 XOR and SUB ``pieces`` (kind, position, base offset, length) at once.

    Their changes are already in ``out``. The base bytes they need are laid out at the same
    positions in one buffer per kind, then one numpy call per kind finishes the lot: a model
    with dozens of re-quantized int8 tensors costs two calls, not dozens. Scattered pieces
    (the span is mostly bytes that are not theirs) are done one by one instead.
    """
    low = min(position for _, position, _, _ in pieces)
    high = max(position + length for _, position, _, length in pieces)
    if high - low > 4 * sum(length for _, _, _, length in pieces):
        for kind, position, offset, length in pieces:
            piece = out[position : position + length]
            _untransform_into(piece, kind, piece, base[offset : offset + length], 1)
        return
    for kind in (XOR, SUB):
        olds = bytearray(high - low)
        used = False
        for piece_kind, position, offset, length in pieces:
            if piece_kind == kind:
                olds[position - low : position - low + length] = base[offset : offset + length]
                used = True
        if used:
            span = np.frombuffer(out[low:high], np.uint8)
            (np.bitwise_xor if kind == XOR else np.add)(span, np.frombuffer(olds, np.uint8), out=span)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _read_varint(data: bytes | memoryview, position: int) -> tuple[int, int]:
    """(value, next position) of the LEB128 varint at ``position``; corrupt if cut or over 64 bits."""
    if position < len(data) and data[position] < 0x80:
        return data[position], position + 1  # the common case: one byte
    value = shift = 0
    for index in range(position, min(position + _MAX_VARINT, len(data))):
        byte = data[index]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if value >= 1 << 64:
                break
            return value, index + 1
        shift += 7
    raise DeltaError(DeltaFailure.CORRUPT, "the delta is cut short or holds a malformed size")


def _zigzag(value: int) -> int:
    return value * 2 if value >= 0 else -value * 2 - 1


def _unzigzag(value: int) -> int:
    return value // 2 if value % 2 == 0 else -(value + 1) // 2


def _encode_table(segments: list[list[int]]) -> bytes:
    """Rows: kind | width code << 3, then for COPY/XOR/SUB the base offset minus the target
    position (zigzag: 0 when the layout is the same), then the length; varints."""
    rows = bytearray()
    for kind, width, offset, length, start in segments:
        rows.append(kind | _WIDTHS.index(width) << 3)
        if kind != LITERAL:
            rows += _varint(_zigzag(offset - start))
        rows += _varint(length)
    return bytes(rows)


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


def _transform_skeleton(
    segments: list[list[int]],
    base: memoryview,
    target: memoryview,
    chooser: zstandard.ZstdCompressor,
    transformed: dict[int, bytes],
) -> None:
    """Turn a changed stretch of skeleton into SUB or XOR against the base bytes in its place.

    A re-quantized layer changes its scales, float32 vectors of the flatbuffer: the stretch
    between two copies differs in a few bytes, and its base counterpart (the bytes right
    after the previous segment's base range) has the same length. Byte for byte (width 1)
    the unchanged bytes become zeros. Kept only when zstd makes it smaller than the plain bytes.
    """
    for i, segment in enumerate(segments):
        kind, _, _, length, start = segment
        if kind != LITERAL or i == 0 or segments[i - 1][0] == LITERAL:
            continue
        before = segments[i - 1]
        base_start = before[2] + before[3]
        if base_start + length > len(base):
            continue
        data, old = target[start : start + length], base[base_start : base_start + length]
        best, best_size = None, len(chooser.compress(data))
        for candidate_kind in (SUB, XOR):
            candidate = _transformed(candidate_kind, data, old, 1)
            if (size := len(chooser.compress(candidate))) < best_size:
                best, best_size, transformed[start] = candidate_kind, size, candidate
        if best is not None:
            segment[0], segment[2] = best, base_start


# A copy this short between two byte-wise XOR (or SUB) segments joins them as zeros: a few
# bytes of zstd instead of a table row and an apply step.
_MERGE_GAP = 4096


def _merge_bytewise(segments: list[list[int]], transformed: dict[int, bytes]) -> list[list[int]]:
    """Join width-1 XOR (or SUB) segments that follow each other in the base and the target.

    A re-quantized or fine-tuned int8 model changes tensor after tensor, with a few unchanged
    skeleton bytes between: one segment instead of dozens keeps the table and the apply
    loop short. Width 1 has no shuffle, so the joined bytes are the pieces one after another
    (an unchanged stretch: zeros).
    """

    def bytewise(segment: list[int] | None) -> bool:
        return segment is not None and segment[0] in (XOR, SUB) and segment[1] == 1

    def follows(first: list[int], second: list[int]) -> bool:
        return first[2] + first[3] == second[2]

    for i in range(1, len(segments) - 1):
        before, gap, after = segments[i - 1], segments[i], segments[i + 1]
        joins = bytewise(before) and bytewise(after) and before[0] == after[0]
        if joins and gap[0] == COPY and gap[3] <= _MERGE_GAP and follows(before, gap) and follows(gap, after):
            gap[:2] = [before[0], 1]
            transformed[gap[4]] = bytes(gap[3])
    merged: list[list[int]] = []
    parts: dict[int, list[bytes]] = {}
    for segment in segments:
        last = merged[-1] if merged else None
        if bytewise(segment) and bytewise(last) and last[0] == segment[0] and follows(last, segment):
            last[3] += segment[3]
            parts[last[4]].append(transformed.pop(segment[4]))
            continue
        merged.append(segment)
        if bytewise(segment):
            parts[segment[4]] = [transformed[segment[4]]]
    for start, pieces in parts.items():
        transformed[start] = b"".join(pieces)
    return merged


def make_delta(base: bytes, target: bytes, *, level: int = 19, embed_hashes: bool = True) -> bytes:
    """A delta that rebuilds ``target`` from ``base``; both must be TFLite models.

    ``embed_hashes=False`` leaves the full base and target sha256 out of the delta (56 bytes
    less): for a delta whose signed manifest names both, the caller of :func:`apply_delta`
    then passes them. Raises :class:`DeltaRefused` when either is not a TFLite flatbuffer
    the format can describe; the registry then ships the full blob only.
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
    transformed: dict[int, bytes] = {}  # target offset -> shuffled XOR or SUB of that buffer
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
        best, best_size, best_bytes = LITERAL, len(chooser.compress(data)), b""
        if old is not None and old.length == buffer.length and old.shape == buffer.shape:
            old_data = base_view[old.offset : old.offset + old.length]
            # SUB suits values that moved by small amounts (re-quantized int8, int32 biases);
            # XOR suits floats that moved within their exponent. The smaller one wins.
            for kind in (SUB, XOR):
                candidate = _transformed(kind, data, old_data, buffer.width)
                if (candidate_size := len(chooser.compress(candidate))) < best_size:
                    best, best_size, best_bytes = kind, candidate_size, candidate
        if best == LITERAL:
            segments.append([LITERAL, 1, 0, buffer.length, buffer.offset])
        else:
            segments.append([best, buffer.width, old.offset, buffer.length, buffer.offset])
            transformed[buffer.offset] = best_bytes
    if len(target) > cursor:
        segments.append([LITERAL, 1, 0, len(target) - cursor, cursor])
    segments = _extend_copies(segments, np.frombuffer(base, np.uint8), np.frombuffer(target, np.uint8))
    _transform_skeleton(segments, base_view, target_view, chooser, transformed)
    segments = _merge_bytewise(segments, transformed)
    if len(segments) > MAX_ENTRIES:
        raise DeltaRefused(f"{len(segments)} segments: more than the {MAX_ENTRIES} the format allows")

    payload = b"".join(
        transformed[start] if kind in (XOR, SUB) else target_view[start : start + length]
        for kind, _, _, length, start in segments
        if kind != COPY
    )
    flags = FLAG_HASHES if embed_hashes else 0
    table = _encode_table(segments)
    stored_table = table
    table_frame = capped_compressor(level, len(table)).compress(table)
    if len(table_frame) < len(table):
        flags, stored_table = flags | FLAG_TABLE_ZSTD, table_frame
    stored_payload = payload
    if payload:
        dictionary = _dictionary(_unread(base, [tuple(segment[:4]) for segment in segments]))
        payload_frame = capped_compressor(level, len(payload), dictionary).compress(payload)
        if len(payload_frame) < len(payload):
            flags, stored_payload = flags | FLAG_PAYLOAD_ZSTD, payload_frame
    sizes = [len(base), len(target), len(segments), len(stored_table)]
    sizes += [len(table)] if flags & FLAG_TABLE_ZSTD else []
    sizes += [len(payload)] + ([len(stored_payload)] if flags & FLAG_PAYLOAD_ZSTD else [])
    base_sha256 = hashlib.sha256(base).digest()
    digests = base_sha256 + hashlib.sha256(target).digest() if embed_hashes else base_sha256[:_BASE_PREFIX]
    header = MAGIC + bytes([FORMAT_VERSION, flags]) + b"".join(map(_varint, sizes)) + digests
    return header + stored_table + stored_payload


def capped_compressor(
    level: int, size: int, dictionary: Any = None, *, checksum: bool = True
) -> zstandard.ZstdCompressor:
    """A zstd compressor for ``size`` bytes whose window agents accept (ZSTD_MAX_WINDOW_BYTES).

    With content size in the frame, and a checksum as the registry writes its blobs. (The
    delta's frames carry none: the rebuilt target's sha256 is checked anyway.)
    """
    params = zstandard.ZstdCompressionParameters.from_level(level, source_size=size)
    params = zstandard.ZstdCompressionParameters.from_level(
        level,
        source_size=size,
        window_log=min(params.window_log, _WINDOW_LOG),
        write_checksum=int(checksum),
        write_content_size=1,
    )
    return zstandard.ZstdCompressor(compression_params=params, dict_data=dictionary)


def read_header(delta: bytes | memoryview) -> DeltaHeader:
    """Parse and sanity-check the header; raise :class:`DeltaError` if it is not one."""
    delta = memoryview(delta)
    if bytes(delta[: len(_OLD_MAGIC)]) == _OLD_MAGIC:
        raise DeltaError(
            DeltaFailure.UNSUPPORTED, f"delta format version 1; this agent reads {FORMAT_VERSION}"
        )
    if len(delta) < len(MAGIC) + 2 or bytes(delta[: len(MAGIC)]) != MAGIC:
        raise DeltaError(DeltaFailure.CORRUPT, "not a Modelfleet delta (wrong magic)")
    version, flags = delta[len(MAGIC)], delta[len(MAGIC) + 1]
    if version != FORMAT_VERSION:
        raise DeltaError(
            DeltaFailure.UNSUPPORTED, f"delta format version {version}; this agent reads {FORMAT_VERSION}"
        )
    if flags & ~_FLAGS:
        raise DeltaError(DeltaFailure.UNSUPPORTED, f"delta flags {flags:#x} are not understood")
    position, sizes = len(MAGIC) + 2, []
    for _ in range(4 + bool(flags & FLAG_TABLE_ZSTD) + 1 + bool(flags & FLAG_PAYLOAD_ZSTD)):
        value, position = _read_varint(delta, position)
        sizes.append(value)
    base_size, target_size, segments, table_zsize = sizes[:4]
    table_size = sizes[4] if flags & FLAG_TABLE_ZSTD else table_zsize
    payload_size = sizes[-2] if flags & FLAG_PAYLOAD_ZSTD else sizes[-1]
    payload_zsize = sizes[-1]
    digest_size = 64 if flags & FLAG_HASHES else _BASE_PREFIX
    if len(delta) < position + digest_size:
        raise DeltaError(DeltaFailure.CORRUPT, f"the delta is {len(delta)} bytes, shorter than its header")
    digests = bytes(delta[position : position + digest_size])
    position += digest_size
    header = DeltaHeader(
        version=version,
        base_size=base_size,
        target_size=target_size,
        base_sha256=digests[:32].hex() if flags & FLAG_HASHES else digests.hex(),
        target_sha256=digests[32:].hex() if flags & FLAG_HASHES else None,
        segments=segments,
        table_zsize=table_zsize,
        payload_size=payload_size,
        payload_zsize=payload_zsize,
        table_size=table_size,
        flags=flags,
        header_size=position,
    )
    if segments > MAX_ENTRIES or table_size > segments * _MAX_ROW:
        raise DeltaError(DeltaFailure.CORRUPT, "the delta declares more table entries than the format allows")
    if payload_size > target_size:
        raise DeltaError(DeltaFailure.CORRUPT, "the delta's payload is larger than its target")
    if position + table_zsize + payload_zsize != len(delta):
        raise DeltaError(
            DeltaFailure.CORRUPT,
            f"the delta is {len(delta)} bytes; its header describes {position + table_zsize + payload_zsize}",
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
    """The segments as (kind, width, base offset, length), each checked against the sizes.

    Written for speed (it runs on every apply): one-byte varints, the usual case, inline.
    """
    segments: list[tuple[int, int, int, int]] = []
    position = total = carried = 0
    size, base_size = len(table), header.base_size
    for _ in range(header.segments):
        if position >= size:
            raise DeltaError(DeltaFailure.CORRUPT, "the delta's table is cut short")
        code = table[position]
        kind, width_code, position = code & 7, code >> 3, position + 1
        if kind > SUB or width_code >= len(_WIDTHS):
            raise DeltaError(DeltaFailure.CORRUPT, f"unknown delta segment {code:#x}")
        offset = 0
        if kind != LITERAL:
            if position < size and table[position] < 0x80:
                shift, position = table[position], position + 1
            else:
                shift, position = _read_varint(table, position)
            offset = total + (shift >> 1 if not shift & 1 else -((shift + 1) >> 1))
        if position < size and table[position] < 0x80:
            length, position = table[position], position + 1
        else:
            length, position = _read_varint(table, position)
        if kind != COPY:
            carried += length
        if kind != LITERAL:
            width = _WIDTHS[width_code]
            if length == 0 or offset < 0 or offset + length > base_size or length % width:
                raise DeltaError(
                    DeltaFailure.CORRUPT, "a delta segment reads outside the base or splits elements"
                )
        total += length
        segments.append((kind, _WIDTHS[width_code], offset, length))
    if position != size or total != header.target_size or carried != header.payload_size:
        raise DeltaError(DeltaFailure.CORRUPT, "the delta's segments do not add up to its target")
    return segments


def apply_delta(
    base: bytes | memoryview,
    delta: bytes | memoryview,
    *,
    max_output: int,
    base_sha256: str | None = None,
    target_sha256: str | None = None,
) -> bytearray:
    """Rebuild the target from ``base``; raise :class:`DeltaError` (with a reason code) if not.

    Returns the bytes it built (a bytearray, not copied once more into ``bytes``).

    The result must hash to the target sha256: the one the delta names, and ``target_sha256``
    when given (the *target's* signed manifest's; required for a delta made without embedded
    hashes). ``base_sha256`` is the base's sha256 when the caller already verified it (the
    agent's store keeps it from the base's manifest); without it the base is hashed here.
    Nothing larger than ``max_output`` (plus a table of at most ``MAX_ENTRIES`` rows) is
    ever allocated.
    """
    delta = memoryview(delta)
    header = read_header(delta)
    expected_target = header.target_sha256 or target_sha256
    if expected_target is None:
        raise DeltaError(
            DeltaFailure.UNSUPPORTED,
            "the delta names no target sha256: pass the one from the target's signed manifest",
        )
    if target_sha256 is not None and target_sha256 != expected_target:
        raise DeltaError(
            DeltaFailure.TARGET_MISMATCH, f"the delta rebuilds sha256 {expected_target}, not {target_sha256}"
        )
    if header.target_size > max_output:
        raise DeltaError(
            DeltaFailure.TOO_LARGE,
            f"the delta rebuilds {header.target_size} bytes, more than the {max_output} allowed",
        )
    if len(base) != header.base_size:
        raise DeltaError(
            DeltaFailure.WRONG_BASE, f"the delta needs a {header.base_size}-byte base, not {len(base)} bytes"
        )
    have = base_sha256 if base_sha256 is not None else hashlib.sha256(base).hexdigest()
    if have[: len(header.base_sha256)] != header.base_sha256:
        raise DeltaError(
            DeltaFailure.WRONG_BASE, f"the delta was made from base sha256 {header.base_sha256}, not {have}"
        )
    table_start = header.header_size
    table_end = table_start + header.table_zsize
    table = delta[table_start:table_end]
    if header.flags & FLAG_TABLE_ZSTD:
        table = memoryview(_inflate(table, header.table_size, "table"))
    segments = _read_table(header, bytes(table))
    payload = delta[table_end:]
    if header.flags & FLAG_PAYLOAD_ZSTD:
        dictionary = _dictionary(_unread(base, segments))
        payload = memoryview(_inflate(payload, header.payload_size, "payload", dictionary))
    # Written in place: each byte of the target is copied once.
    base_view, out, position, taken = memoryview(base), bytearray(header.target_size), 0, 0
    out_view = memoryview(out)
    bytewise: list[tuple[int, int, int, int]] = []
    for kind, width, offset, length in segments:
        end = position + length
        if kind == COPY:
            out_view[position:end] = base_view[offset : offset + length]
        elif kind == LITERAL or width == 1:
            out_view[position:end] = payload[taken : taken + length]
            taken += length
            if kind != LITERAL:
                bytewise.append((kind, position, offset, length))
        else:
            old = base_view[offset : offset + length]
            _untransform_into(out_view[position:end], kind, payload[taken : taken + length], old, width)
            taken += length
        position = end
    if bytewise:
        _untransform_bytewise(out_view, base_view, bytewise)
    if hashlib.sha256(out).hexdigest() != expected_target:
        raise DeltaError(DeltaFailure.TARGET_MISMATCH, f"the rebuilt model's sha256 is not {expected_target}")
    return out
