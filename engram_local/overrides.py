"""Override files: per-layer replacement rows for the memory tables, in a small GGUF container.

Minimal format (EOV_FORMAT_VERSION 1; constants.py names every key and tensor):
  general.architecture = "engram-overrides"
  eov.format_version   uint32
  eov.model_fingerprint uint64  the sidecar fingerprint the rows were written for
  eov.layers           int32[]  layer ids with rows (absent when there are none: gguf-py
                                drops empty arrays)
  eov.{layer}.rows     I64 [n]        ascending by (row, key)
  eov.{layer}.keys     I64 [n]        -1 = applies to every look-up of the row
  eov.{layer}.values   F16/F32 [n, head_dim]
Reading maps the file: the returned OverrideSets are views into it, not copies. A later issue
extends this into the user .eov format with a fact ledger.
"""

from __future__ import annotations

import os
from typing import Mapping

import gguf
import numpy as np

from engram_local import constants
from engram_local.native import OverrideSet
from engram_local.table import find_tensor, read_gguf, tensor_bytes

UINT64_MAX = 2**64 - 1


def write_override_file(path: str | os.PathLike, sets: Mapping[int, tuple],
                        fingerprint: int) -> None:
    """Write `{layer: (rows, keys or None, values)}` for the model with `fingerprint`.

    Entries may come in any order (they are sorted by (row, key)); duplicate (row, key)
    pairs are an error; layers without entries are left out. The file is written beside its
    destination and renamed into place, so a crash never leaves a half-written file.
    """
    if not isinstance(fingerprint, (int, np.integer)) or not 0 <= int(fingerprint) <= UINT64_MAX:
        raise ValueError(f"fingerprint must be an integer in [0, 2**64), got {fingerprint!r}")
    built: dict[int, OverrideSet] = {}
    for layer, entry in sorted(sets.items()):
        if not isinstance(layer, (int, np.integer)) or not 0 <= int(layer) < 2**31:
            raise ValueError(f"layer ids must be integers in [0, 2**31), got {layer!r}")
        if not isinstance(entry, tuple) or len(entry) != 3:
            raise TypeError(f"sets[{layer}] must be a (rows, keys, values) tuple")
        rows, keys, values = entry
        override = OverrideSet.build(rows, values, keys)
        if len(override):
            built[int(layer)] = override

    writer = gguf.GGUFWriter(None, constants.EOV_ARCH)
    writer.add_uint32(constants.KEY_EOV_VERSION, constants.EOV_FORMAT_VERSION)
    writer.add_uint64(constants.KEY_EOV_FINGERPRINT, int(fingerprint))
    if built:  # gguf-py would drop an empty array anyway; readers treat absence as "none"
        writer.add_array(constants.KEY_EOV_LAYERS, list(built))
    for layer, override in built.items():
        keys = (override.keys if override.keys is not None
                else np.full(len(override), constants.ANY_KEY, dtype=np.int64))
        writer.add_tensor(constants.TENSOR_EOV_ROWS.format(layer=layer), override.rows)
        writer.add_tensor(constants.TENSOR_EOV_KEYS.format(layer=layer), keys)
        writer.add_tensor(constants.TENSOR_EOV_VALUES.format(layer=layer), override.values)

    tmp = f"{os.fspath(path)}.tmp"
    try:
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def open_override_file(path: str | os.PathLike,
                       fingerprint: int | None = None) -> dict[int, OverrideSet]:
    """`{layer: OverrideSet}` of an override file, as memory-mapped views (no copies).

    With `fingerprint`, the file must have been written for that model fingerprint.
    """
    where = os.fspath(path)
    reader = read_gguf(path)

    def field(key: str, required: bool = True):
        f = reader.fields.get(key)
        if f is None:
            if required:
                raise ValueError(f"{where}: missing key {key!r}")
            return None
        return f.contents()

    arch = field("general.architecture")
    if arch != constants.EOV_ARCH:
        raise ValueError(f"{where}: not an override file (architecture {arch!r}, "
                         f"expected {constants.EOV_ARCH!r})")
    version = field(constants.KEY_EOV_VERSION)
    if version != constants.EOV_FORMAT_VERSION:
        raise ValueError(f"{where}: override format version {version}, this engram-local reads "
                         f"version {constants.EOV_FORMAT_VERSION}")
    file_fingerprint = field(constants.KEY_EOV_FINGERPRINT)
    if fingerprint is not None and file_fingerprint != fingerprint:
        raise ValueError(f"{where}: written for model fingerprint {file_fingerprint:#018x}, "
                         f"not {int(fingerprint):#018x}")
    layers = [int(v) for v in (field(constants.KEY_EOV_LAYERS, required=False) or [])]

    expected = {name.format(layer=layer) for layer in layers
                for name in (constants.TENSOR_EOV_ROWS, constants.TENSOR_EOV_KEYS,
                             constants.TENSOR_EOV_VALUES)}
    unexpected = sorted(t.name for t in reader.tensors if t.name not in expected)
    if unexpected:
        raise ValueError(f"{where}: tensors of layers not listed in {constants.KEY_EOV_LAYERS}: "
                         f"{', '.join(unexpected)}")

    sets: dict[int, OverrideSet] = {}
    for layer in layers:
        arrays = []
        for name, types in ((constants.TENSOR_EOV_ROWS, {gguf.GGMLQuantizationType.I64}),
                            (constants.TENSOR_EOV_KEYS, {gguf.GGMLQuantizationType.I64}),
                            (constants.TENSOR_EOV_VALUES, {gguf.GGMLQuantizationType.F16,
                                                           gguf.GGMLQuantizationType.F32})):
            tensor = find_tensor(path, reader, name.format(layer=layer))
            if tensor.tensor_type not in types:
                raise ValueError(f"{where}: tensor {tensor.name!r} has type {tensor.tensor_type.name}, "
                                 f"expected {' or '.join(sorted(t.name for t in types))}")
            arrays.append(tensor_bytes(path, reader, tensor))
        rows, keys, values = arrays
        try:
            sets[layer] = OverrideSet(rows, values, keys)
        except ValueError as exc:
            raise ValueError(f"{where}: layer {layer}: {exc}") from exc
    return sets
