"""User memory: facts written as Engram row overrides (`remember`, `facts`, `forget`).

A fact is (prompt, answer). Writing it (engram_local.memory.writer) fits a few rows of the write
layer's table so that greedy generation from the prompt produces the whole answer; the rows,
each bound to the exact N-gram key it was written for, go into the user's .eov file
(engram_local.formats.eov) with a ledger of the facts. At run time the file's override sets are
stacked over the shared table (`open_overrides`); text that never looks up a written (row, key)
is bit-for-bit unchanged.

Where facts come from:
  * STATEMENT: a plain sentence split by `split_statement` (rule in its docstring);
  * --prompt/--answer pairs;
  * --from-jsonl: lines {"prompt": ..., "answer": ..., "id"?: ..., "paraphrases"?: [...]};
  * --from-user-json: the paper's user files, with the paper's prompt rule (`user_json_facts`).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from engram_local import constants
from engram_local.formats.eov import open_overrides  # noqa: F401 (re-exported: engram_local.memory.open_overrides)
from engram_local.text.facts import (FactInputError, _answer_text, chat_contexts,  # noqa: F401 (re-exported)
                                     prompt_from_sentence, read_statement, split_statement)
from engram_local.text.user_files import UserFile, read_user_file

# --------------------------------------------------------------------------- facts


@dataclass
class NewFact:
    """A fact to write: its answer follows `prompt`; `paraphrases` are more trigger prompts.
    `adds`: a fact with the same prompt keeps its answer and this one's joins it ("I love" ->
    "jazz, hiking"), instead of being replaced (text.facts.read_statement says which)."""
    prompt: str
    answer: str
    id: str | None = None
    paraphrases: list[str] = field(default_factory=list)
    adds: bool = False


def statement_fact(statement: str) -> NewFact:
    """The fact a typed statement states (text.facts.read_statement), its words as typed;
    FactInputError when it cannot be split. (Writing "i live in" as "I live in", with or without
    the typed prompt as a paraphrase, measured no better in chat: docs/chat-memory.md, session 16.)"""
    prompt, answer, adds = read_statement(statement)
    return NewFact(prompt=prompt, answer=answer, adds=adds)


def statement_facts(statement: str) -> list[NewFact]:
    """The facts a typed statement states: one per clause when it has several and each reads as a
    fact with a contentful answer ("My name is Sam and I'm a nurse." -> "My name is" -> "Sam",
    "I'm a" -> "nurse"; text.statements.statement_clauses), else the statement as one fact
    (statement_fact). FactInputError when it cannot be split."""
    from engram_local.text.statements import answer_fault, statement_clauses

    parts = statement_clauses(statement)
    if len(parts) > 1:
        try:
            facts = [statement_fact(p) for p in parts]
        except FactInputError:
            facts = []
        if facts and all(answer_fault(f.answer) is None for f in facts):
            return facts
    return [statement_fact(statement)]


def user_json_facts(path: str | os.PathLike | UserFile, paraphrases: bool = False) -> list[NewFact]:
    """Facts of one of the paper's user files (a path, or one read by
    text.user_files.read_user_file) with the paper's prompt rule; the id is the fact's key. With
    `paraphrases`, the other paraphrases ending with the answer become extra trigger prompts
    (the paper's multi-trigger writing)."""
    user = path if isinstance(path, UserFile) else read_user_file(path)
    return [NewFact(prompt=f.prompt, answer=f.answer, id=f.key,
                    paraphrases=list(f.paraphrases) if paraphrases else [])
            for f in user.facts]


def jsonl_facts(path: str | os.PathLike) -> list[NewFact]:
    """Facts of a JSON-lines file: {"prompt", "answer", "id"?, "paraphrases"?} per line.

    A paraphrase that ends with the answer gives the prompt before it (the paper's rule);
    any other paraphrase is itself a prompt the answer must follow."""
    out = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise FactInputError(f"{path}: cannot read: {exc}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except ValueError as exc:
            raise FactInputError(f"{path}:{n}: not JSON ({exc})") from None
        if not isinstance(d, dict) or "prompt" not in d or "answer" not in d:
            raise FactInputError(f"{path}:{n}: each line needs \"prompt\" and \"answer\"")
        answer = _answer_text(d["answer"], f"{path}:{n}")
        paras = d.get("paraphrases") or []
        if not isinstance(paras, list):
            raise FactInputError(f"{path}:{n}: \"paraphrases\" must be a list of strings")
        prompts = []
        for p in paras:
            p = str(p)
            prompts.append(prompt_from_sentence(p, answer) or p.rstrip())
        out.append(NewFact(prompt=str(d["prompt"]), answer=answer,
                           id=None if d.get("id") is None else str(d["id"]),
                           paraphrases=[p for p in dict.fromkeys(prompts) if p and p != d["prompt"]]))
    return out


# --------------------------------------------------------------------------- model identity

def model_fingerprint(em) -> int:
    """The fingerprint of an in-memory EngramModel: the model fingerprint (formats.fingerprint,
    as a sidecar's) over this model's own tables, stored as F32."""
    import torch

    from engram_local.formats.fingerprint import FingerprintLayer, fingerprint

    cfg, layout = em.cfg, em.layout

    def layers():
        for layer in cfg.layer_ids:
            table = np.ascontiguousarray(em.engram[str(layer)].table.detach().to(torch.float32).cpu().numpy(),
                                         dtype="<f4")
            yield FingerprintLayer(layer, constants.QTYPE_F32, table.shape[0], table.shape[1],
                                   layout.kernel_args(layer), table)

    return fingerprint(vars(cfg), em.canonical_map.cpu().numpy(), layers())


def fingerprint_of(model: str | os.PathLike | None) -> int:
    """The fingerprint user memory binds to, without loading the model when it is a MODEL_DIR."""
    from engram_local.runtime.loader import ModelDir, resolve

    target = resolve(model)
    if isinstance(target, ModelDir):
        from engram_local.formats.sidecar import open_sidecar

        return int(open_sidecar(target.engram).fingerprint)
    raise ValueError(f"{target}: user memory needs a MODEL_DIR; convert the checkpoint with "
                     "`engram-local convert` first")


def load_model_for_memory(model: str | os.PathLike | None = None):
    """(EngramModel, tokenizer, fingerprint) of a MODEL_DIR, a checkpoint or the default model,
    with no user memory attached (the skill adapter, when the model has one, is applied)."""
    from engram_local.runtime.loader import load_model

    em, tok, md = load_model(model)
    if md is not None:
        from engram_local.formats.sidecar import open_sidecar

        fp = int(open_sidecar(md.engram).fingerprint)
    else:
        fp = model_fingerprint(em)
    return em, tok, fp


# --------------------------------------------------------------------------- run time


def open_overrides_for_model(paths: Sequence[str | os.PathLike], model: str | os.PathLike | None):
    """open_overrides for the model at `model` (MODEL_DIR, checkpoint or None = default)."""
    return open_overrides(paths, fingerprint_of(model))


def attach_overrides(em, stacks) -> None:
    """Serve each layer of an in-memory EngramModel (own tables) through a native Gatherer under
    the override stacks `{layer: [OverrideSet, ...]}` (for checkpoints; a MODEL_DIR gets them
    from `loader.load_model(path, overrides)`)."""
    from engram_local import native

    for layer, sets in stacks.items():
        eng = em.engram[str(layer)]
        if eng.source is not None:
            raise ValueError(f"layer {layer} already reads through a source; reload the model with overrides")
        table = eng.table.detach().float().contiguous().numpy()
        eng.source = native.Gatherer(native.Table(table, constants.QTYPE_F32, table.shape[0],
                                                  table.shape[1]), list(sets))
        eng._table_keepalive = table


# --------------------------------------------------------------------------- writing and forgetting

class _bare:
    """While active, every Engram layer of `em` reads its table without user override sets
    (writing fits against the shared table; a model from a session with memory attached has
    its sets put back afterwards)."""

    def __init__(self, em):
        self.em, self.saved = em, {}

    def __enter__(self):
        from engram_local import native

        for layer in self.em.cfg.layer_ids:
            src = self.em.engram[str(layer)].source
            state = getattr(src, "_state", None)
            if isinstance(src, native.Gatherer) and state is not None and state[1]:
                self.saved[layer] = src
                self.em.engram[str(layer)].source = native.Gatherer(state[0])
        return self.em

    def __exit__(self, *exc):
        for layer, src in self.saved.items():
            self.em.engram[str(layer)].source = src


@dataclass
class WriteReport:
    new_ids: list[str]
    recalled: dict[str, bool]
    rows: int
    file_bytes: int
    seconds: float
    steps: int
    # remember: new fact id -> id of the fact it replaced (ids joined by ", " when it replaced
    # several); empty when none
    replaced: dict[str, str] = field(default_factory=dict)
    unchanged: list[str] = field(default_factory=list)    # remember: ids of facts said again, as they were
    history: list = field(default_factory=list)           # remember: the ReplacedFact records it added


def _fit_inputs(mf, write_layer: int):
    """existing {(row, key): value} of the write layer, owners {fact id: [(row, key)]}."""
    existing, keys_of_entry = {}, []
    values = mf.values() if mf.layers else np.zeros((0, 0), np.float32)
    for i, (layer, row, key) in enumerate(mf.entries()):
        keys_of_entry.append((layer, row, key))
        if layer == write_layer:
            existing[(row, key)] = values[i]
    owner = {f.id: [(keys_of_entry[e][1], keys_of_entry[e][2]) for e in f.entries
                    if keys_of_entry[e][0] == write_layer] for f in mf.facts}
    return existing, owner


def _write_result(path, mf, res, facts_meta, write_layer: int, value_type: str, fingerprint: int):
    """Write the fit's entries for the write layer, other layers as they were, and the ledger."""
    from engram_local.formats.eov import write_memory_file

    dtype = np.float16 if value_type == "f16" else np.float32
    sets, base = {}, 0
    offsets = {}
    layers = sorted(set(mf.layers) | {write_layer})
    for layer in layers:
        if layer == write_layer:
            sets[layer] = (res.rows, res.keys, res.values.astype(dtype))
            n = len(res.rows)
        else:
            s = mf.layers[layer]
            sets[layer] = (np.array(s.rows), None if s.keys is None else np.array(s.keys), np.array(s.values))
            n = len(s)
        offsets[layer] = base
        base += n
    # entries of other layers a fact listed keep their (shifted) indices
    old_entries = mf.entries()
    old_off, acc = {}, 0
    for layer in sorted(mf.layers):
        old_off[layer] = acc
        acc += len(mf.layers[layer])
    for f in facts_meta:
        entries = [offsets[write_layer] + e for e in res.fact_entries.get(f.id, [])]
        for e in f.entries:
            layer = old_entries[e][0] if e < len(old_entries) else None
            if layer is not None and layer != write_layer:
                entries.append(offsets[layer] + e - old_off[layer])
        f.entries = sorted(set(entries))
    write_memory_file(path, fingerprint, sets, facts_meta, history=mf.history)


def _next_ids(taken: set[str], n: int) -> list[str]:
    nums = [int(t[1:]) for t in taken if re.fullmatch(r"f\d+", t)]
    start = max(nums, default=0) + 1
    out = []
    while len(out) < n:
        cand = f"f{start}"
        if cand not in taken:
            out.append(cand)
        start += 1
    return out


# The chat replies each fact is fitted in when the model carries the skill adapter, as the
# adapter says (constants.KEY_ADAPTER_CHAT_FORMS, set by train-skill; CHAT_FORMS when it does not):
# "recite" - the fact said in its written words after two stand-in questions (text.facts);
# "echo"   - the reply that echoes a question made from the fact's words (text.questions), the
#            form the adapter is trained to answer in (train.skill kind "echo").
CHAT_FORMS = ("recite",)


def fact_inputs(facts, em, tok, chat: bool | None = None, forms: Sequence[str] | None = None) -> list:
    """The writer's FactIn of ledger or new facts. With `chat` (default: when `em` carries the
    skill adapter) each fact is also fitted in the chat replies of `forms` (default: the adapter's
    own, else CHAT_FORMS)."""
    from engram_local.memory.writer import FactIn
    from engram_local.text.questions import ECHO_FORMS_PER_FACT, echo_contexts

    if chat is None:
        chat = getattr(em, "skill_adapter", None) is not None
    contexts: dict = {}
    if chat:
        forms = tuple(forms or getattr(em, "chat_forms", None) or CHAT_FORMS)
        parts = ([chat_contexts(facts, tok)] if "recite" in forms else []) + \
                ([echo_contexts(facts, tok, ECHO_FORMS_PER_FACT)] if "echo" in forms else [])
        for part in parts:
            for fid, ctx in part.items():
                have = contexts.setdefault(fid, [])
                have += [c for c in ctx if c not in have]
    return [FactIn(f.id, [f.prompt] + list(f.paraphrases), f.answer, contexts=contexts.get(f.id, []))
            for f in facts]


def _norm_answer(answer: str) -> str:
    return " ".join(str(answer).split())


def _prompts(f) -> list[str]:
    return [f.prompt] + list(f.paraphrases)


def _among(f, facts) -> bool:
    return any(f is g for g in facts)


@dataclass
class _Updates:
    """What `remember`'s facts do to a ledger, taken one at a time in the order given."""
    result: list = field(default_factory=list)      # per fact given: the fact now holding it (new or restated)
    unchanged: list = field(default_factory=list)   # the facts given that restate a fact: (index, that fact)
    current: list = field(default_factory=list)     # the ledger after the call: LedgerFacts kept + NewFacts
    created: list = field(default_factory=list)     # every NewFact of the call that is not a restatement
    records: list = field(default_factory=list)     # (replaced fact, NewFact replacing it), in order
    keep_out: list = field(default_factory=list)    # (prompt, answer) of replaced facts no fact writes now


def _plan_updates(mf, new: list[NewFact], tok, path) -> _Updates:
    """Match the new facts against the ledger, one at a time in the order given (so a call is the
    same as its facts remembered one by one, fitted once): a fact that shares a prompt with a
    fact already there (text.facts.prompt_key: case, spacing and "I'm"/"I am" aside; main
    prompt or paraphrase) replaces it and takes over its other prompts as paraphrases (when the
    answer can follow them), unless it says the same (same prompt, same answer, no new
    paraphrase): then it restates that fact and nothing is written for it. Raises FactInputError,
    before anything is fitted, on a bad or taken id or an answer the tokenizer cannot produce."""
    from engram_local.memory.writer import FitError, answer_tokens
    from engram_local.text.facts import prompt_key

    up = _Updates(current=list(mf.facts))
    keys = {id(g): {prompt_key(p) for p in _prompts(g)} for g in mf.facts}
    for i, given in enumerate(new):
        f = NewFact(given.prompt, given.answer, given.id, list(given.paraphrases))
        label = repr(f.id) if f.id is not None else f"#{i + 1} ({f.prompt!r} -> {f.answer!r})"
        if f.id is not None and (not f.id or any(c.isspace() for c in f.id)):
            raise FactInputError(f"fact id {f.id!r}: ids must be non-empty and contain no spaces")
        fkeys = [prompt_key(p) for p in _prompts(f)]
        matches = [g for g in up.current if keys[id(g)] & set(fkeys)]
        if given.adds and len(matches) == 1 and prompt_key(matches[0].prompt) == fkeys[0]:
            # "I love hiking" after "I love jazz": one fact, both answers ("jazz, hiking"); an
            # answer it already holds is said again (unchanged below)
            had = matches[0].answer
            if _norm_answer(f.answer).casefold() not in {
                    _norm_answer(a).casefold() for a in re.split(r",\s*|\s+and\s+", had)}:
                f.answer = f"{had}, {f.answer}"
            else:
                f.answer = had
        if (len(matches) == 1 and prompt_key(matches[0].prompt) == fkeys[0]
                and _norm_answer(matches[0].answer) == _norm_answer(f.answer)
                and set(fkeys) <= keys[id(matches[0])]
                and (f.id is None or f.id == matches[0].id or all(g.id != f.id for g in up.current))):
            up.result.append(matches[0])
            up.unchanged.append((i, matches[0]))
            continue
        if f.id is not None:
            clash = [g for g in up.current + up.created if g.id == f.id and not _among(g, matches)]
            if clash:
                where = f"is already in {path}" if _among(clash[0], mf.facts) else "is given twice in this call"
                raise FactInputError(f"fact id {f.id!r} {where}; forget it first to rewrite it")
        try:
            for p in _prompts(f):
                answer_tokens(tok, p, f.answer)
        except FitError as exc:
            raise FactInputError(f"fact {label}: {exc}") from None
        others = {k for g in up.current if not _among(g, matches) for k in keys[id(g)]}
        own = set(_prompts(f))
        for g in matches:
            for q in _prompts(g):
                if q in own or prompt_key(q) in others:
                    continue
                try:
                    answer_tokens(tok, q, f.answer)
                except FitError:
                    continue
                f.paraphrases.append(q)
                own.add(q)
            up.records.append((g, f))
        up.current = [g for g in up.current if not _among(g, matches)] + [f]
        keys[id(f)] = {prompt_key(p) for p in _prompts(f)}
        up.created.append(f)
        up.result.append(f)
    written = {k for g in up.current for k in keys[id(g)]}
    for g in mf.facts:
        if not _among(g, up.current):
            up.keep_out += [(q, g.answer) for q in _prompts(g) if prompt_key(q) not in written]
    return up


def remember(path: str | os.PathLike, new: Iterable[NewFact], em, tok, fingerprint: int,
             method: str = "joint", value_type: str | None = None, settings=None,
             progress=None, chat: bool | None = None) -> WriteReport:
    """Add facts to the .eov file at `path` (created if missing), refitting what the new rows
    touch; returns the new facts' ids. `chat`: also fit each fact in the chat form the skill
    adapter recites it in (default: when the model carries the adapter).

    Facts change: a new fact that shares a prompt with a fact of the file (compared by
    text.facts.prompt_key: case, spacing and "I'm"/"I am" aside) replaces it in the same write:
    the old fact leaves the ledger for its history (with the time it was replaced and the new
    fact's id), the rows only it used are dropped, rows it shared are refitted, and its prompts
    give the new answer (prompts spelled differently become paraphrases of the new fact).
    The new fact gets a fresh id (or the id given, which may be the replaced fact's);
    `WriteReport.replaced` maps each new id to the id it replaced. Saying the same again (same
    prompt, same answer) writes nothing for that fact and reports the existing id (in `new_ids`
    and `unchanged`). The facts of one call are taken in order, as if remembered one at a
    time: of two with the same prompt the later wins (the earlier goes to the history).
    Nothing is written when any fact is invalid."""
    import time

    from engram_local.formats.eov import (LedgerFact, MemoryFile, ReplacedFact, locked, read_memory_file,
                                          utc_now)
    from engram_local.memory.writer import FactIn, FitSettings, Fitter, answer_tokens

    t0 = time.time()
    new = list(new)
    if not new:
        raise FactInputError("no facts given")
    wl = em.cfg.write_layer
    with locked(path):
        if os.path.exists(path):
            mf = read_memory_file(path, fingerprint)
        else:
            mf = MemoryFile(fingerprint=fingerprint)
        up = _plan_updates(mf, new, tok, path)
        taken = ({f.id for f in mf.facts} | {r.id for r in mf.history}
                 | {f.id for f in up.created if f.id is not None})
        fresh = iter(_next_ids(taken, sum(f.id is None for f in up.created)))
        for f in up.created:
            if f.id is None:
                f.id = next(fresh)
        for f, r in zip(new, up.result):
            f.id = r.id
        unchanged = [r.id for _, r in up.unchanged]
        writes = [f for f in up.current if isinstance(f, NewFact)]
        if not writes and not up.records:
            rows = sum(len(s) for s in mf.layers.values())
            return WriteReport(new_ids=[r.id for r in up.result], recalled={}, rows=rows,
                               file_bytes=os.path.getsize(path), seconds=time.time() - t0, steps=0,
                               unchanged=unchanged)
        keep = [f for f in up.current if isinstance(f, LedgerFact)]
        gone = {f.id for f in mf.facts} - {f.id for f in keep}
        vt = value_type or (mf.value_type() if mf.layers else "f16")
        s = settings or FitSettings()
        s.method, s.value_dtype = method, vt
        fitter = Fitter(em, tok, s, progress=progress)
        existing, owner = _fit_inputs(mf, wl)
        if gone:   # drop the rows only the replaced facts used (as forget does)
            kept_keys = {k for f in keep for k in owner[f.id]}
            orphan_keys = {k for k in existing if not any(k in v for v in owner.values())}
            existing = {k: v for k, v in existing.items() if k in kept_keys or k in orphan_keys}
            owner = {f.id: owner[f.id] for f in keep}
        ins = fact_inputs(keep + writes, em, tok, chat)
        with _bare(em):
            for q, answer in up.keep_out:
                n = len(answer_tokens(tok, q, answer)[1])
                ins.append(FactIn(f"replaced:{len(ins)}", [q], answer, keep_out=True,
                                  keep_out_tokens=greedy(em, tok, q, n)))
            res = fitter.fit(ins, existing, owner)
        now = utc_now()
        meta = keep + [LedgerFact(id=f.id, prompt=f.prompt, answer=f.answer, paraphrases=list(f.paraphrases),
                                  written=now, method=method) for f in writes]
        added = [ReplacedFact(id=g.id, prompt=g.prompt, answer=g.answer, paraphrases=list(g.paraphrases),
                              written=g.written if isinstance(g, LedgerFact) else now, replaced=now, by=f.id)
                 for g, f in up.records]
        mf.history = list(mf.history) + added
        _write_result(path, mf, res, meta, wl, vt, fingerprint)
        size = os.path.getsize(path)
    replaced = {}
    for g, f in up.records:
        replaced[f.id] = g.id if f.id not in replaced else replaced[f.id] + ", " + g.id
    return WriteReport(new_ids=[r.id for r in up.result], recalled=res.recalled, rows=len(res.rows),
                       file_bytes=size, seconds=time.time() - t0, steps=res.steps, replaced=replaced,
                       unchanged=unchanged, history=added)


def greedy(em, tok, prompt: str, n: int, stacks=None) -> list[int]:
    """n greedy tokens after `prompt` (full forward per token; for short checks)."""
    from engram_local.text.tokens import encode

    return greedy_ids(em, encode(tok, prompt), n)


def greedy_ids(em, ids: Sequence[int], n: int, stop: Iterable[int] = ()) -> list[int]:
    """Up to n greedy tokens after the token ids `ids`, ending after a token of `stop` (full
    forward per token; for short checks and training targets)."""
    import torch

    ids, out, stop = list(ids), [], set(stop)
    with torch.no_grad():
        for _ in range(n):
            out.append(int(em(torch.tensor([ids + out])).logits[0, -1].argmax()))
            if out[-1] in stop:
                break
    return out


def forget(path: str | os.PathLike, fact_ids: Sequence[str], em, tok, fingerprint: int,
           settings=None, progress=None, chat: bool | None = None) -> WriteReport:
    """Remove facts: their ledger entries and every row only they used are dropped, rows they
    shared are refitted for the remaining facts, and when the forgotten prompt still looks up a
    remaining row, the refit also holds that prompt to the model's own continuation. The file is
    rewritten whole, so none of the forgotten facts' text or rows remain in its bytes."""
    import time

    from engram_local.formats.eov import locked, read_memory_file
    from engram_local.memory.writer import FactIn, FitSettings, Fitter, answer_tokens

    t0 = time.time()
    wl = em.cfg.write_layer
    with locked(path):
        mf = read_memory_file(path, fingerprint)
        known = {f.id for f in mf.facts}
        unknown = [i for i in fact_ids if i not in known]
        if unknown:
            raise FactInputError(f"{path}: no fact with id {', '.join(map(repr, unknown))} "
                                 f"(ids: {', '.join(sorted(known)) or 'none'})")
        gone = [f for f in mf.facts if f.id in set(fact_ids)]
        keep = [f for f in mf.facts if f.id not in set(fact_ids)]
        existing, owner = _fit_inputs(mf, wl)
        kept_keys = {k for f in keep for k in owner[f.id]}
        orphan_keys = {k for k in existing if not any(k in v for v in owner.values())}
        dropped = [k for k in existing if k not in kept_keys and k not in orphan_keys]
        existing = {k: v for k, v in existing.items() if k in kept_keys or k in orphan_keys}
        owner = {f.id: owner[f.id] for f in keep}
        s = settings or FitSettings()
        s.value_dtype = mf.value_type() if mf.layers else "f16"
        fitter = Fitter(em, tok, s, progress=progress)
        ins = fact_inputs(keep, em, tok, chat)
        # the forgotten prompts: if they still read a remaining row, hold them to the model's own
        # continuation without any memory
        with _bare(em):
            for f in gone:
                for p in [f.prompt] + list(f.paraphrases):
                    n = len(answer_tokens(tok, p, f.answer)[1])
                    ins.append(FactIn(f"forgotten:{len(ins)}", [p], f.answer, keep_out=True,
                                      keep_out_tokens=greedy(em, tok, p, n)))
            res = fitter.fit(ins, existing, owner, dropped=dropped) \
                if (any(not f.keep_out for f in ins) or existing) else None
        if res is None:
            from engram_local.memory.writer import FitResult
            res = FitResult(rows=np.zeros(0, np.int64), keys=np.zeros(0, np.int64),
                            values=np.zeros((0, em.cfg.head_dim), np.float32), fact_entries={},
                            recalled={})
        _write_result(path, mf, res, keep, wl, s.value_dtype, fingerprint)
        size = os.path.getsize(path)
    return WriteReport(new_ids=[], recalled=res.recalled, rows=len(res.rows), file_bytes=size,
                       seconds=time.time() - t0, steps=res.steps)
