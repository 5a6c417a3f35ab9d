"""A GGUF file's header (metadata and tensor table), parsed without decoding what nobody asks for.

``gguf.GGUFReader`` builds a numpy view for every element of every metadata array when it opens a file: for a
262k-token vocabulary (Gemma 3) that is millions of small arrays, seconds of CPU before the first question is
answered, paid again by every process that opens the file. :func:`read_header` walks the same bytes once with
``struct`` over a memory map: scalars and strings are decoded, arrays are kept as where they lie (their
element type, count and offset) and decoded when a value is asked for (numeric arrays as one numpy view, string
arrays in one pass over their bytes). Only the walk over a string array's lengths is unavoidable, as the
format stores no index. Headers are cached per file (resolved path, size, modification time) within the
process, so a file opened again (the CLI's precheck, then the engine; the onboarding gates) is parsed once.

The layout is GGUF v2/v3's (``ggml/docs/gguf.md``); the value and tensor type ids and block sizes come from
the ``gguf`` package, and each tensor's data is the same read-only view of the map that ``GGUFReader`` gives
(values typed for float/int tensors, raw block bytes otherwise), so ``gguf.quants.dequantize`` reads it.
Big-endian files (written for s390x) are refused by name.
"""

from __future__ import annotations

import collections
import mmap
import struct
import threading
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType, GGUFValueType
from gguf.quants import quant_shape_to_byte_shape

V = GGUFValueType
# Fixed-size value types: their struct format (one value) and numpy dtype (an array of them), little-endian.
_STRUCT = {V.UINT8: "<B", V.INT8: "<b", V.UINT16: "<H", V.INT16: "<h", V.UINT32: "<I", V.INT32: "<i",
           V.FLOAT32: "<f", V.BOOL: "<?", V.UINT64: "<Q", V.INT64: "<q", V.FLOAT64: "<d"}
_SCALARS = {t: np.dtype(fmt) for t, fmt in _STRUCT.items()}
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")
Q = GGMLQuantizationType
# Tensor types whose data is typed values (the rest are blocks of bytes), as GGUFReader views them.
_VALUE_DTYPES = {Q.F16: np.float16, Q.F32: np.float32, Q.F64: np.float64, Q.I8: np.int8, Q.I16: np.int16,
                 Q.I32: np.int32, Q.I64: np.int64}
_VERSIONS = (2, 3)
_CACHED_FILES = 8  # headers kept per process: each holds its file's memory map open


class GGUFTensor(NamedTuple):
    """One tensor of the table, with the attributes of ``gguf``'s ``ReaderTensor``."""

    name: str
    tensor_type: GGMLQuantizationType
    shape: np.ndarray  # uint64 dims, fastest-first as the file stores them
    n_elements: int
    n_bytes: int
    data_offset: int  # from the start of the file
    data: np.ndarray  # a read-only view of the memory map


class _Array(NamedTuple):
    """A metadata array not decoded yet: where its elements start in the file."""

    element_type: int
    count: int
    offset: int


class GGUFHeader:
    """The parsed header of one GGUF file: metadata values (arrays decoded on request) and the tensor table."""

    def __init__(self, path: Path, buf: mmap.mmap) -> None:
        self.path = path
        self._buf = buf
        data = np.frombuffer(buf, dtype=np.uint8)
        if bytes(buf[:4]) != b"GGUF":
            raise ValueError("it does not start with the GGUF magic bytes")
        self.version, tensor_count, kv_count = struct.unpack_from("<IQQ", buf, 4)
        if self.version & 0xFFFF == 0:
            raise ValueError("it is a big-endian GGUF (written for s390x); use a little-endian conversion")
        if self.version not in _VERSIONS:
            raise ValueError(f"GGUF version {self.version} is not one of {_VERSIONS}")
        pos = 24
        self._values: dict[str, Any] = {}
        self._decoded: dict[str, list[Any]] = {}
        for _ in range(kv_count):
            key, pos = _string(buf, pos)
            (value_type,) = _U32.unpack_from(buf, pos)
            if key in self._values:
                raise ValueError(f"metadata key {key!r} appears twice")
            self._values[key], pos = _value(buf, pos + 4, value_type)
        table = []
        for _ in range(tensor_count):
            name, pos = _string(buf, pos)
            (n_dims,) = _U32.unpack_from(buf, pos)
            dims = np.frombuffer(buf, dtype="<u8", count=n_dims, offset=pos + 4).copy()
            raw_type, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
            pos += 16 + 8 * n_dims
            table.append((name, dims, GGMLQuantizationType(raw_type), offset))
        self.alignment = self._values.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
        if type(self.alignment) is not int or self.alignment <= 0 or self.alignment & (self.alignment - 1):
            raise ValueError(f"general.alignment={self.alignment!r} is not a power of two")
        self.data_offset = -(-pos // self.alignment) * self.alignment
        self.tensors: list[GGUFTensor] = []
        seen: set[str] = set()
        for name, dims, qtype, offset in table:
            if name in seen:
                raise ValueError(f"tensor {name!r} appears twice")
            seen.add(name)
            n_elements = int(np.prod(dims))
            block, type_size = GGML_QUANT_SIZES[qtype]
            n_bytes = n_elements * type_size // block
            start = self.data_offset + offset
            if start + n_bytes > len(buf):
                raise ValueError(f"tensor {name!r} ends at byte {start + n_bytes}, past the end of the file "
                                 f"({len(buf)} bytes): the file is truncated")
            np_dims = tuple(reversed(dims.tolist()))
            if qtype in _VALUE_DTYPES:
                view = data[start:start + n_bytes].view(_VALUE_DTYPES[qtype]).reshape(np_dims)
            else:
                view = data[start:start + n_bytes].reshape(quant_shape_to_byte_shape(np_dims, qtype))
            self.tensors.append(GGUFTensor(name, qtype, dims, n_elements, n_bytes, start, view))

    def header_bytes(self) -> bytes:
        """The file's bytes before the tensor data: its metadata and tensor table."""
        return self._buf[:self.data_offset]

    def keys(self) -> list[str]:
        """The metadata keys, in file order."""
        return list(self._values)

    def get(self, key: str, default: Any = None) -> Any:
        """The value of metadata ``key`` (scalars as Python values, arrays as lists), or ``default``."""
        value = self._values.get(key, default)
        if not isinstance(value, _Array):
            return value
        if key not in self._decoded:
            self._decoded[key] = _decode_array(self._buf, value)
        return list(self._decoded[key])

    def array_length(self, key: str) -> int | None:
        """The element count of array ``key`` (without decoding it), or None when it is not an array."""
        value = self._values.get(key)
        return value.count if isinstance(value, _Array) else None


def _string(buf: mmap.mmap, pos: int) -> tuple[str, int]:
    (length,) = _U64.unpack_from(buf, pos)
    end = pos + 8 + length
    if end > len(buf):
        raise ValueError(f"a string at byte {pos} runs past the end of the file")
    return buf[pos + 8:end].decode("utf-8"), end


def _value(buf: mmap.mmap, pos: int, value_type: int) -> tuple[Any, int]:
    """One metadata value (an array as an :class:`_Array`) and the offset just past it."""
    if value_type in _STRUCT:
        return struct.unpack_from(_STRUCT[value_type], buf, pos)[0], pos + _SCALARS[value_type].itemsize
    if value_type == V.STRING:
        return _string(buf, pos)
    if value_type == V.ARRAY:
        element_type, count = struct.unpack_from("<IQ", buf, pos)
        return _Array(element_type, count, pos + 12), _skip_elements(buf, pos + 12, element_type, count)
    raise ValueError(f"unknown metadata value type {value_type} at byte {pos}")


def _skip_elements(buf: mmap.mmap, pos: int, element_type: int, count: int) -> int:
    """The offset just past ``count`` elements of ``element_type`` starting at ``pos``."""
    if element_type in _SCALARS:
        end = pos + count * _SCALARS[element_type].itemsize
    elif element_type == V.STRING:
        unpack = _U64.unpack_from
        for _ in range(count):
            pos += 8 + unpack(buf, pos)[0]
        end = pos
    else:  # arrays of arrays, or an unknown type: element by element
        for _ in range(count):
            pos = _value(buf, pos, element_type)[1]
        end = pos
    if end > len(buf):
        raise ValueError("a metadata array runs past the end of the file")
    return end


def _decode_array(buf: mmap.mmap, array: _Array) -> list[Any]:
    if array.element_type in _SCALARS:
        return np.frombuffer(buf, dtype=_SCALARS[array.element_type], count=array.count, offset=array.offset).tolist()
    out, pos = [], array.offset
    if array.element_type == V.STRING:
        unpack = _U64.unpack_from
        for _ in range(array.count):
            (length,) = unpack(buf, pos)
            out.append(buf[pos + 8:pos + 8 + length].decode("utf-8"))
            pos += 8 + length
        return out
    for _ in range(array.count):
        value, pos = _value(buf, pos, array.element_type)
        out.append(_decode_array(buf, value) if isinstance(value, _Array) else value)
    return out


_HEADERS: collections.OrderedDict[tuple[str, int, int], GGUFHeader] = collections.OrderedDict()
_HEADERS_LOCK = threading.Lock()  # the server opens files from more than one thread


def read_header(path: str | Path) -> GGUFHeader:
    """The header of the GGUF file at ``path``, parsed once per (resolved path, size, modification time) in this
    process. Raises ``ValueError`` (or ``struct.error``/``OSError``) on a file that is not a readable GGUF."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    with _HEADERS_LOCK:
        header = _HEADERS.get(key)
        if header is None:
            with open(path, "rb") as fh:
                buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            header = GGUFHeader(path, buf)
            _HEADERS[key] = header
            while len(_HEADERS) > _CACHED_FILES:
                _HEADERS.popitem(last=False)
        _HEADERS.move_to_end(key)
        return header
