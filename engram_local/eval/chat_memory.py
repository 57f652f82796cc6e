"""Natural chat memory: statements as people type them, questions as people ask them.

The protocol (docs/chat-memory.md), through the paths a user takes:

  1. `remember` a persona's statements into a fresh .eov (memory.facade.remember with each
     statement read by text.facts.read_statement, as `engram-local remember STATEMENT...`);
  2. ask every question as one chat user turn (runtime.session.Session, as
     `engram-local run --chat -p Q`): greedy, 32 tokens, KV cache reset before each question;
  3. a question is answered when any of its `expect` strings is contained in the reply
     (case-insensitive).

Conditions: memory (rows + skill adapter, the default setting), none (skill adapter, no rows),
memory-noskill (rows fitted on the model without the adapter, run without it), prompt (every
statement in the prompt), retrieval (the top-3 statements by all-MiniLM-L6-v2 in the prompt;
"unavailable" when the embedding model is not installed).

Persona file schema (../shared/data/chat-memory/p*.json): {"persona": str, "statements": [str],
"facts": [{"statement", "answer", "direct": [q], "paraphrased": [q], "expect": [str]}],
"indirect": [{"question", "expect": [str], "needs"?}], "general": [{"question", "expect"}]}.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

from engram_local.eval.workdir import work_directory

KINDS = ("direct", "paraphrased", "indirect", "general")
CONDITIONS = {
    "memory": "memory + skill adapter (the default)",
    "none": "no memory, skill adapter",
    "memory-noskill": "memory fitted and run without the skill adapter",
    "prompt": "all statements in the prompt",
    "retrieval": "top-3 retrieved statements in the prompt",
}
N_PREDICT = 32
TOP_K = 3
CONTEXT_HEADER = "Things to know about me: "


class ChatMemoryError(ValueError):
    """Bad input: a persona file that cannot be read or does not follow the schema, a bad condition."""


@dataclass
class Question:
    kind: str
    text: str
    expect: list[str]
    fact: int | None = None        # index of the fact a direct/paraphrased question asks about


@dataclass
class Persona:
    name: str
    path: Path
    description: str
    statements: list[str]
    facts: list                    # memory.NewFacts of the statements, as `remember` reads them
    questions: list[Question] = field(default_factory=list)


# --------------------------------------------------------------------------- input

def _strings(value, where: str, allow_empty: bool = False) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(x, str) and x.strip() for x in value):
        raise ChatMemoryError(f"{where} must be a list of non-empty strings")
    if not value and not allow_empty:
        raise ChatMemoryError(f"{where} is empty")
    return list(value)


def load_persona(path: str | os.PathLike) -> Persona:
    """Read and check one persona file; every error names the file."""
    from engram_local.memory import facade as memory

    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ChatMemoryError(f"{path}: persona file not found") from None
    except IsADirectoryError:
        raise ChatMemoryError(f"{path}: is a directory, not a persona file") from None
    except json.JSONDecodeError as e:
        raise ChatMemoryError(f"{path}: invalid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ChatMemoryError(f"{path}: cannot read the persona file ({e})") from None
    try:
        if not isinstance(data, dict):
            raise ChatMemoryError("expected a JSON object")
        for key in ("statements", "facts"):
            if key not in data:
                raise ChatMemoryError(f'missing "{key}"')
        statements = _strings(data["statements"], '"statements"')
        facts = []
        for s in statements:
            try:
                facts += memory.statement_facts(s)
            except memory.FactInputError as e:
                raise ChatMemoryError(f"statement {s!r}: {e}") from None
        questions: list[Question] = []
        if not isinstance(data["facts"], list):
            raise ChatMemoryError('"facts" must be a list')
        for i, f in enumerate(data["facts"]):
            where = f'"facts"[{i}]'
            if not isinstance(f, dict):
                raise ChatMemoryError(f"{where} must be an object")
            expect = _strings(f.get("expect"), f'{where}."expect"')
            for kind in ("direct", "paraphrased"):
                for q in _strings(f.get(kind, []), f'{where}."{kind}"', allow_empty=True):
                    questions.append(Question(kind, q, expect, i))
        for kind in ("indirect", "general"):
            items = data.get(kind, [])
            if not isinstance(items, list):
                raise ChatMemoryError(f'"{kind}" must be a list')
            for i, item in enumerate(items):
                where = f'"{kind}"[{i}]'
                if not isinstance(item, dict) or not isinstance(item.get("question"), str) \
                        or not item["question"].strip():
                    raise ChatMemoryError(f'{where} must be an object with a "question" string')
                questions.append(Question(kind, item["question"], _strings(item.get("expect"), f'{where}."expect"')))
        if not questions:
            raise ChatMemoryError("no questions")
    except ChatMemoryError as e:
        raise ChatMemoryError(f"{path}: {e}") from None
    return Persona(path.stem, path, str(data.get("persona", "")), statements, facts, questions)


def parse_conditions(spec: str | Sequence[str]) -> tuple[str, ...]:
    parts = spec.split(",") if isinstance(spec, str) else [p for s in spec for p in s.split(",")]
    out = []
    for p in (x.strip() for x in parts):
        if not p:
            continue
        if p not in CONDITIONS:
            raise ChatMemoryError(f"unknown condition {p!r}: choose from {', '.join(CONDITIONS)}")
        if p not in out:
            out.append(p)
    if not out:
        raise ChatMemoryError("no conditions given")
    return tuple(out)


# --------------------------------------------------------------------------- scoring

def hit(expect: Sequence[str], reply: str) -> bool:
    """Case-insensitive containment of any expected string in the reply."""
    low = str(reply).lower()
    return any(str(e).lower() in low for e in expect if str(e))


def context_prompt(statements: Sequence[str], question: str) -> str:
    """The in-prompt baseline's user turn (as ../shared/checks/contracts.py check_chat writes it)."""
    return CONTEXT_HEADER + " ".join(statements) + "\n\n" + question


def tally(answers: Sequence[dict]) -> dict:
    """{kind: {"hits", "total", "rate"}} plus "all", over answers with "kind" and "hit"."""
    out = {}
    for kind in KINDS + ("all",):
        sel = [a for a in answers if kind == "all" or a["kind"] == kind]
        h = sum(bool(a["hit"]) for a in sel)
        out[kind] = {"hits": h, "total": len(sel), "rate": (h / len(sel)) if sel else None}
    return out


# --------------------------------------------------------------------------- the run

@dataclass
class Settings:
    conditions: tuple[str, ...] = tuple(CONDITIONS)
    n_predict: int = N_PREDICT
    top_k: int = TOP_K
    threads: int | None = None
    n_ctx: int = 2048
    backend: str = "auto"


class ChatMemoryEval:
    def __init__(self, model=None, settings: Settings | None = None, work_dir=None, embedder=None,
                 log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)):
        self.model = model
        self.s = settings or Settings()
        self.work_dir = Path(work_dir) if work_dir is not None else None
        self._embedder = embedder
        self._models: dict = {}
        self.log = log

    # ---------------------------------------------------------------- memory files
    def _torch_model(self, skill: bool):
        if skill not in self._models:
            from engram_local.memory import facade as memory
            from engram_local.runtime import loader
            from engram_local.runtime.session import _quiet_transformers

            if self.s.threads:
                import torch
                torch.set_num_threads(int(self.s.threads))
            _quiet_transformers()
            if skill:       # what `engram-local remember` loads
                self._models[skill] = memory.load_model_for_memory(self.model)
            else:
                em, tok, _ = loader.load_model(self.model, adapter=False)
                self._models[skill] = (em, tok, memory.fingerprint_of(self.model))
        return self._models[skill]

    def _memory_file(self, persona: Persona, skill: bool) -> tuple[Path, dict]:
        """The persona's .eov, written by memory.facade.remember (reused from --work-dir when its
        facts are the persona's statements and it binds to this model)."""
        from engram_local.formats.eov import read_memory_file
        from engram_local.memory import facade as memory

        eov = self.work / f"{persona.name}-{'skill' if skill else 'noskill'}.eov"
        if eov.exists():
            try:
                mf = read_memory_file(eov, memory.fingerprint_of(self.model))
                if [(f.prompt, f.answer, list(f.paraphrases)) for f in mf.facts] == \
                        [(f.prompt, f.answer, list(f.paraphrases)) for f in persona.facts]:
                    return eov, {"eov": str(eov), "bytes": eov.stat().st_size, "seconds": 0.0, "reused": True}
            except (ValueError, OSError):
                pass
            eov.unlink()
        em, tok, fp = self._torch_model(skill)
        facts = [replace(f, paraphrases=list(f.paraphrases)) for f in persona.facts]   # remember sets ids
        try:
            rep = memory.remember(eov, facts, em, tok, fp)
        except memory.FactInputError as e:
            raise ChatMemoryError(f"{persona.path}: {e}") from None
        missed = [fid for fid, ok in rep.recalled.items() if not ok]
        return eov, {"eov": str(eov), "bytes": rep.file_bytes, "rows": rep.rows, "seconds": round(rep.seconds, 2),
                     "not_recalled_after_fit": missed, "reused": False}

    def _retriever(self, persona: Persona):
        from engram_local.runtime.retrieval import BertEncoder, Retriever

        if self._embedder is None:
            self._embedder = BertEncoder()
        return Retriever(self._embedder, persona.statements)

    # ---------------------------------------------------------------- one condition
    def _ask(self, persona: Persona, cond: str, eov: Path | None, tick: Callable[[], None]) -> list[dict]:
        from engram_local.runtime.sampling import Sampler
        from engram_local.runtime.session import PromptTooLong, Session

        skill = cond != "memory-noskill"
        session = Session(self.model, overrides=[str(eov)] if eov else [], backend=self.s.backend,
                          n_ctx=self.s.n_ctx, n_threads=self.s.threads, skill=skill, log=lambda m: None)
        retriever = self._retriever(persona) if cond == "retrieval" else None
        greedy = Sampler(temp=0.0)
        out = []
        try:
            for q in persona.questions:
                if cond == "prompt":
                    text = context_prompt(persona.statements, q.text)
                elif cond == "retrieval":
                    top = retriever.top_k(q.text, self.s.top_k)
                    text = context_prompt([persona.statements[i] for i in top], q.text)
                else:
                    text = q.text
                session.reset()
                try:
                    ids = session.tokenize(text, chat=True)
                    reply = session.generate(ids, self.s.n_predict, greedy,
                                             opening=session.reply_opening(ids, text)).text
                except PromptTooLong:
                    reply = ""
                out.append({"kind": q.kind, "question": q.text, "expect": q.expect, "reply": reply,
                            "hit": hit(q.expect, reply)})
                tick()
        finally:
            session.close()
        return out

    # ---------------------------------------------------------------- the run
    def run(self, paths: Sequence[str | os.PathLike], progress: bool = True, command: str | None = None) -> dict:
        personas = [load_persona(p) for p in paths]          # all checked before any work
        if not personas:
            raise ChatMemoryError("no persona files given")
        with work_directory(self.work_dir, "engram-chat-memory-") as work:
            self.work = work
            return self._run(personas, progress, command)

    def _retrieval_status(self) -> str | None:
        if self._embedder is not None:
            return None
        from engram_local.runtime.retrieval import RetrievalUnavailable, minilm_dir

        try:
            minilm_dir()
        except RetrievalUnavailable as e:
            return str(e)
        return None

    def _run(self, personas: list[Persona], progress: bool, command: str | None) -> dict:
        from tqdm import tqdm

        from engram_local.runtime import loader

        t0 = time.perf_counter()
        conds = list(self.s.conditions)
        unavailable = {}
        if "retrieval" in conds:
            reason = self._retrieval_status()
            if reason:
                unavailable["retrieval"] = reason
                self.log(f"engram-local: condition retrieval unavailable: {reason}")
        live = [c for c in conds if c not in unavailable]
        bar = tqdm(total=sum(len(p.questions) for p in personas) * len(live), desc="chat-memory",
                   unit="q", file=sys.stderr, disable=not progress)
        rows = []
        try:
            for p in personas:
                prep, answers = {}, {}
                for cond in live:
                    eov = None
                    if cond in ("memory", "memory-noskill"):
                        skill = cond == "memory"
                        bar.set_postfix_str(f"{p.name} remember")
                        eov, prep[cond] = self._memory_file(p, skill)
                    bar.set_postfix_str(f"{p.name} {cond}")
                    answers[cond] = self._ask(p, cond, eov, lambda: bar.update(1))
                rows.append({"name": p.name, "file": str(p.path), "persona": p.description,
                             "statements": len(p.statements), "remember": prep,
                             "conditions": {c: tally(a) for c, a in answers.items()}, "answers": answers})
        finally:
            bar.close()
        summary = {}
        for c in conds:
            if c in unavailable:
                summary[c] = {"name": CONDITIONS[c], "status": "unavailable", "reason": unavailable[c]}
            else:
                summary[c] = {"name": CONDITIONS[c], "status": "ok",
                              **tally([a for r in rows for a in r["answers"][c]])}
        target = loader.resolve(self.model)
        return {"command": command, "model": str(getattr(target, "path", target)),
                "settings": {"conditions": conds, "n_predict": self.s.n_predict, "temp": 0.0,
                             "top_k": self.s.top_k, "threads": self.s.threads, "n_ctx": self.s.n_ctx,
                             "context_header": CONTEXT_HEADER},
                "conditions": summary, "personas": rows, "seconds": round(time.perf_counter() - t0, 1)}


def chat_memory(paths: Sequence[str | os.PathLike], model=None, settings: Settings | None = None, work_dir=None,
                embedder=None, progress: bool = True, command: str | None = None) -> dict:
    return ChatMemoryEval(model, settings, work_dir, embedder).run(paths, progress, command)


# --------------------------------------------------------------------------- outputs

def _cell(t: dict) -> str:
    if not t or not t.get("total"):
        return "-"
    return f"{t['hits']}/{t['total']} ({100 * t['rate']:.0f}%)"


def markdown(results: dict) -> str:
    personas = results.get("personas", [])
    lines = ["# Chat memory: natural statements, natural questions", "",
             f"Model: `{results['model']}`; personas ({len(personas)}): "
             f"{', '.join(p['name'] for p in personas)}; greedy, {results['settings']['n_predict']} tokens per "
             f"reply; wall time {results.get('seconds', 0):.0f} s."]
    if results.get("command"):
        lines += ["", "Command:", "", "```", results["command"], "```"]
    head = "| condition | " + " | ".join(KINDS) + " | all |"
    sep = "|---|" + "---:|" * (len(KINDS) + 1)
    lines += ["", head, sep]
    for c, agg in results["conditions"].items():
        if agg.get("status") != "ok":
            lines.append(f"| {c} | " + " | ".join(["unavailable"] * (len(KINDS) + 1)) + " |")
            continue
        lines.append(f"| {c} | " + " | ".join(_cell(agg[k]) for k in KINDS + ("all",)) + " |")
    lines += ["", "Hits/total (%): a reply counts when it contains any expected string (case-insensitive).", ""]
    for c, agg in results["conditions"].items():
        extra = f" ({agg['reason']})" if agg.get("status") != "ok" else ""
        lines.append(f"- **{c}**: {agg['name']}{extra}")
    lines += ["", "## Per persona", "", "| persona | condition | " + " | ".join(KINDS) + " | all |",
              "|---|---|" + "---:|" * (len(KINDS) + 1)]
    for p in personas:
        for c, t in p["conditions"].items():
            lines.append(f"| {p['name']} | {c} | " + " | ".join(_cell(t[k]) for k in KINDS + ("all",)) + " |")
    return "\n".join(lines) + "\n"


def write(results: dict, json_out=None, report_out=None) -> dict:
    written = {}
    if json_out is not None:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        written["json"] = str(json_out)
    if report_out is not None:
        Path(report_out).parent.mkdir(parents=True, exist_ok=True)
        Path(report_out).write_text(markdown(results), encoding="utf-8")
        written["report"] = str(report_out)
    return written
