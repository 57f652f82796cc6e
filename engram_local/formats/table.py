"""Memory tables read straight from GGUF files: memory-mapped, validated, never loaded whole.

`open_table` wraps one 2-D tensor of a GGUF file in a `native.Table` that points into the
file's mmap (gguf.GGUFReader), so opening a multi-gigabyte table costs only its header.
"""

from __future__ import annotations

import os

import gguf
import numpy as np

from engram_local import native


def read_gguf(path: str | os.PathLike) -> gguf.GGUFReader:
    """A read-only, memory-mapped GGUFReader of `path`.

    A missing or unreadable file raises its OSError; a file that does not parse as GGUF
    raises ValueError("<path>: not a readable GGUF file: ...").
    """
    try:
        return gguf.GGUFReader(path, "r")
    except OSError:
        raise
    except Exception as exc:  # gguf-py reports corrupt input as ValueError, struct, index errors...
        raise ValueError(f"{os.fspath(path)}: not a readable GGUF file: "
                         f"{type(exc).__name__}: {exc}") from exc


def tensor_bytes(path: str | os.PathLike, reader: gguf.GGUFReader,
                 tensor: gguf.ReaderTensor) -> np.ndarray:
    """The tensor's data after checking that all of its bytes are present in the file."""
    end = int(tensor.data_offset) + int(tensor.n_bytes)
    if end > reader.data.nbytes or tensor.data.nbytes != int(tensor.n_bytes):
        raise ValueError(f"{os.fspath(path)}: truncated file: tensor {tensor.name!r} needs bytes up "
                         f"to offset {end}, the file has {reader.data.nbytes}")
    return tensor.data


def find_tensor(path: str | os.PathLike, reader: gguf.GGUFReader, name: str) -> gguf.ReaderTensor:
    """The tensor called `name`; a ValueError listing the available names if there is none."""
    for tensor in reader.tensors:
        if tensor.name == name:
            return tensor
    available = ", ".join(sorted(t.name for t in reader.tensors)) or "(none)"
    raise ValueError(f"{os.fspath(path)}: no tensor {name!r}; available: {available}")


def open_table(path: str | os.PathLike, tensor_name: str) -> native.Table:
    """The 2-D tensor `tensor_name` of GGUF file `path` as a zero-copy native.Table.

    The table's rows are the tensor's numpy rows (ggml shape [dim, n_rows]); its type must be
    one the kernel gathers (F32, F16, BF16, Q8_0, Q4_0).
    """
    reader = read_gguf(path)
    tensor = find_tensor(path, reader, tensor_name)
    if len(tensor.shape) != 2:
        raise ValueError(f"{os.fspath(path)}: tensor {tensor_name!r} must be 2-D [n_rows, dim], "
                         f"has ggml shape {[int(d) for d in tensor.shape]}")
    qtype = int(tensor.tensor_type)
    if qtype not in native.TABLE_QTYPES:
        supported = ", ".join(sorted(native.QTYPE_NAMES[q] for q in native.TABLE_QTYPES))
        raise ValueError(f"{os.fspath(path)}: tensor {tensor_name!r} has type "
                         f"{tensor.tensor_type.name}; supported table types: {supported}")
    dim, n_rows = int(tensor.shape[0]), int(tensor.shape[1])
    return native.Table(tensor_bytes(path, reader, tensor), qtype, n_rows, dim)
