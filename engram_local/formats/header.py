"""The GGUF header scanner: every reader of engram-local's GGUF files starts here.

`scan_gguf` parses a GGUF header (key-value pairs, tensor infos) with bounds checks and no
tensor data access. It is fast even on backbones whose tokenizer arrays make gguf-py's
GGUFReader slow (~2 s for SmolLM2's 49k tokens), and it turns bad input into one clear
`GGUFFormatError`: not a GGUF file, truncated header, truncated tensor data, unknown types.
`GGUFHeader.typed` reads a field checked against the type a reader expects; `file_kind` says
which of engram-local's files a header belongs to, and `describe_arch_mismatch` words the error
for a file of the wrong kind.
"""

from __future__ import annotations

import mmap
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from engram_local import constants

# Arrays longer than this are summarised (type, length) instead of decoded: tokenizer vocabularies
# and merge lists are never needed as values by engram-local, only their lengths.
MAX_DECODED_ARRAY = 4096
GGML_MAX_DIMS = 4

_SCALAR_FORMATS = {
    gguf.GGUFValueType.UINT8: "<B", gguf.GGUFValueType.INT8: "<b",
    gguf.GGUFValueType.UINT16: "<H", gguf.GGUFValueType.INT16: "<h",
    gguf.GGUFValueType.UINT32: "<I", gguf.GGUFValueType.INT32: "<i",
    gguf.GGUFValueType.UINT64: "<Q", gguf.GGUFValueType.INT64: "<q",
    gguf.GGUFValueType.FLOAT32: "<f", gguf.GGUFValueType.FLOAT64: "<d",
    gguf.GGUFValueType.BOOL: "<?",
}
# numpy reads arrays of the same little-endian types ("<Q" is uint64, "<?" bool).
_NUMPY_TYPES = {vtype: np.dtype(fmt) for vtype, fmt in _SCALAR_FORMATS.items()}
_INT_TYPES = {gguf.GGUFValueType.UINT8, gguf.GGUFValueType.INT8, gguf.GGUFValueType.UINT16,
              gguf.GGUFValueType.INT16, gguf.GGUFValueType.UINT32, gguf.GGUFValueType.INT32,
              gguf.GGUFValueType.UINT64, gguf.GGUFValueType.INT64}
# numpy dtypes of the typed (non-block) ggml tensor types.
TENSOR_DTYPES = {
    gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16,
    gguf.GGMLQuantizationType.F64: np.float64, gguf.GGMLQuantizationType.I8: np.int8,
    gguf.GGMLQuantizationType.I16: np.int16, gguf.GGMLQuantizationType.I32: np.int32,
    gguf.GGMLQuantizationType.I64: np.int64,
}


class GGUFFormatError(ValueError):
    """A file that is not a well-formed GGUF, or not the kind of GGUF engram-local expected."""


@dataclass(frozen=True)
class ArraySummary:
    """A long GGUF array, described instead of decoded."""

    element_type: str
    count: int


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]      # ggml order: shape[0] is the row width
    qtype: int                  # ggml type id
    offset: int                 # absolute file offset of the data
    nbytes: int

    @property
    def type_name(self) -> str:
        return gguf.GGMLQuantizationType(self.qtype).name

    @property
    def numpy_shape(self) -> tuple[int, ...]:
        return tuple(reversed(self.shape))


@dataclass
class GGUFHeader:
    path: Path
    version: int
    fields: dict[str, Any]            # scalars, strings, short arrays as lists, long ones summarised
    field_types: dict[str, int]       # GGUFValueType of each field (ARRAY for arrays)
    scalar_offsets: dict[str, int]    # file offset of each fixed-size scalar value (for patching)
    tensors: dict[str, TensorInfo]
    alignment: int
    data_offset: int
    file_size: int

    @property
    def architecture(self) -> str | None:
        arch = self.fields.get(gguf.Keys.General.ARCHITECTURE)
        return arch if isinstance(arch, str) else None

    @property
    def general_type(self) -> str | None:
        value = self.fields.get(gguf.Keys.General.TYPE)
        return value if isinstance(value, str) else None

    def typed(self, key: str, kind: str, required: bool = True):
        """A field's value checked against `kind`: uint, int, float, str, int_list."""
        if key not in self.fields:
            if required:
                raise GGUFFormatError(f"{self.path}: missing key {key!r}")
            return None
        value, vtype = self.fields[key], gguf.GGUFValueType(self.field_types[key])
        ok = {
            "uint": vtype in _INT_TYPES and isinstance(value, int) and value >= 0,
            "int": vtype in _INT_TYPES,
            "float": vtype in (gguf.GGUFValueType.FLOAT32, gguf.GGUFValueType.FLOAT64),
            "str": vtype == gguf.GGUFValueType.STRING,
            "int_list": vtype == gguf.GGUFValueType.ARRAY and isinstance(value, list)
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value),
        }[kind]
        if not ok:
            shown = value if not isinstance(value, ArraySummary) else f"array of {value.count}"
            raise GGUFFormatError(f"{self.path}: key {key!r} = {shown!r} ({vtype.name}) is not a "
                                  f"valid {kind.replace('_', ' ')}")
        return value


class _Cursor:
    """Bounds-checked little-endian reads over a byte buffer; overruns are truncation errors."""

    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path, self.size = buf, 0, path, len(buf)

    def _need(self, n: int, what: str):
        if n < 0 or self.pos + n > self.size:
            raise GGUFFormatError(f"{self.path}: truncated or corrupt GGUF header: {what} needs "
                                  f"{n} bytes at offset {self.pos}, the file has {self.size}")

    def unpack(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self._need(n, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value

    def string(self, what: str) -> str:
        n = self.unpack("<Q", what)
        self._need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise GGUFFormatError(f"{self.path}: corrupt GGUF header: {what} is not UTF-8") from None

    def skip_string(self, what: str):
        n = self.unpack("<Q", what)
        self._need(n, what)
        self.pos += n


def _value_type(cur: _Cursor, raw: int, what: str) -> gguf.GGUFValueType:
    try:
        return gguf.GGUFValueType(raw)
    except ValueError:
        raise GGUFFormatError(f"{cur.path}: corrupt GGUF header: {what} has unknown value type "
                              f"{raw} (at offset {cur.pos - 4})") from None


def _read_value(cur: _Cursor, vtype: gguf.GGUFValueType, key: str):
    if vtype == gguf.GGUFValueType.STRING:
        return cur.string(f"value of {key!r}")
    if vtype != gguf.GGUFValueType.ARRAY:
        return cur.unpack(_SCALAR_FORMATS[vtype], f"value of {key!r}")
    etype = _value_type(cur, cur.unpack("<I", f"array type of {key!r}"), f"array {key!r}")
    count = cur.unpack("<Q", f"array length of {key!r}")
    if etype == gguf.GGUFValueType.ARRAY:
        raise GGUFFormatError(f"{cur.path}: nested arrays ({key!r}) are not supported")
    if etype == gguf.GGUFValueType.STRING:
        if count > MAX_DECODED_ARRAY:
            for _ in range(count):
                cur.skip_string(f"element of {key!r}")
            return ArraySummary(etype.name, count)
        return [cur.string(f"element of {key!r}") for _ in range(count)]
    dtype = _NUMPY_TYPES[etype]
    cur._need(count * dtype.itemsize, f"array {key!r} of {count} {etype.name}")
    start = cur.pos
    cur.pos += count * dtype.itemsize
    if count > MAX_DECODED_ARRAY:
        return ArraySummary(etype.name, count)
    return np.frombuffer(cur.buf, dtype=dtype, count=count, offset=start).tolist()


def scan_gguf(path: str | os.PathLike) -> GGUFHeader:
    """Parse a GGUF file's header and tensor directory, checking that every tensor's data fits.

    Only regular files are opened (a FIFO, device or directory is refused before any open, so
    nothing can block)."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    if not stat.S_ISREG(st.st_mode):
        raise GGUFFormatError(f"{path}: {file_type_name(st.st_mode)}, not a GGUF file")
    size = st.st_size
    if size == 0:
        raise GGUFFormatError(f"{path}: empty file (not a GGUF file)")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        cur = _Cursor(memoryview(mm), path)
        try:
            return _scan(cur, path, size)
        finally:
            cur.buf.release()


def scan_gguf_bytes(data: bytes, path: str | os.PathLike) -> GGUFHeader:
    """`scan_gguf` of a file already read into memory (`path` names it in errors)."""
    path = Path(path)
    if not data:
        raise GGUFFormatError(f"{path}: empty file (not a GGUF file)")
    return _scan(_Cursor(memoryview(data), path), path, len(data))


def file_type_name(mode: int) -> str:
    """'a directory', 'a FIFO (named pipe)', ... for a stat mode that is not a regular file."""
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return f"is {name}"
    return "is not a regular file"


def _scan(cur: _Cursor, path: Path, size: int) -> GGUFHeader:
    if cur.size < 4 or cur.unpack("<I", "magic") != gguf.GGUF_MAGIC:
        head = bytes(cur.buf[:4])
        raise GGUFFormatError(f"{path}: not a GGUF file (starts with {head!r}, expected b'GGUF')")
    version = cur.unpack("<I", "version")
    if version not in (2, 3):
        raise GGUFFormatError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
    n_tensors = cur.unpack("<Q", "tensor count")
    n_kv = cur.unpack("<Q", "key-value count")
    # Every entry takes at least 8 bytes: larger counts can only come from corruption.
    if n_tensors > size // 8 or n_kv > size // 8:
        raise GGUFFormatError(f"{path}: corrupt GGUF header: {n_tensors} tensors and {n_kv} "
                              f"key-value pairs cannot fit in {size} bytes")

    fields: dict[str, Any] = {}
    field_types: dict[str, int] = {}
    scalar_offsets: dict[str, int] = {}
    for i in range(n_kv):
        key = cur.string(f"key #{i}")
        vtype = _value_type(cur, cur.unpack("<I", f"type of {key!r}"), repr(key))
        if vtype in _SCALAR_FORMATS:
            scalar_offsets[key] = cur.pos
        fields[key] = _read_value(cur, vtype, key)
        field_types[key] = int(vtype)

    alignment = fields.get(gguf.Keys.General.ALIGNMENT, gguf.GGUF_DEFAULT_ALIGNMENT)
    if (field_types.get(gguf.Keys.General.ALIGNMENT, gguf.GGUFValueType.UINT32) != gguf.GGUFValueType.UINT32
            or not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1)):
        raise GGUFFormatError(f"{path}: corrupt GGUF header: general.alignment {alignment!r} is not "
                              "a power-of-two uint32")

    infos = []
    for i in range(n_tensors):
        name = cur.string(f"name of tensor #{i}")
        n_dims = cur.unpack("<I", f"dimensions of {name!r}")
        if not 1 <= n_dims <= GGML_MAX_DIMS:
            raise GGUFFormatError(f"{path}: corrupt GGUF header: tensor {name!r} has {n_dims} dimensions")
        shape = tuple(cur.unpack("<Q", f"shape of {name!r}") for _ in range(n_dims))
        raw_type = cur.unpack("<I", f"type of {name!r}")
        offset = cur.unpack("<Q", f"offset of {name!r}")
        try:
            qtype = gguf.GGMLQuantizationType(raw_type)
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise GGUFFormatError(f"{path}: tensor {name!r} has unknown ggml type {raw_type}") from None
        if shape[0] % block:
            raise GGUFFormatError(f"{path}: corrupt GGUF header: tensor {name!r} rows of {shape[0]} "
                                  f"values are not whole {qtype.name} blocks of {block}")
        if any(d > 8 * size for d in shape):      # more values than any type packs in the file
            raise GGUFFormatError(f"{path}: corrupt GGUF header: tensor {name!r} has shape {list(shape)}, "
                                  f"impossible in {size} bytes")
        n_elements = int(np.prod(shape, dtype=object))
        infos.append((name, shape, int(qtype), offset, n_elements // block * type_size))

    data_offset = -(-cur.pos // alignment) * alignment
    tensors: dict[str, TensorInfo] = {}
    for name, shape, qtype, offset, nbytes in infos:
        if name in tensors:
            raise GGUFFormatError(f"{path}: corrupt GGUF header: tensor {name!r} appears twice")
        end = data_offset + offset + nbytes
        if end > size:
            raise GGUFFormatError(f"{path}: truncated file: tensor {name!r} needs bytes up to offset "
                                  f"{end}, the file has {size}")
        tensors[name] = TensorInfo(name, shape, qtype, data_offset + offset, nbytes)
    return GGUFHeader(path, version, fields, field_types, scalar_offsets, tensors, alignment,
                      data_offset, size)


def tensor_view(info: TensorInfo, raw: np.ndarray) -> np.ndarray:
    """The tensor's bytes `raw` (uint8) in its numpy shape for typed tensors, as uint8 rows of
    blocks for quantized ones (zero copy)."""
    dtype = TENSOR_DTYPES.get(gguf.GGMLQuantizationType(info.qtype))
    if dtype is not None:
        return raw.view(dtype).reshape(info.numpy_shape)
    return raw.reshape(info.numpy_shape[:-1] + (-1,))


def as_float32(data: np.ndarray, qtype) -> np.ndarray:
    """A tensor's stored data (`tensor_view`, GGUFReader's `data`) as a new, writable float32
    array: typed tensors converted, block types dequantized (rows of bytes -> rows of values)."""
    qtype = gguf.GGMLQuantizationType(qtype)
    if qtype in TENSOR_DTYPES:
        return np.array(data, np.float32)
    return gguf.quants.dequantize(data, qtype).astype(np.float32, copy=False)


# --------------------------------------------------------------------------- what a file is

def file_kind(header: GGUFHeader) -> str:
    """engram, overrides, adapter or backbone."""
    if header.architecture == constants.SIDECAR_ARCH:
        return "engram"
    if header.architecture == constants.EOV_ARCH:
        return "overrides"
    if header.general_type == constants.ADAPTER_GENERAL_TYPE:
        return "adapter"
    return "backbone"


def describe_arch_mismatch(header: GGUFHeader, wanted: str) -> str:
    """`<path>: a 'llama' model GGUF, not <wanted>` with a hint of what the file is."""
    arch = header.architecture
    what = {"engram": "an Engram sidecar", "overrides": "a user memory (.eov) file",
            "adapter": f"a LoRA adapter for {arch!r}",
            "backbone": f"a {arch!r} model GGUF" if arch else "a GGUF file without general.architecture",
            }[file_kind(header)]
    return f"{header.path}: {what}, not {wanted}"
