"""Engram checkpoint -> Engram sidecar GGUF (docs/convert.md lists every key and tensor).

The sidecar holds what the backbone GGUF cannot: each Engram layer's memory table as its own
2-D tensor in the chosen storage type, the projections, norms and conv, and every constant the
N-gram hash needs (canonical id map, multipliers, primes, offsets as tensors; N, K, pad id,
layer ids as keys), so hashing needs neither the tokenizer object nor a prime search. Tables
stream from the checkpoint a chunk of rows at a time. The fingerprint (the tables) and the
integrity hash (header and every other tensor) are computed over the finished file and patched
into its header before the file is renamed into place.
"""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np

from engram_local import constants

from .tensors import QTYPES, StreamedTensor, check_row_width, write_gguf

ENGRAM_WEIGHTS = "engram.safetensors"


def write_sidecar(checkpoint_dir: Path, dest: Path, *, table_type: str, backbone_arch: str,
                  vocab_size: int, source_digest: str | None = None, progress: bool = True) -> int:
    """Write the sidecar of the Engram checkpoint in `checkpoint_dir`; returns its fingerprint.

    vocab_size: token ids of the backbone. A canonical map shorter than that (the tokenizer's
    length below an embedding padded for speed) is extended with the pad id: those ids are no
    token's, so no text produces them.
    """
    from safetensors import safe_open

    from engram_local.model.engram import read_engram_config

    checkpoint_dir = Path(checkpoint_dir)
    if table_type not in constants.TABLE_QTYPES:
        raise ValueError(f"table type {table_type!r} is not one of {', '.join(constants.TABLE_QTYPES)}")
    qtype = QTYPES[table_type]
    cfg = read_engram_config(checkpoint_dir)
    check_row_width(qtype, cfg.head_dim, f"--table-type {table_type}: the Engram head dim")
    layout = cfg.layout()
    weights_path = checkpoint_dir / ENGRAM_WEIGHTS
    D, E = cfg.hidden_size, cfg.memory_dim

    with safe_open(str(weights_path), framework="pt") as st:
        keys = set(st.keys())

        def tensor(key: str, shape: tuple[int, ...]) -> np.ndarray:
            if key not in keys:
                raise ValueError(f"{weights_path}: missing tensor {key!r}")
            value = st.get_tensor(key)
            if tuple(value.shape) != shape:
                raise ValueError(f"{weights_path}: {key!r} has shape {tuple(value.shape)}, "
                                 f"the Engram configuration implies {shape}")
            return value.float().numpy() if value.is_floating_point() else value.numpy()

        if "canonical_map" not in keys:
            raise ValueError(f"{weights_path}: missing tensor 'canonical_map'")
        cmap = st.get_tensor("canonical_map").numpy().astype(np.int64)
        if cmap.ndim != 1 or len(cmap) > vocab_size:
            raise ValueError(f"{weights_path}: the canonical map covers {len(cmap)} token ids, the "
                             f"backbone has {vocab_size}: these Engram weights belong to another tokenizer")
        if cmap.size and (cmap.min() < 0 or cmap.max() >= cfg.compressed_vocab_size):
            raise ValueError(f"{weights_path}: canonical ids outside [0, {cfg.compressed_vocab_size})")
        cmap = np.concatenate([cmap, np.full(vocab_size - len(cmap), cfg.pad_id, np.int64)])

        w = gguf.GGUFWriter(None, constants.SIDECAR_ARCH)
        w.add_custom_alignment(constants.SIDECAR_ALIGNMENT)
        w.add_uint32(constants.KEY_FORMAT_VERSION, constants.SIDECAR_FORMAT_VERSION)
        w.add_uint64(constants.KEY_FINGERPRINT, 0)          # patched once the file is complete
        w.add_uint64(constants.KEY_INTEGRITY, 0)            # likewise
        if source_digest:
            w.add_string(constants.KEY_SOURCE_DIGEST, source_digest)
        w.add_string(constants.KEY_BACKBONE_ARCH, backbone_arch)
        w.add_uint32(constants.KEY_HIDDEN, D)
        w.add_array(constants.KEY_LAYER_IDS, [int(l) for l in cfg.layer_ids])
        w.add_int32(constants.KEY_WRITE_LAYER, int(cfg.write_layer))
        w.add_uint32(constants.KEY_MAX_NGRAM, cfg.max_ngram_size)
        w.add_uint32(constants.KEY_N_HEAD, cfg.n_head_per_ngram)
        w.add_uint32(constants.KEY_HEAD_DIM, cfg.head_dim)
        w.add_array(constants.KEY_VOCAB_PER_NGRAM, [int(v) for v in layout.vocab_size_per_ngram])
        w.add_uint32(constants.KEY_COMPRESSED_VOCAB, cfg.compressed_vocab_size)
        w.add_uint32(constants.KEY_PAD_ID, cfg.pad_id)
        w.add_uint64(constants.KEY_SEED, cfg.seed)
        w.add_uint32(constants.KEY_KERNEL_SIZE, cfg.kernel_size)
        w.add_float64(constants.KEY_NORM_EPS, float(cfg.norm_eps))

        w.add_tensor(constants.TENSOR_CANONICAL_MAP, cmap)
        for layer in cfg.layer_ids:
            name = lambda n: n.format(layer=layer)   # noqa: E731
            rows = layout.rows_per_layer[layer]
            table_key = f"{layer}.table"
            if table_key not in keys:
                raise ValueError(f"{weights_path}: missing tensor {table_key!r}")
            if tuple(st.get_slice(table_key).get_shape()) != (rows, cfg.head_dim):
                raise ValueError(f"{weights_path}: {table_key!r} has shape "
                                 f"{tuple(st.get_slice(table_key).get_shape())}, the hash layout "
                                 f"implies {(rows, cfg.head_dim)}")
            StreamedTensor(name(constants.TENSOR_TABLE), rows, cfg.head_dim, qtype,
                           lambda a, b, k=table_key: st.get_slice(k)[a:b].float().numpy(),
                           progress).add_to(w)
            args = layout.kernel_args(layer)
            w.add_tensor(name(constants.TENSOR_MULTIPLIERS), args["multipliers"])
            w.add_tensor(name(constants.TENSOR_PRIMES), args["primes"])
            w.add_tensor(name(constants.TENSOR_OFFSETS), args["offsets"])
            w.add_tensor(name(constants.TENSOR_W_K), tensor(f"{layer}.w_k.weight", (D, E)))
            w.add_tensor(name(constants.TENSOR_W_V), tensor(f"{layer}.w_v.weight", (D, E)))
            for norm, tensor_name in (("norm_q", constants.TENSOR_NORM_Q), ("norm_k", constants.TENSOR_NORM_K),
                                      ("norm_v", constants.TENSOR_NORM_V)):
                w.add_tensor(name(tensor_name), tensor(f"{layer}.{norm}.weight", (D,)))
            conv = tensor(f"{layer}.conv.weight", (D, 1, cfg.kernel_size))
            w.add_tensor(name(constants.TENSOR_CONV), np.ascontiguousarray(conv[:, 0, :]))

        fingerprint = []
        write_gguf(w, dest, finish=lambda tmp: fingerprint.append(_patch_fingerprint(tmp)))
    return fingerprint[0]


def _patch_fingerprint(path: Path) -> int:
    """Validate the complete file (structure, not hashes: there are none yet), hash it and write
    the fingerprint (the tables) and the integrity hash (everything else) into its header."""
    from engram_local.formats.sidecar import open_sidecar

    sidecar = open_sidecar(path, verify=False)
    try:
        patches = [(sidecar.header.scalar_offsets[key], value) for key, value in (
            (constants.KEY_FINGERPRINT, sidecar.compute_fingerprint()),
            (constants.KEY_INTEGRITY, sidecar.compute_integrity()))]   # neither covers the other's bytes
    finally:
        sidecar.close()
    with open(path, "r+b") as f:
        for offset, value in patches:
            f.seek(offset)
            f.write(struct.pack("<Q", value))
    return patches[0][1]
