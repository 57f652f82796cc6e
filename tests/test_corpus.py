"""Tests of engram_local.train.corpus.  The fast ones use small in-memory text and download nothing;
the one that builds the real corpus (apt-get / pip downloads) is marked slow."""

from __future__ import annotations

import json
import re
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from engram_local.train import corpus as C
from engram_local.train import corpus_fetch as F
from engram_local.train import corpus_sources as S
from engram_local.train import corpus_text as T


# --------------------------------------------------------------------------- cleaning
def test_normalize_paragraph_collapses_whitespace_and_nfc():
    assert T.normalize_paragraph("\ufeff  a\n b\t\tc \u00a0d  ") == "a b c d"
    assert T.normalize_paragraph("Cafe\u0301") == "Caf\u00e9"          # NFC
    assert T.normalize_paragraph("a\x00b") == "a b"                    # control chars dropped


def test_split_paragraphs_keeps_paragraph_breaks_only():
    text = "One line\nstill one.\r\n\r\n  \nSecond\tpara.\n\n\n\nThird."
    assert T.split_paragraphs(text) == ["One line still one.", "Second para.", "Third."]
    assert T.split_paragraphs("  \n\n ") == []


def test_gutenberg_italics_and_boilerplate():
    assert T.strip_gutenberg_italics("Between _them_ it was _very_ odd; snake_case") == \
        "Between them it was very odd; snake_case"
    raw = ("\ufeffThe Project Gutenberg EBook of X\r\n\r\nlicense blah\r\n"
           "*** START OF THIS PROJECT GUTENBERG EBOOK X ***\r\n\r\n\r\n"
           "Produced by Someone\r\n\r\nCall me Ishmael.\r\n\r\nThe end.\r\n\r\n"
           "End of Project Gutenberg's X\r\n\r\n*** END OF THIS PROJECT GUTENBERG EBOOK X ***\r\n"
           "license footer\r\n")
    assert T.split_paragraphs(T.strip_gutenberg_boilerplate(raw)) == ["Call me Ishmael.", "The end."]
    assert T.strip_gutenberg_boilerplate("plain text") == "plain text"


def test_clean_book_paragraphs():
    paras = ["TITLE", "Notes:", "a note", "CHAPTER 1", "Some _fine_ text.", "* * * * *",
             "[End volume one of this edition.", "More text.", "A NOTE ON THE TEXT", "editor"]
    out = T.clean_book_paragraphs(paras, stop_at=("A NOTE ON THE TEXT",), skip=("Notes:", "CHAPTER 1"))
    assert out == ["TITLE", "CHAPTER 1", "Some fine text.", "More text."]


WIKI = """{{Infobox thing|name=X|image=[[File:x.png]]}}
'''Aardvark''' ({{IPA|ˈɑːrd}}; ''Orycteropus afer'') is a [[mammal]] native to [[Africa|the African continent]].<ref name="a">Citation [http://example.org here]</ref> It eats [[ant]]s.<!-- hidden -->
[[File:Aardvark.jpg|thumb|An aardvark in [[Namibia]] [above], see Bicyclo[1.1.0]butane.]]

== Taxonomy ==
It is the only living species of the order&nbsp;Tubulidentata, see [http://example.org/x the site].
{| class="wikitable"
|-
| cell || cell
|}
* A list item that is long enough to keep.
* Short.

== Empty section ==
{{main|Other}}
== See also ==
* [[Anteater]] is after the stop section.
[[Category:Mammals]]
[[de:Erdferkel]]
"""


def test_clean_wikitext():
    out = T.clean_wikitext(WIKI)
    assert out == [
        "Aardvark (Orycteropus afer) is a mammal native to the African continent. It eats ants.",
        "Taxonomy",
        "It is the only living species of the order Tubulidentata, see the site.",
        "A list item that is long enough to keep.",
    ]
    joined = "\n".join(out)
    for junk in ("{{", "}}", "[[", "]]", "<ref", "thumb", "Category", "Erdferkel", "Anteater",
                 "hidden", "Empty section", "cell"):
        assert junk not in joined


def test_parse_wikipedia_skips_redirects_and_short_pages():
    body = " ".join(["Word"] * 400)
    xml = f"""<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">
  <page><title>Real</title><ns>0</ns><revision><id>7</id><timestamp>2016-01-02T00:00:00Z</timestamp>
    <text>'''Real''' article. {body}.</text></revision></page>
  <page><title>Redir</title><ns>0</ns><redirect title="Real"/><revision><id>8</id>
    <text>#REDIRECT [[Real]]</text></revision></page>
  <page><title>Talk:Real</title><ns>1</ns><revision><id>9</id><text>{body}</text></revision></page>
  <page><title>Tiny</title><ns>0</ns><revision><id>10</id><text>Too short to keep here.</text></revision></page>
  <page><title>Thing (disambiguation)</title><ns>0</ns><revision><id>11</id><text>{body}</text></revision></page>
</mediawiki>""".encode()
    docs, attribution = S.parse_wikipedia(xml)
    assert [d.doc_id for d in docs] == ["Real"]
    assert docs[0].paragraphs[0] == "Real" and docs[0].paragraphs[1].startswith("Real article. Word")
    assert attribution == [{"title": "Real", "revision_id": "7", "timestamp": "2016-01-02T00:00:00Z"}]


RST = """.. _tut-intro:

*****************
Whetting Appetite
*****************

If you do *much* work on computers, see :ref:`tut-intro` and :func:`len` or
``'\\n'`` and :pep:`8`.

.. note::

   A directive body that is dropped.

Here is a loop::

   for x in range(3):
       print(x)

>>> 1 + 1
2

* first item of the list,
  continued here
* second item

+-----+-----+
| a   | b   |
+-----+-----+

Escaped \\*stars\\* and `a link <https://x.org>`_.
"""


def test_clean_rst():
    refs = T.rst_section_labels(RST)
    assert refs == {"tut-intro": "Whetting Appetite"}
    out = T.clean_rst(RST, refs)
    assert out == [
        "Whetting Appetite",
        "If you do much work on computers, see Whetting Appetite and len or '\\n' and PEP 8.",
        "Here is a loop:",
        "first item of the list, continued here",
        "second item",
        "Escaped *stars* and a link.",
    ]


# --------------------------------------------------------------------------- chunking and splitting
def _paras(n: int, size: int = 100, tag: str = "p") -> list[str]:
    return [f"{tag}{i:04d} " + "x" * (size - 6) for i in range(n)]


def test_chunk_paragraphs_bounds_order_and_boundaries():
    paras = _paras(50) + ["CHAPTER 2"] + _paras(5, tag="q") + ["word. " * 300]
    chunks = T.chunk_paragraphs(paras, max_chars=1000, boundary=S._CHAPTER)
    body = [[p for p in c if not S._CHAPTER.match(p)] for c in chunks]
    assert all(len("\n".join(c)) <= 1000 for c in body)       # leading headings come on top
    flat = [p for c in chunks for p in c]
    assert flat[:56] == paras[:56]                            # order kept, nothing lost
    assert "".join(flat[56:]).replace(" ", "") == paras[56].replace(" ", "")  # long one split
    assert any(c[0] == "CHAPTER 2" for c in chunks)           # chapter starts a chunk
    heads = T.chunk_paragraphs(["VOLUME I", "CHAPTER I", "Text.", "CHAPTER II", "More."],
                               boundary=S._CHAPTER)
    assert heads == [["VOLUME I", "CHAPTER I", "Text."], ["CHAPTER II", "More."]]
    long_first = T.chunk_paragraphs(["CHAPTER I", "y" * 1000, "z" * 10], max_chars=1000,
                                    boundary=S._CHAPTER)
    assert long_first == [["CHAPTER I", "y" * 1000], ["z" * 10]]   # no orphan heading


def test_split_tail_is_deterministic_and_holds_out_the_end():
    docs = [T.Document("s", f"book{i}", _paras(200, tag=f"b{i}_")) for i in range(3)]
    train, valid = T.split_source(docs, "tail", valid_fraction=0.05, max_chars=1000)
    train2, valid2 = T.split_source(docs, "tail", valid_fraction=0.05, max_chars=1000)
    assert [c.text for c in train] == [c.text for c in train2]
    assert [c.text for c in valid] == [c.text for c in valid2]
    for i in range(3):
        tr = [c for c in train if c.doc_id == f"book{i}"]
        va = [c for c in valid if c.doc_id == f"book{i}"]
        assert va and max(c.index for c in tr) < min(c.index for c in va)   # valid = the ending
        frac = sum(len(c.text) for c in va) / sum(len(c.text) for c in tr + va)
        assert 0.05 <= frac < 0.10
    assert not {c.key for c in train} & {c.key for c in valid}


def test_split_hash_whole_documents_independent_of_input_order():
    docs = [T.Document("s", f"entry{i}", _paras(2, tag=f"e{i}_")) for i in range(200)]
    train, valid = T.split_source(docs, "hash", valid_fraction=0.05)
    _, valid_rev = T.split_source(list(reversed(docs)), "hash", valid_fraction=0.05)
    vids = {c.doc_id for c in valid}
    assert vids == {c.doc_id for c in valid_rev}
    assert not vids & {c.doc_id for c in train}
    assert 10 <= len(vids) <= 11                                 # ~5 % of 200 similar entries
    with pytest.raises(ValueError):
        T.split_source(docs, "random")


def test_interleave_and_format_documents():
    chunks = [T.Chunk("a", "d", i, f"text {i}") for i in range(20)]
    order = T.interleave(chunks)
    assert order == T.interleave(list(reversed(chunks)))
    assert order != chunks
    text = T.format_documents(["one\npara", "two", ""])
    assert text == "one\npara\n\ntwo\n"
    assert T.format_documents([]) == ""


# --------------------------------------------------------------------------- formats
def test_dictd_index_and_entries():
    assert S.dictd_b64("A") == 0 and S.dictd_b64("b") == 27 and S.dictd_b64("BA") == 64
    data = b"HEADER....ABASE, n. Low.\nABATIS, n. Rubbish.\n"
    index = ("00databaseinfo\tA\tK\n"
             "abatis\tZ\tU\n"            # offset 25, length 20
             "abase\tK\tP\n"             # offset 10, length 15
             "abatis-alias\tZ\tU\n")     # same entry twice: kept once
    assert S.parse_dictd(index, data) == [("abase", "ABASE, n. Low.\n"),   # file order
                                          ("abatis", "ABATIS, n. Rubbish.\n")]


def test_read_r_lazyload_roundtrip(tmp_path: Path):
    rdata = pytest.importorskip("rdata")
    np = pytest.importorskip("numpy")
    lines = np.array(["EMMA", "", "By Jane Austen"])
    rdata.write_rds(tmp_path / "obj.rds", lines, compression=None)
    raw = (tmp_path / "obj.rds").read_bytes()
    record = struct.pack(">I", len(raw)) + zlib.compress(raw)
    (tmp_path / "Rdata.rdb").write_bytes(record)
    rdata.write_rds(tmp_path / "Rdata.rdx", {
        "variables": {"emma": np.array([0, len(record)], dtype=np.int32)},
        "references": {}, "compressed": np.array([True])})
    out = S.read_r_lazyload(tmp_path / "Rdata.rdx", tmp_path / "Rdata.rdb")
    assert list(out) == ["emma"] and [str(x) for x in out["emma"]] == list(lines)


# --------------------------------------------------------------------------- licenses and manifest
def test_quote_lines():
    text = "\ufeffHeader\nLicense: MIT\nThe text is in the public domain, its\ncopyright has expired.\n"
    assert S.quote_lines(text, [r"^License:", (r"public domain", 2)], "x") == [
        "License: MIT", "The text is in the public domain, its copyright has expired."]
    with pytest.raises(C.CorpusBuildError, match="license check failed"):
        S.quote_lines(text, [r"GPL"], "x")


def _fake_sources():
    book = S.Source("book", "A book", "public domain", "train", "tail",
                     {"type": "debian", "name": "pkg", "version": "1.0-1"}, ["f"],
                     "Public domain.", [{"file": "copyright", "lines": ["public domain"]}],
                     [T.Document("book", "B", _paras(100))], {"f": "0" * 64})
    ood = S.Source("ood", "Other", "PSF-2.0", "ood", "none",
                    {"type": "debian", "name": "doc", "version": "2"}, ["g"], "PSF.",
                    [{"file": "copyright", "lines": ["PSF"]}], [T.Document("ood", "O", _paras(5))])
    return book, ood


def test_manifest_shape_is_json_and_deterministic():
    book, ood = _fake_sources()
    tr, va = T.split_source(book.docs, "tail")
    stats = {"book": {"train": (len(tr), sum(len(c.text) for c in tr)),
                      "valid": (len(va), sum(len(c.text) for c in va)), "valid_documents": None},
             "ood": {"ood": (1, 500)}}
    outs = {n: {"sha256": "0" * 64, "bytes": 1, "chars": 1, "documents": 1}
            for n in ("train.txt", "valid.txt", "ood.txt")}
    m = C.make_manifest([book, ood], stats, outs)
    assert json.loads(json.dumps(m)) == m
    assert C.make_manifest([book, ood], stats, outs) == m
    assert set(m) == {"format_version", "description", "split_rule", "outputs", "sources"}
    assert set(m["outputs"]) == {"train.txt", "valid.txt", "ood.txt"}
    b, o = m["sources"]
    for s in (b, o):
        assert {"id", "package", "files", "license", "license_id", "license_evidence",
                "input_sha256", "split", "role"} <= set(s)
        assert s["package"]["version"]
    assert b["train"]["chars"] > 0 and b["valid"]["chars"] > 0 and "ood" not in b
    assert o["ood"] == {"chunks": 1, "chars": 500} and "train" not in o
    assert C.summary_rows(m) == [("book", "public domain", b["train"]["chars"],
                                  b["valid"]["chars"], 0), ("ood", "PSF-2.0", 0, 0, 500)]


# --------------------------------------------------------------------------- download logic (mocked)
def test_download_deb_runs_apt_update_when_lists_are_missing(tmp_path, monkeypatch):
    calls = []
    state = {"updated": False}

    def fake_run(cmd, *, cwd=None):
        calls.append(cmd)
        if "update" in cmd:
            state["updated"] = True
            return subprocess.CompletedProcess(cmd, 0, "", "")
        if not state["updated"]:
            return subprocess.CompletedProcess(cmd, 100, "", "E: Unable to locate package dict-devil")
        (tmp_path / "dict-devil_1.0-13.1_all.deb").write_bytes(b"deb")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(F, "_run", fake_run)
    monkeypatch.setattr(F.shutil, "which", lambda name: "/usr/bin/" + name)
    monkeypatch.setattr(F, "_deb_fields", lambda p: {"Package": "dict-devil", "Version": "1.0-13.1",
                                                     "Architecture": "all"})
    got = F._download_deb(F.DEB_DICT_DEVIL, tmp_path, lambda m: None)
    assert got.name == "dict-devil_1.0-13.1_all.deb"
    kinds = [c[c.index("download") if "download" in c else c.index("update")] for c in calls]
    assert kinds == ["download", "update", "download"]
    assert calls[0][-1] == "dict-devil=1.0-13.1"
    calls.clear()
    assert F._download_deb(F.DEB_DICT_DEVIL, tmp_path, lambda m: None) == got   # cached
    assert calls == []


def test_download_deb_falls_back_to_candidate_version(tmp_path, monkeypatch):
    calls, logs = [], []

    def fake_run(cmd, *, cwd=None):
        calls.append(cmd[-1])
        if cmd[-1] == "update":
            return subprocess.CompletedProcess(cmd, 0, "", "")
        if "=" in cmd[-1]:
            return subprocess.CompletedProcess(
                cmd, 100, "", "E: Version '1.0-13.1' for 'dict-devil' was not found")
        (tmp_path / "dict-devil_1.0-14_all.deb").write_bytes(b"deb")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(F, "_run", fake_run)
    monkeypatch.setattr(F.shutil, "which", lambda name: "/usr/bin/" + name)
    monkeypatch.setattr(F, "_deb_fields", lambda p: {
        "Package": "dict-devil", "Version": p.name.split("_")[1], "Architecture": "all"})
    got = F._download_deb(F.DEB_DICT_DEVIL, tmp_path, logs.append)
    assert got.name == "dict-devil_1.0-14_all.deb"
    assert calls == ["dict-devil=1.0-13.1", "update", "dict-devil=1.0-13.1", "dict-devil"]
    assert any("WARNING" in m and "1.0-14" in m for m in logs)


def test_download_deb_failure_names_package_and_command(tmp_path, monkeypatch):
    def fake_run(cmd, *, cwd=None):
        return subprocess.CompletedProcess(cmd, 100, "", "E: Failed to fetch http://mirror/x 404")

    monkeypatch.setattr(F, "_run", fake_run)
    monkeypatch.setattr(F.shutil, "which", lambda name: "/usr/bin/" + name)
    with pytest.raises(C.CorpusBuildError) as e:
        F._download_deb(F.DEB_JANEAUSTENR, tmp_path, lambda m: None)
    msg = str(e.value)
    assert "r-cran-janeaustenr" in msg and "apt-get" in msg and "download" in msg and "404" in msg


def test_download_deb_without_apt(tmp_path, monkeypatch):
    monkeypatch.setattr(F.shutil, "which", lambda name: None)
    with pytest.raises(C.CorpusBuildError, match="apt-get is not available"):
        F._download_deb(F.DEB_DICT_DEVIL, tmp_path, lambda m: None)


# --------------------------------------------------------------------------- the real thing
@pytest.mark.slow
def test_build_corpus_real_is_deterministic(tmp_path):
    """Downloads the packages (apt-get download, pip download) and builds twice."""
    if F.shutil.which("apt-get") is None or F.shutil.which("dpkg-deb") is None:
        pytest.skip("needs apt-get and dpkg-deb")
    pytest.importorskip("rdata")
    cache = tmp_path / "cache"
    m1 = C.build_corpus(tmp_path / "a", cache_dir=cache, progress=False)
    m2 = C.build_corpus(tmp_path / "b", cache_dir=cache, progress=False)
    assert m1 == m2
    for name in ("train.txt", "valid.txt", "ood.txt", "manifest.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    ids = [s["id"] for s in m1["sources"]]
    assert ids == ["austen", "mobydick", "wikipedia", "devil", "python_tutorial"]
    train = (tmp_path / "a" / "train.txt").read_text("utf-8")
    valid = (tmp_path / "a" / "valid.txt").read_text("utf-8")
    ood = (tmp_path / "a" / "ood.txt").read_text("utf-8")
    assert "It is a truth universally acknowledged" in train + valid
    assert "Call me Ishmael" in train
    assert "Project Gutenberg" not in train + valid
    assert not re.search(r"\{\{|\[\[|<ref", train + valid)
    assert not set(train.split("\n\n")) & set(valid.split("\n\n"))
    assert "Python" in ood and not set(ood.split("\n\n")) & set(train.split("\n\n"))
