"""Inspect a .tflite flatbuffer with the TFLite schema that ships inside LiteRT.

Uses the generated read-only accessors (lazy, zero-copy over an mmap) rather than the
object API, so a 100 MB model is inspected without copying its weights. Every offset
the file declares is checked against its length, which is how a truncated upload is told
apart from a merely odd one.
"""

from __future__ import annotations

import mmap
import re
import struct
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from ai_edge_litert import schema_py_generated as schema

from agent.protocol.schemas import RUNTIME_VERSION_PATTERN

FILE_IDENTIFIER = b"TFL3"
# A runtime version as devices and converters write it: "2.18.0", "2.3", "1.0.1rc1".
RUNTIME_VERSION = re.compile(RUNTIME_VERSION_PATTERN)


@dataclass
class InvalidModel(Exception):
    code: str  # not_flatbuffer | wrong_identifier | truncated | malformed_tflite | tensor_too_large
    message: str

    def __str__(self) -> str:
        return self.message


@cache
def _enum_names(enum_class: type) -> dict[int, str]:
    return {v: k for k, v in vars(enum_class).items() if not k.startswith("_") and isinstance(v, int)}


def _dtype_name(tensor_type: int) -> str:
    return _enum_names(schema.TensorType).get(tensor_type, f"type_{tensor_type}").lower()


def _op_name(code: Any) -> str:
    # DeprecatedBuiltinCode holds codes < 127; BuiltinCode the rest (schema comment).
    builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
    if builtin == schema.BuiltinOperator.CUSTOM:
        custom = code.CustomCode()
        return f"CUSTOM:{custom.decode('utf-8', 'replace') if custom else '?'}"
    return _enum_names(schema.BuiltinOperator).get(builtin, f"OP_{builtin}")


def _op_versions(model: Any) -> dict[str, int]:
    """Each op the model uses with the highest version it uses it at (an op's version grows
    when it gains a feature, e.g. int8 inputs; an older runtime lacks the newer kernels)."""
    versions: dict[str, int] = {}
    for i in range(model.OperatorCodesLength()):
        code = model.OperatorCodes(i)
        name = _op_name(code)
        versions[name] = max(versions.get(name, 0), int(code.Version()))
    return dict(sorted(versions.items()))


def _min_runtime(model: Any) -> str | None:
    """The TFLite runtime the converter says the model needs: the ``min_runtime_version``
    metadata it computes from the op codes and their versions (TensorFlow's
    runtime_version.cc). None when the file does not say (hand-built models)."""
    for i in range(model.MetadataLength()):
        entry = model.Metadata(i)
        if entry.Name() != b"min_runtime_version" or entry.Buffer() >= model.BuffersLength():
            continue
        buffer = model.Buffers(entry.Buffer())
        offset = buffer._tab.Offset(4)  # Buffer.data; slices of the mmap copy (no view kept open)
        if not offset:
            return None
        start = buffer._tab.Vector(offset)
        data = bytes(buffer._tab.Bytes[start : start + buffer._tab.VectorLen(offset)])
        text = data.split(b"\0", 1)[0].decode("ascii", "replace").strip()
        return text if RUNTIME_VERSION.fullmatch(text) else None
    return None


def _tensor_description(tensor: Any) -> dict[str, Any]:
    name = tensor.Name()
    return {
        "name": name.decode("utf-8", "replace") if name else "",
        "shape": [int(d) for d in tensor.ShapeAsNumpy()] if tensor.ShapeLength() else [],
        "dtype": _dtype_name(tensor.Type()),
    }


def _check_vector_in_bounds(table: Any, field_offset: int, element_size: int, size: int, what: str) -> None:
    offset = table._tab.Offset(field_offset)
    if not offset:
        return
    start = table._tab.Vector(offset)
    end = start + table._tab.VectorLen(offset) * element_size
    if end > size:
        raise InvalidModel("truncated", f"{what} runs past the end of the file ({end} > {size} bytes)")


def _quantization(model: Any, subgraph: Any) -> str:
    """int8 / uint8 / float16 when the constant (weight) tensors use that type, else none."""
    weight_types = set()
    for i in range(subgraph.TensorsLength()):
        tensor = subgraph.Tensors(i)
        buffer_index = tensor.Buffer()
        if buffer_index and buffer_index < model.BuffersLength():
            buffer = model.Buffers(buffer_index)
            if buffer.DataLength() or buffer.Size():
                weight_types.add(_dtype_name(tensor.Type()))
    for name in ("int8", "uint8", "int4", "float16"):
        if name in weight_types:
            return name
    return "none"


def _parse(buf: Any, size: int) -> dict[str, Any]:
    model = schema.Model.GetRootAs(buf, 0)
    if model.SubgraphsLength() < 1:
        raise InvalidModel("malformed_tflite", "the model has no subgraph")
    for i in range(model.BuffersLength()):
        buffer = model.Buffers(i)
        _check_vector_in_bounds(buffer, 4, 1, size, f"buffer {i}")
        if buffer.Offset() and buffer.Offset() + buffer.Size() > size:
            raise InvalidModel("truncated", f"buffer {i} lies past the end of the file")
    subgraph = model.Subgraphs(0)
    tensors = subgraph.TensorsLength()
    for index_list, what in ((subgraph.InputsAsNumpy(), "input"), (subgraph.OutputsAsNumpy(), "output")):
        if not hasattr(index_list, "__len__") or len(index_list) == 0:
            raise InvalidModel("malformed_tflite", f"the main subgraph declares no {what}")
        if any(not 0 <= int(t) < tensors for t in index_list):
            raise InvalidModel("malformed_tflite", f"an {what} names a tensor that does not exist")
    op_versions = _op_versions(model)
    description = model.Description()
    return {
        "schema_version": int(model.Version()),
        "description": description.decode("utf-8", "replace") if description else "",
        "subgraphs": int(model.SubgraphsLength()),
        "inputs": [_tensor_description(subgraph.Tensors(int(t))) for t in subgraph.InputsAsNumpy()],
        "outputs": [_tensor_description(subgraph.Tensors(int(t))) for t in subgraph.OutputsAsNumpy()],
        "ops": list(op_versions),
        "op_versions": op_versions,
        "min_runtime": _min_runtime(model),
        "quantization": _quantization(model, subgraph),
        "tensors": int(tensors),
        "operators": int(subgraph.OperatorsLength()),
    }


def check_header(head: bytes, *, size: int) -> None:
    """Check the first 8 bytes of a file of ``size`` bytes: a root offset inside the file and
    the TFLite file identifier. Cheap and parses nothing, so the web request can afford it."""
    if size < 8 or len(head) < 8:
        raise InvalidModel("not_flatbuffer", f"the file is {size} bytes, too short to be a flatbuffer")
    (root_offset,) = struct.unpack_from("<I", head, 0)
    if root_offset < 8 or root_offset + 4 > size or root_offset % 4:
        raise InvalidModel("not_flatbuffer", "the file does not start with a flatbuffer root offset")
    if bytes(head[4:8]) != FILE_IDENTIFIER:
        raise InvalidModel(
            "wrong_identifier",
            f"file identifier is {bytes(head[4:8])!r}, a TFLite model has {FILE_IDENTIFIER!r}",
        )


def inspect_buffer(buf: Any) -> dict[str, Any]:
    """Describe a TFLite flatbuffer held in ``buf`` (bytes or mmap); raise :class:`InvalidModel`."""
    size = len(buf)
    check_header(bytes(buf[:8]), size=size)
    try:
        return _parse(buf, size)
    except InvalidModel:
        raise
    except (IndexError, struct.error, ValueError, TypeError) as exc:
        # The accessors read past the end (or across garbage): the file was cut short or
        # the bytes are not a TFLite model after all.
        raise InvalidModel(
            "truncated",
            f"the flatbuffer is cut short or corrupt: an offset or length points outside the file ({exc})",
        ) from exc


def inspect_file(path: str | Path) -> dict[str, Any]:
    with open(path, "rb") as handle:
        if handle.seek(0, 2) == 0:
            raise InvalidModel("not_flatbuffer", "the file is empty")
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return inspect_buffer(buf)


# Bytes per element; 4-bit and 2-bit types round up to a byte, which over-counts safely.
_ELEMENT_BYTES = {"float64": 8, "int64": 8, "uint64": 8, "complex64": 8, "complex128": 16}
_ELEMENT_BYTES |= dict.fromkeys(("float32", "int32", "uint32"), 4)
_ELEMENT_BYTES |= dict.fromkeys(("float16", "bfloat16", "int16", "uint16"), 2)


def _tensor_bytes(tensor: Any) -> int:
    elements = 1
    for dim in tensor.ShapeAsNumpy() if tensor.ShapeLength() else []:
        elements *= max(int(dim), 1)  # -1 (dynamic) counts as 1: LiteRT resizes it at run time
    return elements * _ELEMENT_BYTES.get(_dtype_name(tensor.Type()), 1)


def check_tensor_sizes(path: str | Path, *, max_bytes: int) -> None:
    """Refuse a model whose tensors declare more memory than ``max_bytes``.

    A shape is only a few bytes in the file, so a small upload can ask LiteRT for gigabytes.
    The sandbox's memory limit would stop it anyway; this says why, in words. Call it after
    :func:`inspect_file` accepted the file (offsets are known to be in range).
    """
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        model = schema.Model.GetRootAs(buf, 0)
        for s in range(model.SubgraphsLength()):
            subgraph, total = model.Subgraphs(s), 0
            for i in range(subgraph.TensorsLength()):
                tensor = subgraph.Tensors(i)
                size = _tensor_bytes(tensor)
                total += size
                if size > max_bytes:
                    description = _tensor_description(tensor)
                    raise InvalidModel(
                        "tensor_too_large",
                        f"tensor {description['name']!r} declares shape {description['shape']} "
                        f"{description['dtype']}, {size / 2**30:.1f} GiB: more than the "
                        f"{max_bytes / 2**30:.1f} GiB a model may use here",
                    )
            if total > max_bytes:
                raise InvalidModel(
                    "tensor_too_large",
                    f"the tensors of subgraph {s} declare {total / 2**30:.1f} GiB in all: more than the "
                    f"{max_bytes / 2**30:.1f} GiB a model may use here",
                )
