"""Text side of the corpus build: cleaning each source's markup into paragraphs, chunking
documents, and the deterministic train/validation split (engram_local.train.corpus fetches and parses
the packages; see docs/corpus.md)."""

from __future__ import annotations

import hashlib
import html
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

VALID_FRACTION = 0.05        # share of each source's characters that goes to validation
MAX_CHUNK_CHARS = 3000       # a chunk (= one output document) holds at most this many chars
MIN_WIKI_ARTICLE_CHARS = 1000  # cleaned Wikipedia articles shorter than this are dropped


# =========================================================================== text cleaning
_WS = re.compile(r"\s+")
_GUTENBERG_ITALICS = re.compile(r"(?<![\w_])_([^_\n]+?)_(?![\w_])")
_ONLY_PUNCT = re.compile(r"^[\W_]*$")


def normalize_paragraph(text: str) -> str:
    """NFC-normalize, drop BOM/control characters, collapse all whitespace to single spaces."""
    text = unicodedata.normalize("NFC", text.replace("\ufeff", ""))
    text = "".join(ch if (ch.isprintable() or ch.isspace()) else " " for ch in text)
    return _WS.sub(" ", text).strip()


def split_paragraphs(text: str) -> list[str]:
    """Blank-line separated blocks -> normalized paragraphs (empty ones dropped)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    out = []
    for block in re.split(r"\n[ \t]*\n", text):
        p = normalize_paragraph(block)
        if p:
            out.append(p)
    return out


def strip_gutenberg_italics(text: str) -> str:
    """``_word_`` (Project Gutenberg plain-text italics) -> ``word``."""
    return _GUTENBERG_ITALICS.sub(r"\1", text)


def strip_gutenberg_boilerplate(text: str) -> str:
    """Keep only the text between Project Gutenberg's ``*** START OF`` and ``*** END OF`` lines,
    minus the "Produced by" credit line(s).  Text without the markers is returned unchanged."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    start = re.search(r"^\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", text, re.M | re.I)
    if start:
        text = text[start.end():]
    end = re.search(r"^\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG.*$", text, re.M | re.I)
    if end:
        text = text[:end.start()]
    end2 = re.search(r"^End of (the )?Project Gutenberg.*$", text, re.M | re.I)
    if end2:
        text = text[:end2.start()]
    text = re.sub(r"\A\s*Produced by[^\n]*(\n[^\n]+)*", "", text)
    return text


def clean_book_paragraphs(paragraphs: Iterable[str], *, stop_at: Sequence[str] = (),
                          skip: tuple[str, str] | None = None) -> list[str]:
    """Clean Project Gutenberg paragraphs: strip ``_italics_`` markers, drop separator lines
    (``* * * * *``) and bracketed editorial notes about editions; stop at the first paragraph
    equal to one of ``stop_at`` (e.g. a modern "A NOTE ON THE TEXT"); ``skip=(a, b)`` drops the
    paragraphs from the one equal to ``a`` up to (not including) the one equal to ``b``."""
    out = []
    skipping = False
    for p in paragraphs:
        if p in stop_at:
            break
        if skip is not None:
            if p == skip[0]:
                skipping = True
            elif p == skip[1]:
                skipping = False
        if skipping:
            continue
        p = strip_gutenberg_italics(p)
        if _ONLY_PUNCT.match(p):
            continue
        if p.startswith("[") and re.search(r"\bedition", p, re.I):
            continue
        out.append(p)
    return out


# ---------------------------------------------------------------------------- wikitext
_WIKI_STOP_SECTIONS = re.compile(
    r"^=+\s*(see also|references|external links|further reading|notes|bibliography|sources|"
    r"footnotes|citations|notes and references|references and notes|works cited|"
    r"selected works|works|gallery|discography|filmography)\s*=+\s*$",
    re.I | re.M,
)
_WIKI_DROP_BLOCKS = re.compile(
    r"<(math|gallery|timeline|imagemap|syntaxhighlight|source|pre|score|chem|hiero|ce|code|"
    r"graph|mapframe|templatedata)\b[^>]*>.*?</\1\s*>",
    re.I | re.S,
)
_WIKI_DROP_NS = {"file", "image", "category", "media", "wikipedia", "wp", "template", "help",
                 "portal", "special", "user", "talk"}
_LANG_PREFIX = re.compile(r"^[a-z]{2,3}(-[a-z]{2,8})*$|^simple$")
_WIKI_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$")


def _strip_nested(text: str, open_: str, close: str) -> str:
    """Remove every (possibly nested) ``open_ ... close`` span; an unclosed span runs to the end."""
    out = []
    depth = 0
    i = 0
    n = len(text)
    while i < n:
        if text.startswith(open_, i):
            depth += 1
            i += len(open_)
        elif depth and text.startswith(close, i):
            depth -= 1
            i += len(close)
        else:
            if depth == 0:
                out.append(text[i])
            i += 1
    return "".join(out)


def _resolve_links(text: str) -> str:
    """Replace (possibly nested) ``[[...]]`` links, innermost first, so links inside a file
    caption resolve before the file link itself is dropped.  Single brackets are plain text."""
    stack: list[list[str]] = [[]]
    i, n = 0, len(text)
    while i < n:
        if text.startswith("[[", i):
            stack.append([])
            i += 2
        elif text.startswith("]]", i) and len(stack) > 1:
            inner = "".join(stack.pop())
            stack[-1].append(_wiki_link(inner))
            i += 2
        else:
            stack[-1].append(text[i])
            i += 1
    while len(stack) > 1:                # unclosed "[[": keep its text
        inner = "".join(stack.pop())
        stack[-1].append("[[" + inner)
    return "".join(stack[0])


def _wiki_link(inner: str) -> str:
    target, bar, label = inner.partition("|")
    target = target.strip()
    if ":" in target:
        prefix = target.lstrip(":").split(":", 1)[0].strip().lower()
        if prefix in _WIKI_DROP_NS and not target.startswith(":"):
            return ""
        if _LANG_PREFIX.match(prefix) and not bar and not target.startswith(":"):
            return ""  # interlanguage link
        if not bar:
            return target.lstrip(":").split(":", 1)[1]
    if bar:
        label = label.rsplit("|", 1)[-1].strip()
        return label if label else target.split("(")[0].strip()  # pipe trick
    return target.split("#")[0] if not target.startswith("#") else target[1:]


def clean_wikitext(text: str) -> list[str]:
    """MediaWiki markup -> plain paragraphs.  Drops templates, tables, references, files,
    categories, interlanguage links, HTML and the trailing See also/References/... sections.
    Section headings are kept as one-line paragraphs when the section has text."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    stop = _WIKI_STOP_SECTIONS.search(text)
    if stop:
        text = text[:stop.start()]
    text = re.sub(r"<!--.*?(-->|\Z)", "", text, flags=re.S)
    text = re.sub(r"<ref\b[^>]*/\s*>", "", text, flags=re.I)
    text = re.sub(r"<ref\b[^>]*>.*?</ref\s*>", "", text, flags=re.I | re.S)
    text = _WIKI_DROP_BLOCKS.sub("", text)
    text = _strip_nested(text, "{{", "}}")
    text = _strip_nested(text, "{|", "|}")
    text = _resolve_links(text)
    text = re.sub(r"\[(?:https?:|ftp:)?//[^\s\]]+\s*([^\]]*)\]", r"\1", text)
    text = re.sub(r"https?://\S+", "", text)
    text = re.sub(r"'{2,5}", "", text)
    text = re.sub(r"<br\s*/?>", " ", text, flags=re.I)
    text = re.sub(r"</?[a-zA-Z][^>]*>", "", text)
    text = re.sub(r"__[A-Z]+__", "", text)
    text = html.unescape(text)

    paras: list[tuple[str, bool]] = []   # (text, is_heading)
    buf: list[str] = []

    def flush():
        if buf:
            paras.append((" ".join(buf), False))
            buf.clear()

    for line in text.split("\n"):
        s = line.strip()
        if not s:
            flush()
            continue
        h = _WIKI_HEADING.match(s)
        if h:
            flush()
            paras.append((h.group(2), True))
            continue
        if s[0] in "|!{}":      # leftover table/template debris
            flush()
            continue
        if s[0] in "*#:;":       # list item / indented line: a paragraph of its own
            flush()
            buf.append(s.lstrip("*#:; "))
            flush()
            continue
        buf.append(s)
    flush()

    cleaned: list[tuple[str, bool]] = []
    for p, is_heading in paras:
        p = re.sub(r"\(\s*(?:[,;:]\s*)+", "(", p)        # "(; , x, )" left by removed templates
        p = re.sub(r"(?:\s*[,;:])+\s*\)", ")", p)
        p = re.sub(r"\(\s*\)", "", p)
        p = re.sub(r"\s+([,.;:])", r"\1", p)
        p = normalize_paragraph(p)
        if not p or not re.search(r"[A-Za-z]", p):
            continue
        if not is_heading and len(p.split()) < 4:
            continue
        cleaned.append((p, is_heading))
    out: list[str] = []
    for i, (p, is_heading) in enumerate(cleaned):
        if is_heading and (i + 1 == len(cleaned) or cleaned[i + 1][1]):
            continue  # heading with nothing under it
        out.append(p)
    return out


# ---------------------------------------------------------------------------- reStructuredText
_RST_ADORNMENT = re.compile(r"^([=\-~^*#+`'\"_:.])\1{2,}\s*$")
_RST_LIST_ITEM = re.compile(r"^(\*|-|\+|#\.|\d+\.|\(\d+\))\s+")


def rst_inline_to_text(s: str, refs: dict[str, str] | None = None) -> str:
    """Inline reST markup -> plain text (roles, literals, links, emphasis, footnote refs).
    ``refs`` maps ``:ref:`` labels to section titles (what Sphinx would print).  Inline literals
    and backslash-escaped characters are protected from the other rules."""
    kept: list[str] = []

    def keep(text: str) -> str:
        kept.append(text)
        return f"\ue000{len(kept) - 1}\ue001"

    def role(m: re.Match) -> str:
        name, body = m.group(1), m.group(2)
        t = re.match(r"^(.*?)\s*<[^<>]*>$", body, re.S)
        if t and t.group(1):
            return keep(t.group(1))
        body = body.lstrip("!")
        if name == "ref":
            return keep((refs or {}).get(body, body.replace("-", " ")))
        if name in ("pep", "rfc"):
            return keep(f"{name.upper()} {body}")
        if body.startswith("~"):
            body = body[1:].rsplit(".", 1)[-1]
        return keep(body)

    s = re.sub(r"``(.+?)``", lambda m: keep(m.group(1)), s)
    s = s.replace("\\ ", "")                                # escaped space joins words
    s = re.sub(r"\\(.)", lambda m: keep(m.group(1)), s)      # escaped character
    s = re.sub(r":(?:[\w+.-]+:)?([\w+.-]+):`([^`]*)`", role, s)
    s = re.sub(r"`([^`<]*?)\s*<[^`>]*>`__?", r"\1", s)
    s = re.sub(r"`([^`]+)`__?", r"\1", s)
    s = re.sub(r"`([^`]+)`", r"\1", s)
    s = re.sub(r"\s*\[(#\w*|\*|\d+)\]_", "", s)
    s = re.sub(r"\*\*(\S(?:.*?\S)?)\*\*", r"\1", s)
    s = re.sub(r"(?<![\w*])\*(\S(?:[^*]*?\S)?)\*(?![\w*])", r"\1", s)
    s = re.sub(r"\|(\w+)\|", r"\1", s)
    while "\ue000" in s:
        s = re.sub(r"\ue000(\d+)\ue001", lambda m: kept[int(m.group(1))], s)
    return s


def rst_section_labels(text: str) -> dict[str, str]:
    """``.. _label:`` targets followed by a section heading -> {label: heading text}."""
    lines = text.replace("\r\n", "\n").split("\n")
    out = {}
    for i, line in enumerate(lines):
        m = re.match(r"^\.\. _([^:]+):\s*$", line)
        if not m:
            continue
        for j in range(i + 1, min(i + 8, len(lines) - 1)):
            s = lines[j].strip()
            if not s or _RST_ADORNMENT.match(s) or s.startswith(".. _"):
                continue
            if _RST_ADORNMENT.match(lines[j + 1].strip()):
                out[m.group(1)] = normalize_paragraph(rst_inline_to_text(s))
            break
    return out


def clean_rst(text: str, refs: dict[str, str] | None = None) -> list[str]:
    """reStructuredText prose -> plain paragraphs.  Drops directives and comments (with their
    indented bodies), literal blocks (after ``::``), doctest blocks, tables and adornment lines;
    keeps headings, list items and block quotes as paragraphs."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    paras: list[str] = []
    buf: list[str] = []
    state = {"literal_next": False, "skip_block": False, "skip_para": False}

    def flush():
        if buf and not state["skip_para"]:
            p = normalize_paragraph(" ".join(buf))
            if p.endswith("::"):
                state["literal_next"] = True
                p = p[:-2].rstrip()
                if p and not p.endswith(":"):
                    p += ":"
            p = normalize_paragraph(rst_inline_to_text(p, refs))
            if p and re.search(r"[A-Za-z]", p):
                paras.append(p)
        buf.clear()
        state["skip_para"] = False

    for line in lines:
        indented = line[:1] in (" ", "\t")
        s = line.strip()
        if state["skip_block"]:
            if not s or indented:
                continue
            state["skip_block"] = False
        if not s:
            flush()
            continue
        if indented and not buf and state["literal_next"]:
            state["skip_block"] = True      # literal block: code, not prose
            continue
        if not indented:
            state["literal_next"] = False
        if s.startswith(".. ") or s == "..":
            flush()
            state["skip_block"] = True      # directive, comment, link target: skip its body
            continue
        if _RST_ADORNMENT.match(s):
            if len(buf) == 1:              # heading text above its underline
                flush()
            else:
                flush()
            continue
        if s.startswith((">>>", "... ")) or s == "...":
            state["skip_para"] = True       # doctest block
            buf.append(s)
            continue
        if s.startswith(("+-", "+=", "|")) or re.match(r"^=+(\s+=+)+$", s):
            state["skip_para"] = True       # table
            buf.append(s)
            continue
        m = _RST_LIST_ITEM.match(s)
        if m:
            flush()
            s = s[m.end():]
        buf.append(s)
    flush()
    return paras


# =========================================================================== chunks and split
@dataclass
class Document:
    """One document of a source: a novel, an article, a dictionary entry, a tutorial page."""
    source: str
    doc_id: str
    paragraphs: list[str]
    boundary: re.Pattern | None = None  # paragraphs matching this start a new chunk (chapters)

    @property
    def chars(self) -> int:
        return sum(len(p) for p in self.paragraphs)


def _split_long_paragraph(p: str, max_chars: int) -> list[str]:
    if len(p) <= max_chars:
        return [p]
    sentences = re.split(r"(?<=[.!?;:])\s+", p)
    parts, cur = [], ""
    for s in sentences:
        while len(s) > max_chars:            # a "sentence" longer than a chunk: hard wrap at spaces
            cut = s.rfind(" ", 0, max_chars)
            cut = cut if cut > 0 else max_chars
            if cur:
                parts.append(cur)
                cur = ""
            parts.append(s[:cut].strip())
            s = s[cut:].strip()
        if cur and len(cur) + 1 + len(s) > max_chars:
            parts.append(cur)
            cur = s
        else:
            cur = f"{cur} {s}" if cur else s
    if cur:
        parts.append(cur)
    return [x for x in parts if x]


def chunk_paragraphs(paragraphs: Sequence[str], max_chars: int = MAX_CHUNK_CHARS,
                     boundary: re.Pattern | None = None) -> list[list[str]]:
    """Group consecutive paragraphs into chunks of at most ``max_chars`` characters (counting a
    newline between paragraphs; a chunk's leading headings come on top).  Paragraphs are never
    split unless one alone exceeds ``max_chars`` (then it is split at sentence ends).  A
    paragraph matching ``boundary`` (a heading) starts a new chunk and stays with the text that
    follows it ("VOLUME I", "CHAPTER I" and the chapter's first paragraph share a chunk)."""
    chunks: list[list[str]] = []
    cur: list[str] = []
    size = 0
    body = False          # does `cur` hold more than leading headings?
    for para in paragraphs:
        is_heading = boundary is not None and boundary.match(para) is not None
        if is_heading and body:
            chunks.append(cur)
            cur, size, body = [], 0, False
        for piece in _split_long_paragraph(para, max_chars):
            add = len(piece) + (1 if cur else 0)
            if cur and (body or is_heading) and size + add > max_chars:
                chunks.append(cur)
                cur, size, body = [], 0, False
                add = len(piece)
            if not body and not is_heading:      # leading headings do not count against the size
                size, add, body = 0, len(piece), True
            cur.append(piece)
            size += add
    if cur:
        chunks.append(cur)
    return chunks


def stable_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass
class Chunk:
    source: str
    doc_id: str
    index: int
    text: str

    @property
    def key(self) -> str:
        return f"{self.source}/{self.doc_id}/{self.index}"


def split_source(docs: Sequence[Document], mode: str, valid_fraction: float = VALID_FRACTION,
                 max_chars: int = MAX_CHUNK_CHARS) -> tuple[list[Chunk], list[Chunk]]:
    """Fixed train/validation split of one source.

    ``mode="tail"`` (long works: novels): each document is chunked and its last chunks, covering
    at least ``valid_fraction`` of its characters, go to validation (a held-out ending).
    ``mode="hash"`` (collections: articles, entries): whole documents are ordered by
    sha256("source/doc_id") and the first ones, covering at least ``valid_fraction`` of the
    source's characters, go to validation.  No RNG: the split depends only on the text ids.
    """
    if mode not in ("tail", "hash"):
        raise ValueError(f"unknown split mode {mode!r}")
    train: list[Chunk] = []
    valid: list[Chunk] = []
    chunked = []
    for d in docs:
        parts = chunk_paragraphs(d.paragraphs, max_chars, d.boundary)
        chunked.append((d, [Chunk(d.source, d.doc_id, i, "\n".join(c))
                            for i, c in enumerate(parts)]))
    if mode == "tail":
        for d, chunks in chunked:
            total = sum(len(c.text) for c in chunks)
            n_valid, acc = 0, 0
            while n_valid < len(chunks) - 1 and acc < valid_fraction * total:
                n_valid += 1
                acc += len(chunks[-n_valid].text)
            cut = len(chunks) - n_valid
            train.extend(chunks[:cut])
            valid.extend(chunks[cut:])
    else:
        total = sum(len(c.text) for _, cs in chunked for c in cs)
        order = sorted(range(len(chunked)),
                       key=lambda i: stable_hash(f"{chunked[i][0].source}/{chunked[i][0].doc_id}"))
        valid_ids, acc = set(), 0
        for i in order:
            if acc >= valid_fraction * total or len(valid_ids) >= len(chunked) - 1:
                break
            valid_ids.add(i)
            acc += sum(len(c.text) for c in chunked[i][1])
        for i, (_, chunks) in enumerate(chunked):
            (valid if i in valid_ids else train).extend(chunks)
    return train, valid


def interleave(chunks: Iterable[Chunk]) -> list[Chunk]:
    """Deterministic shuffle: order chunks by sha256 of their key, so that any prefix of the
    output file is a mix of all sources (a trainer reading only the first N tokens sees every
    source).  Depends on nothing but the keys."""
    return sorted(chunks, key=lambda c: stable_hash(c.key))


def format_documents(texts: Iterable[str]) -> str:
    """Documents separated by one blank line; the file ends with a single newline."""
    texts = [t.strip("\n") for t in texts if t.strip()]
    return "\n\n".join(texts) + "\n" if texts else ""


def sha256_bytes(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
