"""Reading and validating the GGUF files of a MODEL_DIR; the model fingerprint.

Three readers, from cheap to thorough:

* `scan_gguf` parses a GGUF header (key-value pairs, tensor infos) with bounds checks and no
  tensor data access. It is fast even on backbones whose tokenizer arrays make gguf-py's
  GGUFReader slow (~2 s for SmolLM2's 49k tokens), and it turns bad input into one clear
  `GGUFFormatError`: not a GGUF file, truncated header, truncated tensor data, unknown types.
* `open_sidecar` checks an Engram sidecar on top of that (architecture, format version, every
  key, every tensor's type and shape against the hash layout its configuration implies) and
  memory-maps it: tables are handed to the native kernel as views, never read whole.
* `Sidecar.compute_fingerprint` streams the hash configuration and the table bytes through
  xxh3_64 (docs/convert.md defines the byte stream); `verify_fingerprint` compares it with the
  stored one, which catches silent corruption of table data.

`read_lora_adapter` reads a llama.cpp LoRA adapter GGUF (the skill adapter).
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gguf
import numpy as np
import xxhash

from engram_local import constants

# Arrays longer than this are summarised (type, length) instead of decoded: tokenizer vocabularies
# and merge lists are never needed as values by engram-local, only their lengths.
MAX_DECODED_ARRAY = 4096
# Bytes per xxh3 update while fingerprinting a table (bounded, page-cache friendly).
FINGERPRINT_CHUNK = 16 << 20
GGML_MAX_DIMS = 4

_SCALAR_FORMATS = {
    gguf.GGUFValueType.UINT8: "<B", gguf.GGUFValueType.INT8: "<b",
    gguf.GGUFValueType.UINT16: "<H", gguf.GGUFValueType.INT16: "<h",
    gguf.GGUFValueType.UINT32: "<I", gguf.GGUFValueType.INT32: "<i",
    gguf.GGUFValueType.UINT64: "<Q", gguf.GGUFValueType.INT64: "<q",
    gguf.GGUFValueType.FLOAT32: "<f", gguf.GGUFValueType.FLOAT64: "<d",
    gguf.GGUFValueType.BOOL: "<?",
}
_NUMPY_TYPES = {
    gguf.GGUFValueType.UINT8: "<u1", gguf.GGUFValueType.INT8: "<i1",
    gguf.GGUFValueType.UINT16: "<u2", gguf.GGUFValueType.INT16: "<i2",
    gguf.GGUFValueType.UINT32: "<u4", gguf.GGUFValueType.INT32: "<i4",
    gguf.GGUFValueType.UINT64: "<u8", gguf.GGUFValueType.INT64: "<i8",
    gguf.GGUFValueType.FLOAT32: "<f4", gguf.GGUFValueType.FLOAT64: "<f8",
    gguf.GGUFValueType.BOOL: "?",
}
_INT_TYPES = {gguf.GGUFValueType.UINT8, gguf.GGUFValueType.INT8, gguf.GGUFValueType.UINT16,
              gguf.GGUFValueType.INT16, gguf.GGUFValueType.UINT32, gguf.GGUFValueType.INT32,
              gguf.GGUFValueType.UINT64, gguf.GGUFValueType.INT64}
# numpy dtypes of the typed (non-block) ggml tensor types.
_TENSOR_DTYPES = {
    gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16,
    gguf.GGMLQuantizationType.F64: np.float64, gguf.GGMLQuantizationType.I8: np.int8,
    gguf.GGMLQuantizationType.I16: np.int16, gguf.GGMLQuantizationType.I32: np.int32,
    gguf.GGMLQuantizationType.I64: np.int64,
}


class GGUFFormatError(ValueError):
    """A file that is not a well-formed GGUF, or not the kind of GGUF engram-local expected."""


# --------------------------------------------------------------------------- header scan

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
    dtype = np.dtype(_NUMPY_TYPES[etype])
    cur._need(count * dtype.itemsize, f"array {key!r} of {count} {etype.name}")
    start = cur.pos
    cur.pos += count * dtype.itemsize
    if count > MAX_DECODED_ARRAY:
        return ArraySummary(etype.name, count)
    return np.frombuffer(cur.buf, dtype=dtype, count=count, offset=start).tolist()


def scan_gguf(path: str | os.PathLike) -> GGUFHeader:
    """Parse a GGUF file's header and tensor directory, checking that every tensor's data fits."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    if size == 0:
        raise GGUFFormatError(f"{path}: empty file (not a GGUF file)")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        cur = _Cursor(memoryview(mm), path)
        try:
            return _scan(cur, path, size)
        finally:
            cur.buf.release()


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


def describe_arch_mismatch(header: GGUFHeader, wanted: str) -> str:
    """`<path>: a 'llama' model GGUF, not <wanted>` with a hint of what the file is."""
    arch, kind = header.architecture, header.general_type
    if arch == constants.SIDECAR_ARCH:
        what = "an Engram sidecar"
    elif arch == constants.EOV_ARCH:
        what = "a user memory (.eov) file"
    elif kind == constants.ADAPTER_GENERAL_TYPE:
        what = f"a LoRA adapter for {arch!r}"
    elif arch:
        what = f"a {arch!r} model GGUF"
    else:
        what = "a GGUF file without general.architecture"
    return f"{header.path}: {what}, not {wanted}"


# --------------------------------------------------------------------------- typed fields

def _field(header: GGUFHeader, key: str, kind: str, required: bool = True):
    """A field's value checked against `kind`: uint, int, float, str, int_list."""
    if key not in header.fields:
        if required:
            raise GGUFFormatError(f"{header.path}: missing key {key!r}")
        return None
    value, vtype = header.fields[key], gguf.GGUFValueType(header.field_types[key])
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
        raise GGUFFormatError(f"{header.path}: key {key!r} = {shown!r} ({vtype.name}) is not a "
                              f"valid {kind.replace('_', ' ')}")
    return value


# --------------------------------------------------------------------------- the sidecar

def _layer_tensor_names(layer: int) -> dict[str, str]:
    return {name.format(layer=layer): role for role, name in (
        ("table", constants.TENSOR_TABLE), ("multipliers", constants.TENSOR_MULTIPLIERS),
        ("primes", constants.TENSOR_PRIMES), ("offsets", constants.TENSOR_OFFSETS),
        ("w_k", constants.TENSOR_W_K), ("w_v", constants.TENSOR_W_V),
        ("norm_q", constants.TENSOR_NORM_Q), ("norm_k", constants.TENSOR_NORM_K),
        ("norm_v", constants.TENSOR_NORM_V), ("conv", constants.TENSOR_CONV))}


@dataclass
class Sidecar:
    """A validated, memory-mapped Engram sidecar GGUF (see `open_sidecar`)."""

    path: Path
    header: GGUFHeader
    format_version: int
    fingerprint: int
    source_digest: str | None
    backbone_arch: str
    settings: dict                # EngramConfig keyword arguments, as stored in the file
    layout: Any                   # engram_local.native.hashing.NgramHashLayout of those settings
    _data: np.ndarray | None = field(default=None, repr=False)   # uint8 view of the whole file
    _mmap: mmap.mmap | None = field(default=None, repr=False)

    @property
    def config(self):
        """The EngramConfig (engram_local.model.engram imports torch: used only to build models)."""
        from engram_local.formats.config import EngramConfig

        return EngramConfig(**self.settings)

    @property
    def layer_ids(self) -> list[int]:
        return list(self.layout.layer_ids)

    # ---------------------------------------------------------------- raw access
    def _bytes(self) -> np.ndarray:
        if self._data is None:
            with open(self.path, "rb") as f:
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            if self._mmap.size() != self.header.file_size:
                raise GGUFFormatError(f"{self.path}: the file changed size while open "
                                      f"({self.header.file_size} -> {self._mmap.size()} bytes)")
            self._data = np.frombuffer(self._mmap, dtype=np.uint8)
        return self._data

    def tensor(self, name: str) -> np.ndarray:
        """A zero-copy view of a tensor: numpy shape for typed tensors, uint8 rows for blocks."""
        info = self.header.tensors[name]
        raw = self._bytes()[info.offset:info.offset + info.nbytes]
        dtype = _TENSOR_DTYPES.get(gguf.GGMLQuantizationType(info.qtype))
        if dtype is not None:
            return raw.view(dtype).reshape(info.numpy_shape)
        return raw.reshape(info.numpy_shape[:-1] + (-1,))

    # ---------------------------------------------------------------- model pieces
    def canonical_map(self) -> np.ndarray:
        return self.tensor(constants.TENSOR_CANONICAL_MAP)

    def table_name(self, layer: int) -> str:
        return constants.TENSOR_TABLE.format(layer=layer)

    def table(self, layer: int):
        """The layer's memory table as a zero-copy `native.Table` over the file mapping."""
        from engram_local import native

        info = self.header.tensors[self.table_name(layer)]
        self._advise_random(info)
        return native.Table(self._bytes()[info.offset:info.offset + info.nbytes], info.qtype,
                            info.shape[1], info.shape[0])

    def _advise_random(self, info: TensorInfo):
        # Look-ups touch scattered rows: without this, kernel read-ahead would pull in
        # neighbouring pages of a table that does not fit in memory (llama.cpp does the same).
        self._bytes()
        if hasattr(mmap, "MADV_RANDOM") and info.nbytes:
            start = info.offset - info.offset % mmap.PAGESIZE
            self._mmap.madvise(mmap.MADV_RANDOM, start, info.offset + info.nbytes - start)

    def layer_state(self, layer: int) -> dict[str, np.ndarray]:
        """Non-table weights of one layer, keyed like `EngramLayer.state_dict()` (float32 copies)."""
        t = lambda name: np.array(self.tensor(name.format(layer=layer)), dtype=np.float32)  # noqa: E731
        conv = t(constants.TENSOR_CONV)
        return {"w_k.weight": t(constants.TENSOR_W_K), "w_v.weight": t(constants.TENSOR_W_V),
                "norm_q.weight": t(constants.TENSOR_NORM_Q), "norm_k.weight": t(constants.TENSOR_NORM_K),
                "norm_v.weight": t(constants.TENSOR_NORM_V),
                "conv.weight": conv.reshape(conv.shape[0], 1, conv.shape[1])}

    # ---------------------------------------------------------------- fingerprint
    def compute_fingerprint(self) -> int:
        """xxh3_64 of the hash configuration and table bytes, streamed from the file mapping."""
        s = self.settings
        h = xxhash.xxh3_64()
        h.update(constants.FINGERPRINT_MAGIC)
        h.update(_i64(constants.FINGERPRINT_VERSION, s["max_ngram_size"], s["n_head_per_ngram"],
                      s["head_dim"], s["pad_id"], s["compressed_vocab_size"], len(s["layer_ids"])))
        cmap = self.canonical_map()
        h.update(_i64(cmap.shape[0]))
        h.update(np.ascontiguousarray(cmap, dtype="<i8"))
        for layer in s["layer_ids"]:
            info = self.header.tensors[self.table_name(layer)]
            h.update(_i64(layer, info.qtype, info.shape[1], info.shape[0]))
            for name in (constants.TENSOR_MULTIPLIERS, constants.TENSOR_PRIMES, constants.TENSOR_OFFSETS):
                h.update(np.ascontiguousarray(self.tensor(name.format(layer=layer)), dtype="<i8"))
            table = self._bytes()[info.offset:info.offset + info.nbytes]
            for start in range(0, info.nbytes, FINGERPRINT_CHUNK):
                h.update(table[start:start + FINGERPRINT_CHUNK])
        return h.intdigest()

    def verify_fingerprint(self):
        """Raise GGUFFormatError when the stored fingerprint does not match the file's content."""
        actual = self.compute_fingerprint()
        if actual != self.fingerprint:
            raise GGUFFormatError(f"{self.path}: fingerprint mismatch: stored {self.fingerprint:#018x}, "
                                  f"content hashes to {actual:#018x}; the file is corrupt or was "
                                  "modified (re-create it with `engram-local convert`)")

    def close(self):
        """Drop this object's mapping (views handed out keep theirs alive)."""
        self._data = None
        self._mmap = None


def _i64(*values: int) -> bytes:
    return struct.pack(f"<{len(values)}q", *values)


def open_sidecar(path: str | os.PathLike) -> Sidecar:
    """Validate and map an Engram sidecar; every problem raises GGUFFormatError with the path."""
    from engram_local.native.hashing import NgramHashLayout

    header = scan_gguf(path)
    where = header.path
    if header.architecture != constants.SIDECAR_ARCH:
        raise GGUFFormatError(describe_arch_mismatch(header, "an Engram sidecar (general.architecture "
                                                             f"{constants.SIDECAR_ARCH!r})"))
    version = _field(header, constants.KEY_FORMAT_VERSION, "uint")
    if version > constants.SIDECAR_FORMAT_VERSION:
        raise GGUFFormatError(f"{where}: Engram sidecar format version {version} is newer than this "
                              f"engram-local reads ({constants.SIDECAR_FORMAT_VERSION}): upgrade engram-local")
    if version != constants.SIDECAR_FORMAT_VERSION:
        raise GGUFFormatError(f"{where}: Engram sidecar format version {version} is not supported "
                              f"(this engram-local reads version {constants.SIDECAR_FORMAT_VERSION}); "
                              "re-create the model directory with `engram-local convert`")

    # EngramConfig's fields (engram_local.model.engram), read without importing torch.
    settings = dict(
        hidden_size=_field(header, constants.KEY_HIDDEN, "uint"),
        compressed_vocab_size=_field(header, constants.KEY_COMPRESSED_VOCAB, "uint"),
        pad_id=_field(header, constants.KEY_PAD_ID, "uint"),
        layer_ids=list(_field(header, constants.KEY_LAYER_IDS, "int_list")),
        write_layer=_field(header, constants.KEY_WRITE_LAYER, "int"),
        max_ngram_size=_field(header, constants.KEY_MAX_NGRAM, "uint"),
        n_head_per_ngram=_field(header, constants.KEY_N_HEAD, "uint"),
        head_dim=_field(header, constants.KEY_HEAD_DIM, "uint"),
        vocab_size_per_ngram=list(_field(header, constants.KEY_VOCAB_PER_NGRAM, "int_list")),
        seed=_field(header, constants.KEY_SEED, "uint"),
        kernel_size=_field(header, constants.KEY_KERNEL_SIZE, "uint"),
        norm_eps=float(_field(header, constants.KEY_NORM_EPS, "float")))
    try:
        if settings["write_layer"] not in settings["layer_ids"]:
            raise ValueError(f"write layer {settings['write_layer']} is not one of the layers "
                             f"{settings['layer_ids']}")
        if min(settings["hidden_size"], settings["head_dim"], settings["kernel_size"]) < 1:
            raise ValueError("hidden size, head dim and kernel size must be >= 1")
        layout = NgramHashLayout(settings["compressed_vocab_size"], settings["max_ngram_size"],
                                 settings["n_head_per_ngram"], settings["vocab_size_per_ngram"],
                                 settings["layer_ids"], settings["pad_id"], settings["seed"])
    except ValueError as exc:
        raise GGUFFormatError(f"{where}: invalid Engram configuration: {exc}") from exc

    sidecar = Sidecar(path=where, header=header, format_version=version,
                      fingerprint=_field(header, constants.KEY_FINGERPRINT, "uint"),
                      source_digest=_field(header, constants.KEY_SOURCE_DIGEST, "str", required=False),
                      backbone_arch=_field(header, constants.KEY_BACKBONE_ARCH, "str"),
                      settings=settings, layout=layout)
    _check_sidecar_tensors(sidecar)
    return sidecar


def _check_sidecar_tensors(sidecar: Sidecar):
    """Every tensor present with the type and shape the configuration implies, nothing else."""
    cfg, layout = SimpleNamespace(**sidecar.settings), sidecar.layout
    header, where = sidecar.header, sidecar.path
    D, N, K = cfg.hidden_size, cfg.max_ngram_size, cfg.n_head_per_ngram
    E = (N - 1) * K * cfg.head_dim          # width of the concatenated memory vector
    F32, I64 = int(gguf.GGMLQuantizationType.F32), int(gguf.GGMLQuantizationType.I64)
    # numpy shapes (rows first); None = checked separately
    expected: dict[str, tuple[tuple[int, ...] | None, set[int]]] = {
        constants.TENSOR_CANONICAL_MAP: (None, {I64})}
    for layer in cfg.layer_ids:
        per = {"table": ((layout.rows_per_layer[layer], cfg.head_dim), set(constants.TABLE_QTYPES.values())),
               "multipliers": ((N,), {I64}), "primes": (((N - 1) * K,), {I64}),
               "offsets": (((N - 1) * K,), {I64}), "w_k": ((D, E), {F32}), "w_v": ((D, E), {F32}),
               "norm_q": ((D,), {F32}), "norm_k": ((D,), {F32}), "norm_v": ((D,), {F32}),
               "conv": ((D, cfg.kernel_size), {F32})}
        for name, role in _layer_tensor_names(layer).items():
            expected[name] = per[role]

    unexpected = sorted(set(header.tensors) - set(expected))
    if unexpected:
        raise GGUFFormatError(f"{where}: unexpected tensors for layers {cfg.layer_ids}: "
                              f"{', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}")
    for name, (shape, qtypes) in expected.items():
        info = header.tensors.get(name)
        if info is None:
            raise GGUFFormatError(f"{where}: missing tensor {name!r}")
        if info.qtype not in qtypes:
            allowed = ", ".join(sorted(gguf.GGMLQuantizationType(q).name for q in qtypes))
            raise GGUFFormatError(f"{where}: tensor {name!r} has type {info.type_name}, expected {allowed}")
        if shape is not None and info.numpy_shape != shape:
            raise GGUFFormatError(f"{where}: tensor {name!r} has shape {list(info.numpy_shape)} "
                                  f"(rows first), the configuration implies {list(shape)}")

    cmap_info = header.tensors[constants.TENSOR_CANONICAL_MAP]
    if len(cmap_info.shape) != 1 or cmap_info.shape[0] < 1:
        raise GGUFFormatError(f"{where}: {constants.TENSOR_CANONICAL_MAP!r} must be a non-empty 1-D tensor")
    cmap = sidecar.canonical_map()
    if int(cmap.min()) < 0 or int(cmap.max()) >= cfg.compressed_vocab_size:
        raise GGUFFormatError(f"{where}: canonical map values must lie in [0, {cfg.compressed_vocab_size})")
    for layer in cfg.layer_ids:
        args = layout.kernel_args(layer)
        for role, name in (("multipliers", constants.TENSOR_MULTIPLIERS),
                           ("primes", constants.TENSOR_PRIMES), ("offsets", constants.TENSOR_OFFSETS)):
            if not np.array_equal(sidecar.tensor(name.format(layer=layer)), args[role]):
                raise GGUFFormatError(f"{where}: layer {layer} {role} disagree with the hash "
                                      "configuration (corrupt file?)")


# --------------------------------------------------------------------------- LoRA adapters

@dataclass
class LoraAdapter:
    """A llama.cpp LoRA adapter: per base tensor, A [r, in] and B [out, r] (numpy order)."""

    path: Path
    architecture: str
    alpha: float
    tensors: dict[str, tuple[np.ndarray, np.ndarray]]

    @property
    def ranks(self) -> set[int]:
        return {a.shape[0] for a, _ in self.tensors.values()}

    def scale(self, base: str) -> float:
        """llama.cpp's factor alpha / r (alpha 0 means 1: llama-adapter.h `get_scale`)."""
        rank = self.tensors[base][0].shape[0]
        return self.alpha / rank if self.alpha else 1.0


def check_lora_header(header: GGUFHeader) -> float:
    """Validate an adapter's keys as llama.cpp's loader does; returns alpha."""
    if header.general_type != constants.ADAPTER_GENERAL_TYPE:
        raise GGUFFormatError(describe_arch_mismatch(header, "a LoRA adapter (general.type "
                                                             f"{constants.ADAPTER_GENERAL_TYPE!r})"))
    adapter_type = _field(header, constants.KEY_ADAPTER_TYPE, "str")
    if adapter_type != constants.ADAPTER_TYPE_LORA:
        raise GGUFFormatError(f"{header.path}: adapter type {adapter_type!r} is not supported "
                              f"(only {constants.ADAPTER_TYPE_LORA!r})")
    alpha = _field(header, constants.KEY_ADAPTER_LORA_ALPHA, "float", required=False)
    return float(alpha or 0.0)


def read_lora_adapter(path: str | os.PathLike) -> LoraAdapter:
    """Read and check a LoRA adapter GGUF (pairs complete, ranks consistent); values as float32."""
    header = scan_gguf(path)
    alpha = check_lora_header(header)
    suffix_a, suffix_b = constants.TENSOR_LORA_A.format(base=""), constants.TENSOR_LORA_B.format(base="")
    pairs: dict[str, dict[str, TensorInfo]] = {}
    for name, info in header.tensors.items():
        if name.endswith(suffix_a):
            pairs.setdefault(name[:-len(suffix_a)], {})["a"] = info
        elif name.endswith(suffix_b):
            pairs.setdefault(name[:-len(suffix_b)], {})["b"] = info
        else:
            raise GGUFFormatError(f"{header.path}: tensor {name!r} is neither a {suffix_a} nor a {suffix_b}")
    tensors = {}
    with open(header.path, "rb") as f:          # adapters are small: plain reads, no mapping
        for base, pair in sorted(pairs.items()):
            if set(pair) != {"a", "b"}:
                raise GGUFFormatError(f"{header.path}: {base!r} has only lora_{''.join(pair)}")
            a, b = (_read_float32(f, pair[k]) for k in ("a", "b"))
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
                raise GGUFFormatError(f"{header.path}: {base!r}: lora_a {list(a.shape)} and lora_b "
                                      f"{list(b.shape)} do not form [out, r] x [r, in]")
            tensors[base] = (a, b)
    return LoraAdapter(header.path, header.architecture or "", alpha, tensors)


def _read_float32(f, info: TensorInfo) -> np.ndarray:
    f.seek(info.offset)
    raw = np.frombuffer(f.read(info.nbytes), dtype=np.uint8)
    qtype = gguf.GGMLQuantizationType(info.qtype)
    dtype = _TENSOR_DTYPES.get(qtype)
    if dtype is not None:
        return raw.view(dtype).reshape(info.numpy_shape).astype(np.float32)
    rows = raw.reshape(info.numpy_shape[:-1] + (-1,))
    return gguf.quants.dequantize(rows, qtype).astype(np.float32)


# --------------------------------------------------------------------------- descriptions
# Plain dicts (JSON-ready) of what a file holds, for `engram-local inspect`.

def file_kind(header: GGUFHeader) -> str:
    """engram, overrides, adapter or backbone."""
    if header.architecture == constants.SIDECAR_ARCH:
        return "engram"
    if header.architecture == constants.EOV_ARCH:
        return "overrides"
    if header.general_type == constants.ADAPTER_GENERAL_TYPE:
        return "adapter"
    return "backbone"


def describe_backbone(header: GGUFHeader) -> dict:
    arch = header.architecture or ""
    key = lambda k: header.fields.get(k.format(arch=arch))   # noqa: E731
    file_type = header.fields.get(gguf.Keys.General.FILE_TYPE)
    try:
        file_type = gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:
        file_type = None if file_type is None else str(file_type)
    tokens = header.fields.get(gguf.Keys.Tokenizer.LIST)
    return {
        "path": str(header.path), "architecture": arch,
        "name": header.fields.get(gguf.Keys.General.NAME), "file_type": file_type,
        "size_bytes": header.file_size,
        "n_params": sum(int(np.prod(t.shape, dtype=object)) for t in header.tensors.values()),
        "block_count": key(gguf.Keys.LLM.BLOCK_COUNT),
        "embedding_length": key(gguf.Keys.LLM.EMBEDDING_LENGTH),
        "head_count": key(gguf.Keys.Attention.HEAD_COUNT),
        "context_length": key(gguf.Keys.LLM.CONTEXT_LENGTH),
        "vocab_size": tokens.count if isinstance(tokens, ArraySummary) else len(tokens or []),
        "tokenizer": header.fields.get(gguf.Keys.Tokenizer.MODEL),
        "tokenizer_pre": header.fields.get(gguf.Keys.Tokenizer.PRE),
        "chat_template": gguf.Keys.Tokenizer.CHAT_TEMPLATE in header.fields,
    }


def describe_sidecar(sidecar: Sidecar) -> dict:
    cfg = SimpleNamespace(**sidecar.settings)
    layers = []
    for layer in cfg.layer_ids:
        info = sidecar.header.tensors[sidecar.table_name(layer)]
        layers.append({"layer": layer, "rows": info.shape[1], "dim": info.shape[0],
                       "table_type": info.type_name, "table_bytes": info.nbytes,
                       "write_layer": layer == cfg.write_layer})
    return {
        "path": str(sidecar.path), "format_version": sidecar.format_version,
        "fingerprint": f"{sidecar.fingerprint:#018x}", "size_bytes": sidecar.header.file_size,
        "backbone_arch": sidecar.backbone_arch, "hidden_size": cfg.hidden_size,
        "max_ngram_size": cfg.max_ngram_size, "n_head_per_ngram": cfg.n_head_per_ngram,
        "head_dim": cfg.head_dim, "compressed_vocab_size": cfg.compressed_vocab_size,
        "raw_vocab_size": sidecar.header.tensors[constants.TENSOR_CANONICAL_MAP].shape[0],
        "pad_id": cfg.pad_id, "seed": cfg.seed, "write_layer": cfg.write_layer,
        "layers": layers, "source_digest": sidecar.source_digest,
    }


def describe_adapter(header: GGUFHeader) -> dict:
    alpha = check_lora_header(header)
    suffix_a = constants.TENSOR_LORA_A.format(base="")
    bases = [n[:-len(suffix_a)] for n in header.tensors if n.endswith(suffix_a)]
    return {
        "path": str(header.path), "architecture": header.architecture, "alpha": alpha,
        "ranks": sorted({header.tensors[constants.TENSOR_LORA_A.format(base=b)].shape[1] for b in bases}),
        "n_weights": len(bases), "size_bytes": header.file_size,
        # blk.3.attn_q.weight -> attn_q: which projections it adapts
        "targets": sorted({b.split(".")[-2] if b.startswith("blk.") else b for b in bases}),
    }


def describe_overrides(path: str | os.PathLike) -> dict:
    """An .eov file: the model fingerprint it binds to, rows per layer, facts in its ledger."""
    from engram_local.formats.eov import read_memory_file

    header = scan_gguf(path)
    if header.architecture != constants.EOV_ARCH:
        raise GGUFFormatError(describe_arch_mismatch(header, "a user memory (.eov) file"))
    memory = read_memory_file(path)         # validates the rows and the ledger
    return {
        "path": str(header.path), "format_version": header.fields.get(constants.KEY_EOV_VERSION),
        "fingerprint": f"{memory.fingerprint:#018x}",
        "layers": {str(layer): len(s) for layer, s in sorted(memory.layers.items())},
        "rows": sum(len(s) for s in memory.layers.values()), "facts": len(memory.facts),
        "size_bytes": header.file_size,
    }
