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
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import re
import shutil
import struct
import subprocess
import sys
import warnings
import xml.etree.ElementTree as ET
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from engram_local.train.corpus_text import (
    Chunk,
    Document,
    MAX_CHUNK_CHARS,
    MIN_WIKI_ARTICLE_CHARS,
    VALID_FRACTION,
    chunk_paragraphs,
    clean_book_paragraphs,
    clean_rst,
    clean_wikitext,
    format_documents,
    interleave,
    rst_section_labels,
    sha256_bytes,
    sha256_file,
    split_paragraphs,
    split_source,
    strip_gutenberg_boilerplate,
)

# --------------------------------------------------------------------------- parameters
CORPUS_FORMAT_VERSION = 1
DEFAULT_CACHE_DIR = Path("~/.cache/engram-local/corpus-src")


class CorpusBuildError(RuntimeError):
    """A source could not be downloaded, unpacked or parsed; the message names it."""


# --------------------------------------------------------------------------- package pins
@dataclass(frozen=True)
class DebPackage:
    name: str
    version: str             # pinned Debian version (bookworm); see _download_deb for fallback


@dataclass(frozen=True)
class WheelPackage:
    name: str
    version: str
    filename: str            # exact wheel file on PyPI
    sha256: str              # of the wheel file (PyPI files are immutable)
    pip_platform: tuple[str, ...] = ()   # pip download --platform/--python-version/... flags


DEB_JANEAUSTENR = DebPackage("r-cran-janeaustenr", "1.0.0-1")
DEB_TOKENIZERS = DebPackage("r-cran-tokenizers", "0.3.0-1")
DEB_DICT_DEVIL = DebPackage("dict-devil", "1.0-13.1")
DEB_PYTHON_DOC = DebPackage("python3.11-doc", "3.11.2-6+deb12u8")
# The gensim sdist holds the same test data, but `pip download` of an sdist builds its metadata
# (numpy/scipy/Cython build requirements: ~7 minutes); the wheel downloads in seconds.  The
# platform flags pin one wheel file whatever the host.
WHEEL_GENSIM = WheelPackage(
    "gensim", "4.3.3",
    "gensim-4.3.3-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl",
    "d662bf96e3d741b6ab61a54be842a7cbf5e45193008b2f4225c758cafd7f9cdc",
    ("--platform", "manylinux_2_17_x86_64", "--python-version", "3.11",
     "--implementation", "cp", "--abi", "cp311"),
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


# =========================================================================== downloads
def _run(cmd: Sequence[str], *, cwd: Path | None = None) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError as e:
        raise CorpusBuildError(
            f"command not found: {cmd[0]!r} (while running: {' '.join(cmd)})") from e


def _fail(what: str, cmd: Sequence[str], r: subprocess.CompletedProcess) -> CorpusBuildError:
    tail = "\n".join((r.stderr or r.stdout or "").strip().splitlines()[-8:])
    return CorpusBuildError(
        f"{what}\n  command: {' '.join(cmd)}\n  exit status: {r.returncode}\n  output:\n    "
        + tail.replace("\n", "\n    "))


def _deb_fields(deb: Path) -> dict[str, str]:
    cmd = ["dpkg-deb", "-f", str(deb), "Package", "Version", "Architecture"]
    r = _run(cmd)
    if r.returncode != 0:
        raise _fail(f"cannot read the control fields of {deb.name}", cmd, r)
    fields = {}
    for line in r.stdout.splitlines():
        k, _, v = line.partition(":")
        fields[k.strip()] = v.strip()
    return fields


def _find_deb(dest: Path, name: str, version: str | None) -> Path | None:
    found = []
    for p in sorted(dest.glob(f"{name}_*.deb")):
        f = _deb_fields(p)
        if f.get("Package") == name and (version is None or f.get("Version") == version):
            found.append(p)
    return found[-1] if found else None


_NO_LISTS = re.compile(r"Unable to locate package|has no installation candidate|"
                       r"Can't select (candidate )?version|Version '.*' for '.*' was not found|"
                       r"No packages found", re.I)


def _download_deb(pkg: DebPackage, dest: Path, log: Callable[[str], None]) -> Path:
    """``apt-get download name=version`` into ``dest`` (a cached .deb is reused).  When apt has no
    package lists, runs ``apt-get update`` once and retries.  If the pinned version is no longer
    on the mirror (e.g. replaced by a security update), falls back to the candidate version and
    says so; the manifest records the version actually used."""
    dest.mkdir(parents=True, exist_ok=True)
    hit = _find_deb(dest, pkg.name, pkg.version)
    if hit:
        return hit
    if shutil.which("apt-get") is None:
        raise CorpusBuildError(
            f"cannot download Debian package {pkg.name}={pkg.version}: apt-get is not available "
            f"(run on Debian/Ubuntu, or put {pkg.name}_{pkg.version}_*.deb into {dest})")
    apt = ["apt-get", "-q"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        apt += ["-o", "APT::Sandbox::User=root"]   # the _apt user may not write the cache dir
    updated = False
    for pinned in (True, False):
        spec = f"{pkg.name}={pkg.version}" if pinned else pkg.name
        cmd = apt + ["download", spec]
        before = set(dest.glob(f"{pkg.name}_*.deb"))
        r = _run(cmd, cwd=dest)
        if r.returncode != 0 and not updated and _NO_LISTS.search(r.stderr + r.stdout):
            why = _NO_LISTS.search(r.stderr + r.stdout).group(0)
            log(f"apt-get download {spec} failed ({why}); running apt-get update")
            ucmd = apt + ["update"]
            u = _run(ucmd)
            if u.returncode != 0:
                raise _fail(f"cannot download Debian package {pkg.name}: apt has no package lists "
                            "and `apt-get update` failed (it needs root and network access to a "
                            "Debian mirror)", ucmd, u)
            updated = True
            r = _run(cmd, cwd=dest)
        if r.returncode == 0:
            new = sorted(set(dest.glob(f"{pkg.name}_*.deb")) - before)
            got = new[-1] if new and not pinned else _find_deb(
                dest, pkg.name, pkg.version if pinned else None)
            if got is None:
                raise CorpusBuildError(f"`{' '.join(cmd)}` succeeded but no {pkg.name}_*.deb "
                                       f"appeared in {dest}")
            if not pinned:
                log(f"WARNING: {pkg.name} {pkg.version} is no longer on the mirror; used "
                    f"{_deb_fields(got)['Version']} instead (recorded in the manifest)")
            return got
        last = (cmd, r)
    raise _fail(f"cannot download Debian package {pkg.name} (pinned version {pkg.version})", *last)


def _extract_deb(deb: Path, dest: Path) -> Path:
    """``dpkg-deb -x`` into ``dest/<deb stem>`` (reused when already complete)."""
    out = dest / deb.stem
    marker = out / ".extracted"
    if marker.exists():
        return out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    cmd = ["dpkg-deb", "-x", str(deb), str(out)]
    r = _run(cmd)
    if r.returncode != 0:
        raise _fail(f"cannot unpack {deb.name}", cmd, r)
    marker.write_text(sha256_file(deb) + "\n")
    return out


def _download_wheel(pkg: WheelPackage, dest: Path) -> Path:
    """``pip download --no-deps --only-binary :all: <platform flags> name==version`` into ``dest``;
    the file's sha256 must match the pin."""
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / pkg.filename
    if not path.exists():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               *pkg.pip_platform, "--disable-pip-version-check", "-d", str(dest),
               f"{pkg.name}=={pkg.version}"]
        r = _run(cmd)
        if r.returncode != 0:
            raise _fail(f"cannot download PyPI package {pkg.name}=={pkg.version}", cmd, r)
        if not path.exists():
            raise CorpusBuildError(f"`{' '.join(cmd)}` did not produce {pkg.filename} in {dest}")
    digest = sha256_file(path)
    if digest != pkg.sha256:
        raise CorpusBuildError(f"{path} has sha256 {digest}, expected {pkg.sha256} "
                               "(delete it and rerun to download it again)")
    return path


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
                               "pip install rdata") from e

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
    data = read_r_lazyload(root / R_LIB / "janeaustenr/data/Rdata.rdx",
                           root / R_LIB / "janeaustenr/data/Rdata.rdb")
    docs = []
    for key, title in AUSTEN_NOVELS:
        if key not in data:
            raise CorpusBuildError(f"r-cran-janeaustenr: no R object {key!r} ({title})")
        text = "\n".join(str(x) for x in data[key])
        paras = clean_book_paragraphs(split_paragraphs(text), stop_at=("A NOTE ON THE TEXT",))
        docs.append(Document("austen", title, paras, _CHAPTER))
    return docs


def parse_mobydick(root: Path) -> tuple[list[Document], str]:
    data = read_r_lazyload(root / R_LIB / "tokenizers/data/Rdata.rdx",
                           root / R_LIB / "tokenizers/data/Rdata.rdb")
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


# =========================================================================== build
@dataclass
class _Source:
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


@dataclass
class _Fetched:
    """The downloaded packages: .deb files, their extraction roots, the gensim wheel."""
    debs: dict[str, Path]
    roots: dict[str, Path]
    wheel: Path

    def deb_info(self, pkg: DebPackage) -> dict:
        f = _deb_fields(self.debs[pkg.name])
        info = {"type": "debian", "name": pkg.name, "version": f["Version"],
                "architecture": f["Architecture"], "deb_sha256": sha256_file(self.debs[pkg.name])}
        if f["Version"] != pkg.version:
            info["pinned_version"] = pkg.version
        return info

    def copyright(self, pkg: DebPackage) -> tuple[str, str]:
        rel = f"usr/share/doc/{pkg.name}/copyright"
        return rel, (self.roots[pkg.name] / rel).read_text("utf-8", "replace")

    def hashes(self, pkg: DebPackage, files: Sequence[str]) -> dict[str, str]:
        return {f: sha256_file(self.roots[pkg.name] / f) for f in files}


def _source_austen(fx: _Fetched) -> _Source:
    pkg = DEB_JANEAUSTENR
    root = fx.roots[pkg.name]
    crel, ctext = fx.copyright(pkg)
    desc_rel = f"{R_LIB}/janeaustenr/DESCRIPTION"
    files = [f"{R_LIB}/janeaustenr/data/Rdata.rdx", f"{R_LIB}/janeaustenr/data/Rdata.rdb"]
    return _Source(
        "austen", "Jane Austen, the six completed novels (1811-1818)",
        "public domain (code: MIT)", "train", "tail", fx.deb_info(pkg), files,
        "Public domain (novels published 1811-1818; Austen died 1817; the package's help pages "
        "say the text was sourced from Project Gutenberg). Package code: MIT.",
        [{"file": crel, "lines": quote_lines(ctext, [r"^License:"], crel)},
         {"file": desc_rel, "lines": quote_lines(
             (root / desc_rel).read_text("utf-8"), [r"^License:", (r"Full texts for", 4)],
             desc_rel)}],
        parse_austen(root), fx.hashes(pkg, files))


def _source_mobydick(fx: _Fetched) -> _Source:
    pkg = DEB_TOKENIZERS
    crel, ctext = fx.copyright(pkg)
    files = [f"{R_LIB}/tokenizers/data/Rdata.rdx", f"{R_LIB}/tokenizers/data/Rdata.rdb"]
    docs, raw = parse_mobydick(fx.roots[pkg.name])
    return _Source(
        "mobydick", "Herman Melville, Moby Dick; or The Whale (1851)",
        "public domain (code: MIT)", "train", "tail", fx.deb_info(pkg), files,
        "Public domain (published 1851; Project Gutenberg eBook #2701, whose header and license "
        "footer are stripped). Package code: MIT.",
        [{"file": crel, "lines": quote_lines(ctext, [r"^License:"], crel)},
         {"file": files[1] + " (R object mobydick)", "lines": quote_lines(
             raw, [r"Project Gutenberg EBook of Moby Dick", (r"for the use of anyone", 4)],
             "mobydick")}],
        docs, fx.hashes(pkg, files))


def _source_wikipedia(fx: _Fetched) -> _Source:
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
    return _Source(
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


def _source_devil(fx: _Fetched) -> _Source:
    pkg = DEB_DICT_DEVIL
    crel, ctext = fx.copyright(pkg)
    files = ["usr/share/dictd/devil.dict.dz", "usr/share/dictd/devil.index"]
    return _Source(
        "devil", "Ambrose Bierce, The Devil's Dictionary (1911)", "public domain", "train",
        "hash", fx.deb_info(pkg), files, "Public domain.",
        [{"file": crel, "lines": quote_lines(
            ctext, [(r"is in the public domain", 2), r"Public Domain Text"], crel)}],
        parse_devil(fx.roots[pkg.name]), fx.hashes(pkg, files))


def _source_python_tutorial(fx: _Fetched) -> _Source:
    pkg = DEB_PYTHON_DOC
    root = fx.roots[pkg.name]
    crel, ctext = fx.copyright(pkg)
    docs, files = parse_python_tutorial(root)
    lic_rel = "usr/share/doc/python3.11/html/_sources/license.rst.txt"
    return _Source(
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
SOURCE_BUILDERS: tuple[tuple[str, Callable[[_Fetched], _Source]], ...] = (
    ("austen", _source_austen),
    ("mobydick", _source_mobydick),
    ("wikipedia", _source_wikipedia),
    ("devil", _source_devil),
    ("python_tutorial", _source_python_tutorial),
)


def build_corpus(out_dir: Path, *, cache_dir: Path | None = None, progress: bool = True) -> dict:
    """Download the source packages into ``cache_dir``, extract and clean the texts, split them
    and write ``train.txt``, ``valid.txt``, ``ood.txt`` and ``manifest.json`` into ``out_dir``.
    Returns the manifest (as written)."""
    from tqdm import tqdm

    out_dir = Path(out_dir)
    cache = Path(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR).expanduser()
    deb_dir, pypi_dir, ext_dir = cache / "debs", cache / "pypi", cache / "extract"
    for d in (out_dir, deb_dir, pypi_dir, ext_dir):
        d.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        if progress:
            tqdm.write(msg, file=sys.stderr)
        elif msg.startswith("WARNING"):
            print(msg, file=sys.stderr)

    # ---- downloads
    debs: dict[str, Path] = {}
    pkgs: list[DebPackage | WheelPackage] = [DEB_JANEAUSTENR, DEB_TOKENIZERS, DEB_DICT_DEVIL,
                                             DEB_PYTHON_DOC, WHEEL_GENSIM]
    wheel_path = Path()
    with tqdm(pkgs, desc="download", unit="pkg", disable=not progress, file=sys.stderr) as bar:
        for pkg in bar:
            bar.set_postfix_str(pkg.name)
            if isinstance(pkg, DebPackage):
                debs[pkg.name] = _download_deb(pkg, deb_dir, log)
            else:
                wheel_path = _download_wheel(pkg, pypi_dir)
    roots: dict[str, Path] = {}
    with tqdm(list(debs.items()), desc="extract", unit="pkg", disable=not progress,
              file=sys.stderr) as bar:
        for name, deb in bar:
            bar.set_postfix_str(name)
            roots[name] = _extract_deb(deb, ext_dir)

    fetched = _Fetched(debs, roots, wheel_path)
    sources: list[_Source] = []
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


def make_manifest(sources: Sequence[_Source], stats: dict, out_hashes: dict) -> dict:
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
