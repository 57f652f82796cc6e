"""The Engram sidecar GGUF (engram.gguf of a MODEL_DIR): validated, then memory-mapped.

`open_sidecar` checks a sidecar on top of the header scan (architecture, format version, every
key, every tensor's type and shape against the hash layout its configuration implies) and
memory-maps it: tables are handed to the native kernel as views, never read whole.
`Sidecar.compute_fingerprint` streams the hash configuration and the table bytes through the
model fingerprint (formats.fingerprint); `verify_fingerprint` compares it with the stored one,
which catches silent corruption of table data.

Checks on every open (`open_sidecar(verify=True)`, the default), so no damaged model runs:
  * every count and shape the hash layout depends on is checked against the tensor directory
    before the layout is built (its prime search is bounded by what the file holds), so a
    flipped bit in a count is an error, never a hang;
  * no key outside `general.*` that engram-local does not know (a flipped bit in a key's name
    is refused, so it cannot hide the integrity key);
  * the integrity hash (constants.KEY_INTEGRITY, written by convert; files converted before it
    existed carry none): xxh3_64 of the header (with the fingerprint and integrity values
    zeroed) and every tensor but the tables - w_k, w_v, norms, conv, hash constants, canonical
    map; a few MB, ~1 ms;
  * the fingerprint (the tables): re-hashed on every open when the tables are small
    (<= ALWAYS_HASH_TABLE_BYTES; the default model's 20 MB take ~3 ms), otherwise on the first
    open of each file identity (path, device, inode, size, mtime, ctime), recorded in a cache
    (`$XDG_CACHE_HOME/engram-local/verified/`); `inspect --verify` always re-hashes.
"""

from __future__ import annotations

import json
import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gguf
import numpy as np

from engram_local import constants
from engram_local.formats.fingerprint import FingerprintLayer, fingerprint
from engram_local.formats.header import (GGUFFormatError, GGUFHeader, TensorInfo, describe_arch_mismatch,
                                         scan_gguf, tensor_view)

ALWAYS_HASH_TABLE_BYTES = 256 << 20
# Every key a sidecar may carry besides general.*.
SIDECAR_KEYS = frozenset((
    constants.KEY_FORMAT_VERSION, constants.KEY_FINGERPRINT, constants.KEY_INTEGRITY,
    constants.KEY_SOURCE_DIGEST, constants.KEY_BACKBONE_ARCH, constants.KEY_HIDDEN, constants.KEY_LAYER_IDS,
    constants.KEY_WRITE_LAYER, constants.KEY_MAX_NGRAM, constants.KEY_N_HEAD, constants.KEY_HEAD_DIM,
    constants.KEY_VOCAB_PER_NGRAM, constants.KEY_COMPRESSED_VOCAB, constants.KEY_PAD_ID, constants.KEY_SEED,
    constants.KEY_KERNEL_SIZE, constants.KEY_NORM_EPS))

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
        return tensor_view(info, self._bytes()[info.offset:info.offset + info.nbytes])

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
        """The model fingerprint (formats.fingerprint) of this file's hash configuration and table
        bytes, streamed from the file mapping."""
        def layers():
            for layer in self.settings["layer_ids"]:
                info = self.header.tensors[self.table_name(layer)]
                hash_args = {role: self.tensor(name.format(layer=layer)) for role, name in (
                    ("multipliers", constants.TENSOR_MULTIPLIERS), ("primes", constants.TENSOR_PRIMES),
                    ("offsets", constants.TENSOR_OFFSETS))}
                yield FingerprintLayer(layer, info.qtype, info.shape[1], info.shape[0], hash_args,
                                       self._bytes()[info.offset:info.offset + info.nbytes])

        return fingerprint(self.settings, self.canonical_map(), layers())

    def verify_fingerprint(self):
        """Raise GGUFFormatError when the stored fingerprint (the tables) or the stored integrity
        hash (everything else) does not match the file's content."""
        self.verify_integrity()
        self._verify_tables()

    def _verify_tables(self):
        actual = self.compute_fingerprint()
        if actual != self.fingerprint:
            raise GGUFFormatError(f"{self.path}: fingerprint mismatch: stored {self.fingerprint:#018x}, "
                                  f"content hashes to {actual:#018x}; the file is corrupt or was "
                                  "modified (re-create it with `engram-local convert`)")

    def compute_integrity(self) -> int:
        """xxh3_64 of the header bytes (the fingerprint and integrity values zeroed) and of every
        tensor except the memory tables, in file order: all that changes the model's function
        besides the tables, which the fingerprint covers."""
        import xxhash

        data = self._bytes()
        head = bytearray(data[:self.header.data_offset])
        for key in (constants.KEY_FINGERPRINT, constants.KEY_INTEGRITY):
            at = self.header.scalar_offsets.get(key)
            if at is not None:
                head[at:at + 8] = bytes(8)
        h = xxhash.xxh3_64(bytes(head))
        tables = {self.table_name(layer) for layer in self.settings["layer_ids"]}
        for info in sorted(self.header.tensors.values(), key=lambda t: t.offset):
            if info.name not in tables:
                h.update(data[info.offset:info.offset + info.nbytes])
        return h.intdigest()

    def verify_integrity(self):
        """Raise GGUFFormatError when the file carries an integrity hash its content does not match
        (files converted before KEY_INTEGRITY existed carry none: only the fingerprint checks them)."""
        stored = self.header.fields.get(constants.KEY_INTEGRITY)
        if stored is None:
            return
        self.header.typed(constants.KEY_INTEGRITY, "uint")
        actual = self.compute_integrity()
        if actual != stored:
            raise GGUFFormatError(f"{self.path}: integrity hash mismatch: stored {stored:#018x}, content "
                                  f"hashes to {actual:#018x}; the file is corrupt or was modified "
                                  "(re-create it with `engram-local convert`)")

    def table_bytes(self) -> int:
        return sum(self.header.tensors[self.table_name(layer)].nbytes for layer in self.settings["layer_ids"])

    def verify_on_open(self):
        """The checks of every open: the integrity hash, and the fingerprint when the tables are
        small or this file identity was not verified before (then recorded)."""
        self.verify_integrity()
        if self.table_bytes() <= ALWAYS_HASH_TABLE_BYTES:
            self._verify_tables()
            return
        record = _verified_record(self.path)
        identity = _identity(self.path, self.fingerprint)
        if record is not None and _read_json(record) == identity:
            return
        self._verify_tables()
        if record is not None:
            _write_json(record, identity)

    def close(self):
        """Drop this object's mapping (views handed out keep theirs alive)."""
        self._data = None
        self._mmap = None


def open_sidecar(path: str | os.PathLike, verify: bool = True) -> Sidecar:
    """Validate and map an Engram sidecar; every problem raises GGUFFormatError with the path.

    `verify` (default) also checks the content hashes (`Sidecar.verify_on_open`); only convert
    opens without it, to compute the hashes of its finished temporary file and patch them in."""
    from engram_local.native.hashing import NgramHashLayout

    header = scan_gguf(path)
    where = header.path
    if header.architecture != constants.SIDECAR_ARCH:
        raise GGUFFormatError(describe_arch_mismatch(header, "an Engram sidecar (general.architecture "
                                                             f"{constants.SIDECAR_ARCH!r})"))
    version = header.typed(constants.KEY_FORMAT_VERSION, "uint")
    if version > constants.SIDECAR_FORMAT_VERSION:
        raise GGUFFormatError(f"{where}: Engram sidecar format version {version} is newer than this "
                              f"engram-local reads ({constants.SIDECAR_FORMAT_VERSION}): upgrade engram-local")
    if version != constants.SIDECAR_FORMAT_VERSION:
        raise GGUFFormatError(f"{where}: Engram sidecar format version {version} is not supported "
                              f"(this engram-local reads version {constants.SIDECAR_FORMAT_VERSION}); "
                              "re-create the model directory with `engram-local convert`")

    unknown = sorted(k for k in header.fields if k not in SIDECAR_KEYS and not k.startswith("general."))
    if unknown:
        raise GGUFFormatError(f"{where}: unexpected key {unknown[0]!r} in an Engram sidecar (damaged, or "
                              "written by a newer engram-local)")
    # EngramConfig's fields (engram_local.model.engram), read without importing torch.
    settings = dict(
        hidden_size=header.typed(constants.KEY_HIDDEN, "uint"),
        compressed_vocab_size=header.typed(constants.KEY_COMPRESSED_VOCAB, "uint"),
        pad_id=header.typed(constants.KEY_PAD_ID, "uint"),
        layer_ids=list(header.typed(constants.KEY_LAYER_IDS, "int_list")),
        write_layer=header.typed(constants.KEY_WRITE_LAYER, "int"),
        max_ngram_size=header.typed(constants.KEY_MAX_NGRAM, "uint"),
        n_head_per_ngram=header.typed(constants.KEY_N_HEAD, "uint"),
        head_dim=header.typed(constants.KEY_HEAD_DIM, "uint"),
        vocab_size_per_ngram=list(header.typed(constants.KEY_VOCAB_PER_NGRAM, "int_list")),
        seed=header.typed(constants.KEY_SEED, "uint"),
        kernel_size=header.typed(constants.KEY_KERNEL_SIZE, "uint"),
        norm_eps=float(header.typed(constants.KEY_NORM_EPS, "float")))
    try:
        _check_counts(header, settings)
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
                      fingerprint=header.typed(constants.KEY_FINGERPRINT, "uint"),
                      source_digest=header.typed(constants.KEY_SOURCE_DIGEST, "str", required=False),
                      backbone_arch=header.typed(constants.KEY_BACKBONE_ARCH, "str"),
                      settings=settings, layout=layout)
    _check_sidecar_tensors(sidecar)
    if verify:
        sidecar.verify_on_open()
    return sidecar


def _check_counts(header: GGUFHeader, settings: dict):
    """The counts the hash layout is built from, against the tensor directory, before any work
    that depends on them: N and K must match each layer's multipliers and primes tensors, and
    the per-order table sizes must fit in the layer's table (primes start above them), so the
    layout's prime search is bounded by what the file holds."""
    N, K = settings["max_ngram_size"], settings["n_head_per_ngram"]
    layers, sizes = settings["layer_ids"], settings["vocab_size_per_ngram"]
    if not layers or len(set(layers)) != len(layers):
        raise ValueError(f"layer ids {layers[:8]} must be distinct and non-empty")
    if N < 2 or K < 1 or len(sizes) != N - 1 or min(sizes) < 2:
        raise ValueError(f"max_ngram_size {N}, n_head_per_ngram {K} and vocab_size_per_ngram "
                         f"{sizes[:8]} do not describe a hash layout")
    for layer in layers:
        shapes = {role: header.tensors[name.format(layer=layer)].shape
                  for role, name in (("multipliers", constants.TENSOR_MULTIPLIERS),
                                     ("primes", constants.TENSOR_PRIMES), ("table", constants.TENSOR_TABLE))
                  if name.format(layer=layer) in header.tensors}
        if len(shapes) != 3:
            raise ValueError(f"layer {layer} lacks its table, multipliers or primes tensor")
        if shapes["multipliers"] != (N,) or shapes["primes"] != ((N - 1) * K,):
            raise ValueError(f"layer {layer}: max_ngram_size {N} and n_head_per_ngram {K} disagree with "
                             f"its tensors (multipliers {list(shapes['multipliers'])}, primes "
                             f"{list(shapes['primes'])})")
        if len(shapes["table"]) != 2 or K * sum(sizes) > shapes["table"][1]:
            raise ValueError(f"layer {layer}: {K} heads of table sizes {sizes} do not fit its table of "
                             f"{shapes['table'][-1]} rows")


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "engram-local" / "verified"


def _verified_record(path: Path) -> Path | None:
    import xxhash

    try:
        d = _cache_dir()
        d.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return d / f"{xxhash.xxh3_64_hexdigest(os.fsencode(os.path.realpath(path)))}.json"


def _identity(path: Path, fingerprint: int) -> dict:
    st = os.stat(path)
    return {"path": os.path.realpath(path), "dev": st.st_dev, "ino": st.st_ino, "size": st.st_size,
            "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "fingerprint": fingerprint}


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, doc: dict):
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, path)
    except OSError:
        pass
    finally:
        if tmp.exists():
            tmp.unlink()


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
