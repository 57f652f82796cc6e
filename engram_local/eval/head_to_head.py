"""The head-to-head evaluation: per-user Engram memory against what a user would use instead.

For each user file (the paper's schema: users/*.json) and each condition, on one model
(user-as-engram-method.md §6-§7):

  A  untouched base                          no adapter, no rows
  B  per-user LoRA r64                        the user's own LoRA (engram_local.eval.user_lora)
  C  per-user Engram rows                     rows fitted on the base model (no adapter)
  D  per-user LoRA + per-user Engram          B's LoRA with C's rows (naive stacking)
  E  shared adapter only                      the MODEL_DIR's skill adapter, as `run` ships it
  F  layered                                  rows fitted through the skill adapter + the adapter
  G  all facts in the prompt                  base model, every fact sentence before the prompt
  H  retrieval top-k                          base model, the k facts nearest to the query
                                              (all-MiniLM-L6-v2 cosine, engram_local.runtime.retrieval)

Metrics (engram_local.eval.scoring): direct recall (first-token top-1 and whole answer) on the
paper-rule completion prompts, chat-form recall, indirect_any and indirect_top1 on the first 20
indirect probes, the bits-per-byte change on an unrelated text against A, users worse than A
on indirect_any, context tokens added per query and ms per query (both over the indirect
probes), bytes stored per user. Generation runs on llama.cpp (greedy); bits per byte, row
fitting and LoRA training on torch. Per-user work (rows, LoRAs) is cached in a work directory.

E and F run the model `run` runs with the skill on: the MODEL_DIR's backbone-skill.gguf (the
adapter folded in) through the same Session path, and torch (rows, bits per byte) loads that
file too. An --adapter other than the MODEL_DIR's own is folded the same way first, into a
MODEL_DIR in the work directory (convert.model_dir.skill_model_dir). B and D, the per-user
LoRA, stay an adapter over the plain backbone (llama.cpp LoRA; merged in fp32 on torch).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from engram_local import constants
from engram_local.eval import scoring
from engram_local.eval.user_lora import UserLoRASettings
from engram_local.eval.workdir import work_directory

# Shared CPU cores: OpenMP threads that spin while waiting slow every other process down (and
# this one, ~10x on 2 cores next to another torch job). Effective when torch is not loaded yet.
os.environ.setdefault("OMP_WAIT_POLICY", "passive")

DEFAULT_TEXT = constants.UNRELATED_TEXT
LETTERS = "ABCDEFGH"
METRICS = ("direct_top1", "direct_full", "chat_recall", "indirect_any", "indirect_top1", "bpb",
           "delta_bpb", "context_tokens", "ms_per_query", "bytes_stored", "prep_s", "eval_s")


@dataclass(frozen=True)
class Condition:
    letter: str
    name: str
    lora: bool = False              # the user's own LoRA (B, D)
    rows: str | None = None         # the user's Engram rows, fitted on "base" or through "skill"
    skill: bool = False             # the shared skill adapter
    context: str | None = None      # facts in the prompt: "all" or "topk"


CONDITIONS = {c.letter: c for c in (
    Condition("A", "untouched base"),
    Condition("B", "per-user LoRA r64", lora=True),
    Condition("C", "per-user Engram rows", rows="base"),
    Condition("D", "per-user LoRA + per-user Engram", lora=True, rows="base"),
    Condition("E", "shared adapter only", skill=True),
    Condition("F", "layered: per-user Engram + shared adapter", rows="skill", skill=True),
    Condition("G", "all facts in the prompt", context="all"),
    Condition("H", "retrieval top-k facts in the prompt", context="topk"),
)}


class HeadToHeadError(ValueError):
    """A problem with the evaluation's inputs, explained in the message."""


def parse_conditions(spec: str | Sequence[str]) -> tuple[str, ...]:
    """"A,C,F" (or "ACF", or a list) -> ("A", "C", "F") in A-H order; unknown letters raise."""
    items = spec.replace(",", " ").split() if isinstance(spec, str) else list(spec)
    letters = [ch.upper() for item in items for ch in str(item).strip()]
    bad = sorted({x for x in letters if x not in CONDITIONS})
    if bad or not letters:
        raise HeadToHeadError(f"conditions {spec!r}: choose letters from {','.join(LETTERS)} "
                              f"(e.g. A,C,F){'; unknown: ' + ','.join(bad) if bad else ''}")
    return tuple(x for x in LETTERS if x in letters)


@dataclass
class Settings:
    conditions: tuple = tuple(LETTERS)
    top_k: int = 3                          # H: facts retrieved per query
    indirect_probes: int = scoring.INDIRECT_PROBES
    lora: UserLoRASettings = field(default_factory=UserLoRASettings)
    bpb: bool = True                        # measure bits per byte (torch) for the delta
    backend: str = "llama.cpp"              # generation backend ("torch" works too, slowly)
    threads: int | None = None
    n_ctx: int = 4096
    details: bool = True                    # keep every probe's output in the results


@dataclass
class User:
    uid: str
    path: Path
    facts: list                             # memory.NewFact, the paper's prompt rule
    sentences: list[str]                    # one sentence per fact: what G and H put in the prompt
    chat: list[tuple[str, str]]             # (question, gold)
    indirect: list[tuple[str, str, str]]    # (completion prompt, question, gold)


def load_user(path: str | Path, n_indirect: int = scoring.INDIRECT_PROBES) -> User:
    from engram_local.memory.facade import FactInputError, user_json_facts
    from engram_local.text.user_files import read_user_file

    path = Path(path)
    try:
        user = read_user_file(path)
        facts = user_json_facts(user)
        chat, indirect = scoring.chat_probes(user.doc), scoring.indirect_probes(user.doc, n_indirect)
    except (FactInputError, OSError, ValueError, KeyError, TypeError) as exc:
        raise HeadToHeadError(f"{path}: not a usable user file ({exc})") from None
    return User(path.stem, path, facts, [scoring.fact_sentence(f.prompt, f.answer) for f in facts],
                chat, indirect)


def user_paths(paths: Sequence[str | Path]) -> list[Path]:
    """User files: files as given, directories as their *.json (sorted); uids (file stems) unique."""
    from engram_local.text.user_files import user_files

    if not paths:
        raise HeadToHeadError("no user files given (--users FILE)")
    try:
        files = user_files(paths)
    except FileNotFoundError as exc:
        raise HeadToHeadError(str(exc)) from None
    seen: dict[str, Path] = {}
    for f in files:
        if f.stem in seen and seen[f.stem].resolve() != f.resolve():
            raise HeadToHeadError(f"two user files named {f.stem}: {seen[f.stem]} and {f}")
        seen[f.stem] = f
    return list(seen.values())


@dataclass
class _Artifacts:
    overrides: list = field(default_factory=list)   # .eov paths
    adapter: Path | None = None                     # llama.cpp LoRA adapter GGUF
    peft: Path | None = None                        # the user's LoRA as PEFT (torch)
    bytes: int = 0                                  # stored for this user
    prep_s: float = 0.0


class HeadToHead:
    """One evaluation run over a model; `run(user_paths)` returns the results dict."""

    def __init__(self, model: str | Path | None = None, settings: Settings | None = None,
                 work_dir: str | Path | None = None, text: str | Path | None = None,
                 adapter: str | Path | None = None, embedder=None,
                 log: Callable[[str], None] | None = None):
        from engram_local.runtime import loader
        from engram_local.formats.sidecar import open_sidecar

        self.s = settings or Settings()
        self.s.conditions = parse_conditions(self.s.conditions)
        self.log = log or (lambda m: print(m, file=sys.stderr, flush=True))
        try:
            target = loader.resolve(model)
        except FileNotFoundError as exc:
            raise HeadToHeadError(str(exc)) from None
        if not isinstance(target, loader.ModelDir):
            raise HeadToHeadError(f"{target}: the head-to-head evaluation needs a MODEL_DIR "
                                  "(convert the checkpoint with `engram-local convert` first)")
        self.md = target
        self.sidecar = open_sidecar(self.md.engram)
        self.fp = int(self.sidecar.fingerprint)
        self.adapter = Path(adapter) if adapter is not None else self.md.adapter
        skill_conds = [c for c in self.s.conditions if CONDITIONS[c].skill]
        if skill_conds and self.adapter is None:
            raise HeadToHeadError(
                f"conditions {','.join(skill_conds)} need the shared skill adapter, and {self.md.path} has "
                f"no adapter.gguf: train one (`engram-local train-skill -o {self.md.path / 'adapter.gguf'}`), "
                "pass --adapter FILE, or leave E and F out (--conditions)")
        if self.adapter is not None and not self.adapter.is_file():
            raise HeadToHeadError(f"{self.adapter}: skill adapter not found")
        self.text_path = Path(text) if text is not None else DEFAULT_TEXT
        try:
            self.text = self.text_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise HeadToHeadError(f"{self.text_path}: cannot read the unrelated text ({exc})") from None
        if not self.text.strip():
            raise HeadToHeadError(f"{self.text_path}: the unrelated text is empty")
        self.work_dir = Path(work_dir) if work_dir is not None else None
        self._embedder = embedder
        self._models: dict[str, tuple] = {}
        self._bpb: dict[str, float] = {}
        self._adapter_key: str | None = None
        self._skill_md = None                   # the MODEL_DIR of E and F (_skill_model_dir)
        st = self.md.backbone.stat()
        self.model_key = f"{self.fp:016x}:{st.st_size}:{st.st_mtime_ns}"

    # ---------------------------------------------------------------- models
    def _skill_model_dir(self):
        """The MODEL_DIR whose skill-on setting E and F run: this one for its own adapter, else
        one in the work directory with the --adapter folded in (as `convert` folds one)."""
        if self._skill_md is None:
            from engram_local.runtime import loader

            own = self.md.adapter
            if own is not None and os.path.samefile(own, self.adapter):
                self._skill_md = self.md
            else:
                from engram_local.convert.model_dir import skill_model_dir
                from engram_local.train.corpus_text import sha256_file

                dest = self.work / f"skill-model-{sha256_file(self.adapter)[:16]}"
                self._skill_md = loader.ModelDir.at(skill_model_dir(self.md.path, self.adapter, dest, self.log))
        return self._skill_md

    def _model(self, skill: bool):
        """(EngramModel, tokenizer) on torch: the base, or the skill-on model `run` ships
        (loader.load_model with the adapter: backbone-skill.gguf, dequantized)."""
        key = "skill" if skill else "base"
        if key not in self._models:
            from engram_local.runtime import loader
            from engram_local.runtime.session import _quiet_transformers

            if self.s.threads:
                import torch
                torch.set_num_threads(int(self.s.threads))
            _quiet_transformers()
            md = self._skill_model_dir() if skill else self.md
            em, tok, _ = loader.load_model(md.path, adapter=skill)
            self._models[key] = (em, tok)
        return self._models[key]

    def _embedder_(self):
        if self._embedder is None:
            from engram_local.runtime.retrieval import BertEncoder
            self._embedder = BertEncoder()
        return self._embedder

    # ---------------------------------------------------------------- per-user work
    def _rows(self, user: User, kind: str, prep: dict) -> Path:
        from engram_local.train.corpus_text import sha256_file
        from engram_local.train.skill import training_rows

        if kind not in prep:
            if kind == "skill" and self._adapter_key is None:
                # rows fitted through the skill-on model: keyed by the file that holds it
                md = self._skill_model_dir()
                key = sha256_file(md.backbone_gguf(True))
                if md.unfolded_adapter(True) is not None:
                    key += sha256_file(md.unfolded_adapter(True))
                self._adapter_key = key[:16]
            directory = self.work / ("rows-base" if kind == "base" else f"rows-skill-{self._adapter_key}")
            eov = directory / f"{user.uid}.eov"
            existed = eov.exists()
            em, tok = self._model(kind == "skill")
            t0 = time.perf_counter()
            eov = training_rows(em, tok, self.fp, [user.path], directory, self.log)[user.uid]
            prep[kind] = {"eov": str(eov), "bytes": eov.stat().st_size, "seconds": time.perf_counter() - t0,
                          "existed": existed}
        return Path(prep[kind]["eov"])

    def _lora(self, user: User, prep: dict):
        from engram_local.eval.user_lora import user_lora

        if "lora" not in prep:
            em, tok = self._model(False)
            t0 = time.perf_counter()
            res = user_lora(em, tok, user.facts, self.md.backbone, self.work / "lora" / user.uid,
                            self.model_key, self.s.lora)
            prep["lora"] = dict(res.as_dict(), peft=str(res.peft_dir), run_seconds=time.perf_counter() - t0)
        return prep["lora"]

    def _prepare(self, user: User, cond: Condition, prep: dict) -> _Artifacts:
        art = _Artifacts()
        if cond.rows:
            eov = self._rows(user, cond.rows, prep)
            art.overrides.append(eov)
            art.bytes += prep[cond.rows]["bytes"]
            art.prep_s += prep[cond.rows]["seconds"]
        if cond.lora:
            lo = self._lora(user, prep)
            art.adapter, art.peft = Path(lo["gguf"]), Path(lo["peft"])
            art.bytes += lo["bytes"]
            art.prep_s += lo["run_seconds"]
        if cond.context:
            art.bytes = len(" ".join(user.sentences).encode("utf-8"))
        return art

    # ---------------------------------------------------------------- bits per byte
    def _bits(self, cond: Condition, art: _Artifacts) -> float:
        from engram_local.model import lora
        from engram_local.runtime.loader import attach_tables
        from engram_local.memory.facade import open_overrides
        from engram_local.runtime.perplexity import bits_per_byte

        shared = None if (cond.lora or cond.rows) else ("skill" if cond.skill else "base")
        if shared in self._bpb:
            return self._bpb[shared]
        em, tok = self._model(cond.skill)
        stacks = open_overrides(art.overrides, self.fp) if art.overrides else None
        if cond.lora:
            lora.load_peft(em.backbone, art.peft)
        try:
            attach_tables(em, self.sidecar, stacks)
            value = bits_per_byte(em, tok, self.text).bpb
        finally:
            if cond.lora:
                lora.remove_lora(em.backbone)
            attach_tables(em, self.sidecar, None)
        if shared:
            self._bpb[shared] = value
        return value

    # ---------------------------------------------------------------- generation
    def _evaluate(self, user: User, cond: Condition, art: _Artifacts) -> dict:
        from engram_local.runtime.session import PromptTooLong, Session
        from engram_local.runtime.sampling import Sampler
        from engram_local.text.facts import join_answer

        # E, F: the skill-on setting of a MODEL_DIR, exactly as `run` opens it; B, D: the per-user
        # LoRA over the plain backbone; the rest: the plain backbone.
        model = self._skill_model_dir().path if cond.skill else self.md.path
        session = Session(model, overrides=[str(p) for p in art.overrides], backend=self.s.backend,
                          n_ctx=self.s.n_ctx, n_threads=self.s.threads, skill=cond.skill,
                          adapter=art.adapter, log=lambda m: None)
        retriever = None
        if cond.context == "topk":
            from engram_local.runtime.retrieval import Retriever
            retriever = Retriever(self._embedder_(), user.sentences)

        def context(query: str) -> str:
            if cond.context == "all":
                return scoring.context_block(user.sentences)
            if cond.context == "topk":
                return scoring.context_block([user.sentences[i] for i in retriever.top_k(query, self.s.top_k)])
            return ""

        def plain(text: str) -> list[int]:
            return session.backend.tokenize(text, add_bos=False)

        greedy = Sampler(temp=0.0)

        def generate(text: str, n: int, chat: bool = False, fresh: bool = False):
            # Untimed probes reuse the KV cache of the prompt start they share with the previous
            # one (G's facts block); timed ones (fresh) pay their whole prompt.
            ids = session.tokenize(text, chat=chat)
            if fresh:
                session.reset()
            try:
                opening = session.reply_opening(ids, text) if chat else []     # as `run` opens a chat reply
                return ids, session.generate(ids, n, greedy, opening=opening)
            except PromptTooLong:
                return ids, None

        probes, direct_top1, direct_full, chat_hits, any_hits, top1_hits, ctx_tokens, ms = ([] for _ in range(8))
        try:
            for f in user.facts:
                _, g = generate(context(f.prompt) + f.prompt,
                                len(plain(join_answer(f.prompt, f.answer))) + scoring.DIRECT_EXTRA_TOKENS)
                text, toks = (g.text, g.tokens) if g else ("", [])
                gold = scoring.gold_first_tokens(plain, f.answer, f.prompt)
                direct_top1.append(scoring.first_token_hit(toks, gold))
                direct_full.append(scoring.contains(f.answer, text))
                probes.append({"kind": "direct", "prompt": f.prompt, "gold": f.answer, "output": text,
                               "top1": direct_top1[-1], "hit": direct_full[-1]})
            for q, gold in user.chat:
                _, g = generate(context(q) + q, scoring.CHAT_TOKENS, chat=True)
                text = g.text if g else ""
                chat_hits.append(scoring.contains(gold, text))
                probes.append({"kind": "chat", "prompt": q, "gold": gold, "output": text, "hit": chat_hits[-1]})
            for prompt, q, gold in user.indirect:
                t0 = time.perf_counter()
                ids, g = generate(context(q) + prompt, scoring.INDIRECT_TOKENS, fresh=True)
                ms.append((time.perf_counter() - t0) * 1000.0)
                ctx_tokens.append(len(ids) - len(session.tokenize(prompt)))
                text, toks = (g.text, g.tokens) if g else ("", [])
                any_hits.append(scoring.contains(gold, text))
                top1_hits.append(scoring.first_token_hit(toks, scoring.gold_first_tokens(plain, gold)))
                probes.append({"kind": "indirect", "prompt": prompt, "gold": gold, "output": text,
                               "top1": top1_hits[-1], "hit": any_hits[-1]})
        finally:
            session.close()
        out = {"direct_top1": scoring.rate(direct_top1), "direct_full": scoring.rate(direct_full),
               "chat_recall": scoring.rate(chat_hits), "indirect_any": scoring.rate(any_hits),
               "indirect_top1": scoring.rate(top1_hits), "context_tokens": scoring.mean(ctx_tokens),
               "ms_per_query": scoring.mean(ms), "n_direct": len(direct_top1), "n_chat": len(chat_hits),
               "n_indirect": len(any_hits)}
        if self.s.details:
            out["probes"] = probes
        return out

    # ---------------------------------------------------------------- the run
    def run(self, paths: Sequence[str | Path], progress: bool = True, command: str | None = None) -> dict:
        files = user_paths(paths)
        users = [load_user(p, self.s.indirect_probes) for p in files]
        with work_directory(self.work_dir, "engram-h2h-") as work:
            self.work = work
            return self._run(users, progress, command)

    def _run(self, users: list[User], progress: bool, command: str | None) -> dict:
        from tqdm import tqdm

        t_start = time.perf_counter()
        conds = [CONDITIONS[c] for c in self.s.conditions]
        bar = tqdm(total=len(users) * len(conds), desc="head-to-head", unit="run", file=sys.stderr,
                   disable=not progress)
        log = self.log
        self.log = lambda m: bar.write(m, file=sys.stderr) if progress else log(m)
        results = []
        try:
            for user in users:
                prep: dict = {}
                per = {}
                for cond in conds:
                    bar.set_postfix_str(f"{user.uid} {cond.letter}")
                    art = self._prepare(user, cond, prep)
                    t0 = time.perf_counter()
                    m = self._evaluate(user, cond, art)
                    if self.s.bpb:
                        # the prompt baselines run the base model: A's bits per byte
                        m["bpb"] = self._bits(CONDITIONS["A"] if cond.context else cond, art)
                    m.update(bytes_stored=art.bytes, prep_s=round(art.prep_s, 2),
                             eval_s=round(time.perf_counter() - t0, 2))
                    per[cond.letter] = m
                    bar.update(1)
                if self.s.bpb:
                    base = self._bits(CONDITIONS["A"], _Artifacts())
                    for letter, m in per.items():
                        m["delta_bpb"] = m["bpb"] - base
                results.append({"uid": user.uid, "file": str(user.path), "facts": len(user.facts),
                                "prepare": prep, "conditions": per})
        finally:
            bar.close()
            self.log = log
        return {"command": command, "model": self.md.as_dict(),
                "skill_adapter": str(self.adapter) if self.adapter else None,
                "text": {"path": str(self.text_path), "bytes": len(self.text.encode("utf-8"))},
                "settings": _settings_dict(self.s), "users": results,
                "conditions": aggregate(results, self.s.conditions),
                "seconds": round(time.perf_counter() - t_start, 1)}


def _settings_dict(s: Settings) -> dict:
    d = asdict(s)
    d["conditions"] = "".join(s.conditions)
    d["lora"]["targets"] = list(s.lora.targets)
    return d


def aggregate(results: list[dict], letters: Sequence[str]) -> dict:
    """Per condition: the mean over users of every metric, and users worse than A on indirect_any."""
    out = {}
    base = {r["uid"]: r["conditions"]["A"]["indirect_any"] for r in results if "A" in r["conditions"]}
    for letter in letters:
        rows = [r["conditions"][letter] for r in results if letter in r["conditions"]]
        agg = {"name": CONDITIONS[letter].name, "n_users": len(rows)}
        for k in METRICS:
            agg[k] = scoring.mean([m.get(k) for m in rows])
        agg["users_worse_than_A"] = (scoring.users_worse(
            {r["uid"]: r["conditions"][letter]["indirect_any"] for r in results if letter in r["conditions"]},
            base) if base else None)
        out[letter] = agg
    return out


def head_to_head(users: Sequence[str | Path], model: str | Path | None = None, conditions: str | None = None,
                 work_dir: str | Path | None = None, text: str | Path | None = None,
                 adapter: str | Path | None = None, settings: Settings | None = None,
                 progress: bool = True, command: str | None = None, embedder=None,
                 log: Callable[[str], None] | None = None) -> dict:
    """Run the evaluation: `users` are user files or directories of them; returns the results
    (write them with engram_local.eval.report)."""
    s = settings or Settings()
    if conditions is not None:
        s.conditions = parse_conditions(conditions)
    return HeadToHead(model, s, work_dir, text, adapter, embedder, log).run(users, progress, command)
