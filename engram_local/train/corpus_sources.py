"""The corpus sources: each text read out of its fetched package (R lazy-load data, a dictd
database, a MediaWiki XML dump, reST sources), cleaned into documents, with its license evidence
quoted from the package. engram_local.train.corpus splits and writes them.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import re
import struct
import warnings
import xml.etree.ElementTree as ET
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from engram_local.train.corpus_fetch import (DEB_DICT_DEVIL, DEB_JANEAUSTENR, DEB_PYTHON_DOC,
                                             DEB_TOKENIZERS, WHEEL_GENSIM, CorpusBuildError, Fetched)
from engram_local.train.corpus_text import (
    MIN_WIKI_ARTICLE_CHARS,
    Document,
    clean_book_paragraphs,
    clean_rst,
    clean_wikitext,
    rst_section_labels,
    sha256_bytes,
    split_paragraphs,
    strip_gutenberg_boilerplate,
)

AUSTEN_NOVELS = (  # (R object name, title), in publication order
    ("sensesensibility", "Sense and Sensibility"),
    ("prideprejudice", "Pride and Prejudice"),
    ("mansfieldpark", "Mansfield Park"),
    ("emma", "Emma"),
    ("northangerabbey", "Northanger Abbey"),
    ("persuasion", "Persuasion"),
)
WIKI_MEMBER = ("gensim/test/test_data/"
               "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
R_LIB = "usr/lib/R/site-library"


def r_data_files(r_package: str) -> list[str]:
    """The R lazy-load data files (.rdx, .rdb) of an installed R package, relative to the root."""
    return [f"{R_LIB}/{r_package}/data/Rdata.rdx", f"{R_LIB}/{r_package}/data/Rdata.rdb"]


# =========================================================================== source parsers
def read_r_lazyload(rdx: Path, rdb: Path) -> dict[str, object]:
    """Read every variable of an R lazy-load database (``data/Rdata.rdx`` + ``Rdata.rdb``, what
    R installs for ``LazyData: true`` packages) with the PyPI package ``rdata``.

    The .rdx is a gzip-compressed RDS holding ``variables`` (name -> [offset, length] in the .rdb)
    and ``compressed``; each .rdb record is a 4-byte big-endian length followed by a zlib stream
    (compressed = 1), or by a type byte and a bzip2/xz stream (2/3)."""
    try:
        import rdata
    except ImportError as e:  # pragma: no cover - environment dependent
        raise CorpusBuildError("the PyPI package `rdata` is needed to read R data files: "
                               "pip install 'engram-local[train]'") from e

    def convert(raw: bytes):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return rdata.conversion.convert(rdata.parser.parse_data(raw))

    index = convert(gzip.decompress(rdx.read_bytes()))
    compressed = int(list(index["compressed"])[0]) if "compressed" in index else 1
    blob = rdb.read_bytes()
    out = {}
    for name, (off, length) in index["variables"].items():
        rec = blob[int(off):int(off) + int(length)]
        n = struct.unpack(">I", rec[:4])[0]
        if compressed == 1:
            raw = zlib.decompress(rec[4:])
        else:
            kind, payload = rec[4:5], rec[5:]
            raw = {b"2": bz2.decompress, b"Z": lzma.decompress, b"0": bytes}[kind](payload)
        if len(raw) != n:
            raise CorpusBuildError(f"{rdb}: record {name} decompressed to {len(raw)} bytes, "
                                   f"header says {n}")
        out[str(name)] = convert(raw)
    return out


_CHAPTER = re.compile(r"^(CHAPTER|Chapter|VOLUME|Volume|Epilogue|EPILOGUE|ETYMOLOGY|EXTRACTS)\b")


def parse_austen(root: Path) -> list[Document]:
    data = read_r_lazyload(*(root / f for f in r_data_files("janeaustenr")))
    docs = []
    for key, title in AUSTEN_NOVELS:
        if key not in data:
            raise CorpusBuildError(f"r-cran-janeaustenr: no R object {key!r} ({title})")
        text = "\n".join(str(x) for x in data[key])
        paras = clean_book_paragraphs(split_paragraphs(text), stop_at=("A NOTE ON THE TEXT",))
        docs.append(Document("austen", title, paras, _CHAPTER))
    return docs


def parse_mobydick(root: Path) -> tuple[list[Document], str]:
    data = read_r_lazyload(*(root / f for f in r_data_files("tokenizers")))
    if "mobydick" not in data:
        raise CorpusBuildError("r-cran-tokenizers: no R object 'mobydick'")
    raw = str(list(data["mobydick"])[0])
    body = strip_gutenberg_boilerplate(raw)
    paras = clean_book_paragraphs(split_paragraphs(body),
                                  skip=("Original Transcriber's Notes:", "ETYMOLOGY."))
    return [Document("mobydick", "Moby Dick", paras, _CHAPTER)], raw


_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def dictd_b64(s: str) -> int:
    """dictd index numbers: base64 digits, most significant first."""
    n = 0
    for ch in s:
        n = n * 64 + _B64.index(ch)
    return n


def parse_dictd(index_text: str, data: bytes) -> list[tuple[str, str]]:
    """(headword, entry text) for each distinct entry of a dictd database, in file order,
    skipping the ``00database*`` metadata entries."""
    seen = {}
    for line in index_text.splitlines():
        parts = line.split("\t")
        if len(parts) < 3 or parts[0].startswith(("00database", "00-database")):
            continue
        off, length = dictd_b64(parts[1]), dictd_b64(parts[2])
        seen.setdefault((off, length), parts[0])
    out = []
    for (off, length) in sorted(seen):
        raw = data[off:off + length]
        try:
            txt = raw.decode("utf-8")
        except UnicodeDecodeError:
            txt = raw.decode("latin-1")
        out.append((seen[(off, length)], txt))
    return out


def parse_devil(root: Path) -> list[Document]:
    base = root / "usr/share/dictd"
    data = gzip.decompress((base / "devil.dict.dz").read_bytes())   # dictzip is gzip-compatible
    entries = parse_dictd((base / "devil.index").read_text("utf-8", "replace"), data)
    docs = []
    for head, txt in entries:
        txt = re.sub(r"\{([^{}\n]+)\}", r"\1", txt)    # dictd cross-reference braces: {HUSBAND}
        paras = clean_book_paragraphs(split_paragraphs(txt))
        if paras:
            docs.append(Document("devil", head, paras))
    return docs


def parse_wikipedia(xml_bytes: bytes) -> tuple[list[Document], list[dict]]:
    """Main-namespace, non-redirect articles of a MediaWiki XML dump; disambiguation pages and
    lists are skipped.  Returns the documents and attribution records (title, revision id)."""
    root = ET.fromstring(xml_bytes)
    ns = {"m": root.tag[1:].split("}")[0]} if root.tag.startswith("{") else {"m": ""}
    q = (lambda t: f"m:{t}") if ns["m"] else (lambda t: t)
    docs, attribution = [], []
    for page in root.findall(q("page"), ns):
        title = page.findtext(q("title"), "", ns)
        if page.findtext(q("ns"), "0", ns) != "0" or page.find(q("redirect"), ns) is not None:
            continue
        if "(disambiguation)" in title or title.startswith("List of"):
            continue
        rev = page.find(q("revision"), ns)
        text = rev.findtext(q("text"), "", ns) if rev is not None else ""
        if re.match(r"\s*#REDIRECT", text, re.I) or re.search(r"\{\{\s*disambig", text, re.I):
            continue
        paras = clean_wikitext(text)
        if sum(len(p) for p in paras) < MIN_WIKI_ARTICLE_CHARS:
            continue
        docs.append(Document("wikipedia", title, [title] + paras))
        attribution.append({"title": title, "revision_id": rev.findtext(q("id"), "", ns),
                            "timestamp": rev.findtext(q("timestamp"), "", ns)})
    return docs, attribution


def parse_python_tutorial(root: Path) -> tuple[list[Document], list[str]]:
    tut = root / "usr/share/doc/python3.11/html/_sources/tutorial"
    files = sorted(p for p in tut.glob("*.rst.txt") if p.name != "index.rst.txt")
    if not files:
        raise CorpusBuildError(f"python3.11-doc: no tutorial sources under {tut}")
    texts = {p: p.read_text("utf-8") for p in files}
    refs: dict[str, str] = {}
    for t in texts.values():
        refs.update(rst_section_labels(t))
    docs = []
    for p in files:
        paras = clean_rst(texts[p], refs)
        if paras:
            docs.append(Document("python_tutorial", p.name.removesuffix(".rst.txt"), paras))
    return docs, [str(p.relative_to(root)) for p in files]


# =========================================================================== licenses
def quote_lines(text: str, patterns: Sequence[str | tuple[str, int]], where: str) -> list[str]:
    """License evidence quoted in the manifest: for each regex, the first line of ``text`` that
    matches it (a ``(regex, n)`` pair quotes n lines from there, joined with spaces), stripped.
    A missing pattern is an error: the package's license statement is not what was checked."""
    lines = text.replace("\ufeff", "").splitlines()
    out = []
    for pat in patterns:
        rx, n = (pat, 1) if isinstance(pat, str) else pat
        idx = next((i for i, ln in enumerate(lines) if re.search(rx, ln)), None)
        if idx is None:
            raise CorpusBuildError(f"license check failed: no line matching {rx!r} in {where}")
        out.append(" ".join(ln.strip() for ln in lines[idx:idx + n]))
    return out


# =========================================================================== sources
@dataclass
class Source:
    id: str
    title: str
    license_id: str                # short form for tables
    role: str                      # "train" (train + valid) or "ood"
    split: str                     # "tail" | "hash" | "none"
    package: dict
    files: list[str]
    license: str
    license_evidence: list[dict]
    docs: list[Document]
    input_sha256: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)


def _source_austen(fx: Fetched) -> Source:
    pkg = DEB_JANEAUSTENR
    root = fx.roots[pkg.name]
    crel, ctext = fx.copyright(pkg)
    desc_rel = f"{R_LIB}/janeaustenr/DESCRIPTION"
    files = r_data_files("janeaustenr")
    return Source(
        "austen", "Jane Austen, the six completed novels (1811-1818)",
        "public domain (code: MIT)", "train", "tail", fx.deb_info(pkg), files,
        "Public domain (novels published 1811-1818; Austen died 1817; the package's help pages "
        "say the text was sourced from Project Gutenberg). Package code: MIT.",
        [{"file": crel, "lines": quote_lines(ctext, [r"^License:"], crel)},
         {"file": desc_rel, "lines": quote_lines(
             (root / desc_rel).read_text("utf-8"), [r"^License:", (r"Full texts for", 4)],
             desc_rel)}],
        parse_austen(root), fx.hashes(pkg, files))


def _source_mobydick(fx: Fetched) -> Source:
    pkg = DEB_TOKENIZERS
    crel, ctext = fx.copyright(pkg)
    files = r_data_files("tokenizers")
    docs, raw = parse_mobydick(fx.roots[pkg.name])
    return Source(
        "mobydick", "Herman Melville, Moby Dick; or The Whale (1851)",
        "public domain (code: MIT)", "train", "tail", fx.deb_info(pkg), files,
        "Public domain (published 1851; Project Gutenberg eBook #2701, whose header and license "
        "footer are stripped). Package code: MIT.",
        [{"file": crel, "lines": quote_lines(ctext, [r"^License:"], crel)},
         {"file": files[1] + " (R object mobydick)", "lines": quote_lines(
             raw, [r"Project Gutenberg EBook of Moby Dick", (r"for the use of anyone", 4)],
             "mobydick")}],
        docs, fx.hashes(pkg, files))


def _source_wikipedia(fx: Fetched) -> Source:
    meta_name = f"gensim-{WHEEL_GENSIM.version}.dist-info/METADATA"
    with zipfile.ZipFile(fx.wheel) as z:
        try:
            member = z.read(WIKI_MEMBER)
            meta = z.read(meta_name).decode("utf-8")
        except KeyError as e:
            raise CorpusBuildError(f"{fx.wheel.name} has no {e.args[0]}") from e
    xml_bytes = bz2.decompress(member)
    docs, attribution = parse_wikipedia(xml_bytes)
    head = xml_bytes[:4000].decode("utf-8", "replace")
    newest = max(a["timestamp"][:10] for a in attribution)
    return Source(
        "wikipedia", f"English Wikipedia sample, {len(docs)} articles (revisions up to {newest})",
        "CC BY-SA 3.0 / GFDL", "train", "hash",
        {"type": "pypi", "name": WHEEL_GENSIM.name, "version": WHEEL_GENSIM.version,
         "file": WHEEL_GENSIM.filename, "file_sha256": WHEEL_GENSIM.sha256},
        [WIKI_MEMBER],
        "CC BY-SA 3.0 (and GFDL), Wikipedia's text license; authors: Wikipedia contributors "
        "(article titles and revision ids listed under attribution). gensim ships it as test "
        "data without a separate license statement; gensim's own license is LGPL-2.1-only.",
        [{"file": meta_name, "lines": quote_lines(meta, [r"^License:"], meta_name)},
         {"file": WIKI_MEMBER, "lines": quote_lines(
             head, [r"<sitename>", r"<base>", r"<generator>"], WIKI_MEMBER)}],
        docs, {WIKI_MEMBER: sha256_bytes(member)}, {"attribution": attribution})


def _source_devil(fx: Fetched) -> Source:
    pkg = DEB_DICT_DEVIL
    crel, ctext = fx.copyright(pkg)
    files = ["usr/share/dictd/devil.dict.dz", "usr/share/dictd/devil.index"]
    return Source(
        "devil", "Ambrose Bierce, The Devil's Dictionary (1911)", "public domain", "train",
        "hash", fx.deb_info(pkg), files, "Public domain.",
        [{"file": crel, "lines": quote_lines(
            ctext, [(r"is in the public domain", 2), r"Public Domain Text"], crel)}],
        parse_devil(fx.roots[pkg.name]), fx.hashes(pkg, files))


def _source_python_tutorial(fx: Fetched) -> Source:
    pkg = DEB_PYTHON_DOC
    root = fx.roots[pkg.name]
    crel, ctext = fx.copyright(pkg)
    docs, files = parse_python_tutorial(root)
    lic_rel = "usr/share/doc/python3.11/html/_sources/license.rst.txt"
    return Source(
        "python_tutorial", "The Python Tutorial (Python 3.11 documentation), prose only",
        "PSF-2.0", "ood", "none", fx.deb_info(pkg), files,
        "PSF License Agreement (Python software and documentation); code examples also 0BSD. "
        "Copyright 2001-2023 Python Software Foundation.",
        [{"file": crel, "lines": quote_lines(
            ctext, [r"^PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2",
                    (r"^1\. This LICENSE AGREEMENT is between", 4)], crel)},
         {"file": lic_rel, "lines": quote_lines(
             (root / lic_rel).read_text("utf-8"),
             [(r"^Python software and documentation are licensed under the", 2),
              (r"^Starting with Python .*examples, recipes", 3)], lic_rel)}],
        docs, fx.hashes(pkg, files))


# In this order in the manifest.  Training sources first, then the out-of-domain text.
SOURCE_BUILDERS: tuple[tuple[str, Callable[[Fetched], Source]], ...] = (
    ("austen", _source_austen),
    ("mobydick", _source_mobydick),
    ("wikipedia", _source_wikipedia),
    ("devil", _source_devil),
    ("python_tutorial", _source_python_tutorial),
)
