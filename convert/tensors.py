"""Writing GGUF tensors row chunk by row chunk, with a progress bar for the large ones.

gguf-py's GGUFWriter keeps every added tensor in memory until `write_tensors_to_file`, which
calls `tensor.tofile(fout)` on each. `StreamedTensor` provides that interface but produces its
bytes only then, a bounded chunk of rows at a time (read, convert, quantize, write): a table of
many gigabytes is never held whole, and its progress is visible while it is written.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import gguf
import numpy as np

from engram_local import constants
from engram_local.formats.header import as_float32

# Rows per chunk are chosen so one chunk of float32 input is about this large.
CHUNK_BYTES = 32 << 20
# Tensors at least this large (output bytes) get their own progress bar.
PROGRESS_MIN_BYTES = 16 << 20

# Storage types by their command-line names (f32, f16, bf16, q8_0, q4_0).
QTYPES = {name: gguf.GGMLQuantizationType(q) for name, q in constants.TABLE_QTYPES.items()}


def copy_metadata(reader: gguf.GGUFReader, skip: tuple[str, ...] = ()) -> gguf.GGUFWriter:
    """A GGUFWriter (no file yet) for the architecture of `reader` with every metadata key of
    `reader` copied in order (the writer's own GGUF.* bookkeeping keys and `skip` excepted)."""
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(None, arch)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF.") or field.name in skip:
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
    return writer


def check_row_width(qtype: gguf.GGMLQuantizationType, width: int, what: str):
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if width % block:
        raise ValueError(f"{what}: {qtype.name} stores rows in blocks of {block} values; rows of "
                         f"{width} values are not a multiple of that")


def encode_rows(rows: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """float32 rows [n, width] -> the bytes gguf stores: float32/float16 arrays, uint8 otherwise."""
    return gguf.quants.quantize(np.ascontiguousarray(rows, dtype=np.float32), qtype)


class StreamedTensor:
    """Tensor data of `n_rows` x `width` values made at write time from `read_rows(start, stop)`.

    `read_rows` returns float32 rows [stop - start, width]; each chunk is encoded as `qtype`.
    """

    def __init__(self, name: str, n_rows: int, width: int, qtype: gguf.GGMLQuantizationType,
                 read_rows: Callable[[int, int], np.ndarray], progress: bool = True):
        check_row_width(qtype, width, f"tensor {name}")
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        self.name, self.n_rows, self.width, self.qtype = name, n_rows, width, qtype
        self.row_bytes = width // block * type_size
        self.nbytes = n_rows * self.row_bytes
        self._read_rows, self._progress = read_rows, progress
        if qtype == gguf.GGMLQuantizationType.F32:
            self.dtype, self.shape = np.dtype(np.float32), (n_rows, width)
        elif qtype == gguf.GGMLQuantizationType.F16:
            self.dtype, self.shape = np.dtype(np.float16), (n_rows, width)
        else:   # the writer turns a uint8 byte shape into the element shape for block types
            self.dtype, self.shape = np.dtype(np.uint8), (n_rows, self.row_bytes)

    def add_to(self, writer: gguf.GGUFWriter):
        raw = None if self.qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) \
            else self.qtype
        writer.add_tensor(self.name, self, raw_dtype=raw)

    def tofile(self, fout):
        """Called once by GGUFWriter.write_tensors_to_file at this tensor's data offset."""
        rows_per_chunk = max(1, CHUNK_BYTES // max(1, self.width * 4))
        bar = None
        if self._progress and self.nbytes >= PROGRESS_MIN_BYTES:
            from tqdm import tqdm
            # disable=None: a bar on a terminal, silence in logs and pipes.
            bar = tqdm(total=self.nbytes, unit="B", unit_scale=True, desc=self.name, leave=False,
                       disable=None)
        try:
            for start in range(0, self.n_rows, rows_per_chunk):
                stop = min(self.n_rows, start + rows_per_chunk)
                rows = self._read_rows(start, stop)
                if rows.shape != (stop - start, self.width):
                    raise ValueError(f"tensor {self.name}: rows {start}:{stop} came back with shape "
                                     f"{rows.shape}, expected {(stop - start, self.width)}")
                data = encode_rows(rows, self.qtype)
                data.tofile(fout)
                if bar is not None:
                    bar.update(data.nbytes)
        finally:
            if bar is not None:
                bar.close()


def add_matrix(writer: gguf.GGUFWriter, name: str, values: np.ndarray,
               qtype: gguf.GGMLQuantizationType, progress: bool = True):
    """Add an in-memory 2-D float array (numpy order [rows, width]) encoded as `qtype`.

    1-D tensors (norm scales) are added with `writer.add_tensor` as float32: llama.cpp keeps
    them unquantized.
    """
    values = np.asarray(values, dtype=np.float32)
    StreamedTensor(name, values.shape[0], values.shape[1], qtype,
                   lambda a, b: values[a:b], progress).add_to(writer)


# general.file_type of a backbone whose matrices are all stored as one type (llama.h's enum).
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}


def matrix_qtype(outtype: str, width: int) -> gguf.GGMLQuantizationType:
    """Storage of a matrix with rows of `width` values for a backbone `outtype`: Q8_0 rows that
    are not whole blocks stay F16, as llama.cpp's own converter keeps them."""
    qtype = QTYPES[outtype]
    if qtype == QTYPES["q8_0"] and width % gguf.GGML_QUANT_SIZES[qtype][0]:
        return QTYPES["f16"]
    return qtype


def restore_gguf(src: Path, dest: Path, outtype: str, progress: bool = True) -> None:
    """Write `dest`: the GGUF `src` with every matrix re-stored as `outtype` (f32, f16, q8_0),
    dequantized from its own type first; vectors, tensor order and every metadata key are kept
    (general.file_type set to match), so stock llama.cpp runs it as it ran `src`.

    Why: for a quantized weight ggml's CPU matmul rounds its input to 8 bits per block of 32,
    which torch (fp32 activations) cannot follow; for F16 weights it rounds the input to F16 only,
    and the two backends compute one function (docs/agreement.md). The default MODEL_DIR stores
    the shipped Q4_1 weights this way (constants.DEFAULT_MODEL_OUTTYPE)."""
    if outtype not in FILE_TYPES:
        raise ValueError(f"--outtype {outtype!r} is not one of {', '.join(FILE_TYPES)}")
    reader = gguf.GGUFReader(str(src))
    writer = copy_metadata(reader, skip=(gguf.Keys.General.FILE_TYPE,))
    writer.add_file_type(FILE_TYPES[outtype])
    for t in reader.tensors:
        kind = gguf.GGMLQuantizationType(t.tensor_type)
        shape = [int(x) for x in reversed(t.shape)]            # numpy order: [rows, width]
        if len(shape) == 1:
            writer.add_tensor(t.name, np.asarray(t.data, np.float32).reshape(shape))
            continue

        def rows(a, b, t=t, kind=kind, shape=shape):
            return as_float32(t.data.reshape(shape[0], -1)[a:b], kind).reshape(b - a, shape[1])

        StreamedTensor(t.name, shape[0], shape[1], matrix_qtype(outtype, shape[1]), rows,
                       progress).add_to(writer)
    write_gguf(writer, dest)


def write_gguf(writer: gguf.GGUFWriter, dest: Path, finish: Callable[[Path], None] | None = None):
    """Write `writer` to `dest` atomically: into a temporary file beside it, then renamed.

    `finish(tmp_path)` runs on the complete temporary file before the rename (e.g. to patch a
    checksum into the header), so a reader never sees a half-written or unpatched file.
    """
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    out = dest.with_name(f".{dest.name}.{os.getpid()}.out")
    try:
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()
        if finish is not None:
            finish(tmp)
        _copy_in_large_writes(tmp, out)
        os.replace(out, dest)
    finally:
        writer.close()
        for f in (tmp, out):
            if f.exists():
                f.unlink()


# One write() per this many bytes when a GGUF is laid down for good (_copy_in_large_writes).
LARGE_WRITE = 64 << 20


def _copy_in_large_writes(src: Path, dest: Path):
    """Copy `src` to `dest` in writes of LARGE_WRITE bytes. Why: the kernel's page cache keeps a
    file in folios as large as the writes that made it, and llama.cpp maps the weights from that
    cache; a file laid down by gguf-py's tensor-sized writes came out in small pages and decoded
    F16 weights at 35-37 tok/s, the same bytes written 64 MB at a time at 44 (2 MB pages, fewer
    TLB misses; docs/benchmarks.md). The copy costs a second pass over the file at convert time."""
    with open(src, "rb") as f, open(dest, "wb") as g:
        while chunk := f.read(LARGE_WRITE):
            g.write(chunk)
