"""The shared skill adapter: one LoRA, trained once, that teaches every user's memory to speak.

Per-user facts live in Engram rows keyed on the words they were written in ("My doctor is" ->
" Dr. Krause"). A question asked in chat ("Who is my doctor?") never produces those words by
itself, so the rows never fire. The skill adapter teaches the model to answer a question about
the user by first saying the remembered fact in the words it was written; the user's rows then
supply the value (user-as-engram-method.md §5; the "recite" samples are ours).

Samples per training user (the paper's held-out users u020-u029, shipped in
engram_local/data/skill-users):
  * fact      "<written sentence>"                              (paper: completion facts)
  * reason    "Facts: <f1>. <f2>.\nQ: <indirect question>\nA: <gold>"   (paper, loss on the answer)
  * chat      chat turn "<direct question>" -> "<recitation>"   (ours, loss on the reply)
  * qa        "Q: <direct question>\nA: <recitation>"           (ours, loss on the reply)
  * irecite   "Q: <indirect question>\nA: <recitation>"         (ours; only where a remembered
              fact states the answer: "Who should I call about a dental issue?" -> the dentist)
where a recitation is the fact's written sentence, preceded by the sentence of any other fact
whose answer it names ("My spouse is Avery. Avery was born in 1978."), so a reply can reach a
sentence that starts with a remembered name.

Order (user-as-engram-method.md §3.3, layered design): each training user's facts are first
written as Engram rows on the frozen base model, and the adapter trains with that user's rows
attached, so it learns to lean on rows rather than to memorise values; at `remember` time users'
rows are fitted through the finished adapter.
"""

from __future__ import annotations

import os
import random
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from engram_local import constants
from engram_local.text.facts import CHAT_QUESTIONS, chat_contexts, fact_sentence, recitations  # noqa: F401 (re-exported)
from engram_local.text.user_files import read_user_file
from engram_local.text.user_files import user_files as text_user_files

DEFAULT_USERS_DIR = constants.SKILL_USERS_DIR


KINDS = ("fact", "reason", "chat", "qa", "irecite", "echo", "prose", "fchat", "keep")
# The two recipes (docs/skill.md). echo (shipped): the reply echoes the question as a statement
# and the rows say the value; keep holds plain "Q:/A:" answers where the model had them, prose
# its text. recite (shipped before, with rows=True): the reply recites the fact's written words.
ECHO_KINDS = ("fact", "reason", "fchat", "echo", "prose", "keep")
RECITE_KINDS = ("fact", "reason", "chat", "qa")
# kinds not tied to a training user: their samples come in batches of their own pseudo-users,
# with no rows attached
_POOLED = {"echo": "echo", "prose": "prose"}


@dataclass
class SkillSettings:
    rank: int = 16                        # LoRA rank (paper §5: r = 16)
    alpha: float = 32.0                   # LoRA alpha (2r); update scale alpha / r
    targets: tuple = ("q_proj", "k_proj", "v_proj")   # adapted projections, every layer
    steps: int = 400                      # optimizer steps
    batch: int = 8                        # samples per step, all from one user (one row set attached)
    lr: float = 1e-3                      # Adam learning rate (warm-up, then cosine to 10 %)
    warmup: int = 20                      # linear warm-up steps
    max_len: int = 192                    # tokens per sample at most (longer samples are dropped)
    seed: int = 42                        # sample order and LoRA init
    rows: bool = False                    # attach each training user's Engram rows while training
                                          # (the recite recipe; the echo recipe masks values instead)
    chat_rows: bool = False               # fit those rows in chat form too (measured worse)
    kinds: tuple = ECHO_KINDS             # the shipped (echo) recipe; RECITE_KINDS with rows=True
                                          # is the recite recipe (docs/skill.md)
    reason_per_user: int = 20             # indirect "Facts/Q/A" samples per user (paper: up to 20)
    echo_people: int = 300                # echo: synthetic people (train.natural), 3 questions per fact
    echo_pools: int = 10                  # echo: pseudo-users their batches are drawn as
    prose_chunks: int = 600               # prose: chunks of the training corpus (data/corpus/train.txt)
    prose_tokens: int = 128               # prose: tokens per chunk
    prose_pools: int = 5                  # prose: pseudo-users their batches are drawn as
    corpus: str = "data/corpus/train.txt"  # prose: the corpus text (scripts/build_corpus.py)
    keep_tokens: int = 16                 # keep: greedy tokens of the model's own answer kept


@dataclass
class Sample:
    user: str                             # uid: whose rows are attached
    kind: str                             # fact / reason / chat / qa
    ids: list[int]                        # token ids
    labels: list[int]                     # -100 where no loss


def chat_forms(kinds: Sequence[str]) -> tuple[str, ...]:
    """The chat replies an adapter trained on `kinds` answers in, and so the forms `remember`
    fits each fact in (written into the adapter: constants.KEY_ADAPTER_CHAT_FORMS): an adapter
    taught to echo the question leaves the value to rows keyed on the echo; otherwise it recites
    the fact's written words."""
    return ("echo",) if "echo" in kinds else ("recite",)


# --------------------------------------------------------------------------- users and texts

def user_files(dirs: Sequence[str | os.PathLike] | None) -> list[Path]:
    """The user JSON files of `dirs` (files or directories of *.json), sorted; the shipped
    training users by default."""
    return text_user_files(list(dirs) if dirs else [DEFAULT_USERS_DIR])


def user_texts(path: Path, settings: SkillSettings, rng: random.Random) -> list[tuple[str, str, str]]:
    """(kind, context, reply) triples of one user; `context` is plain text or, for chat, the
    user's question (rendered with the chat template later)."""
    from engram_local.memory.facade import user_json_facts

    user = read_user_file(path)
    facts = user_json_facts(user)
    by_key = {f.id: f for f in facts}
    recite = recitations(facts)
    out = []
    if "fact" in settings.kinds:
        out += [("fact", "", fact_sentence(f.prompt, f.answer)) for f in facts]
    direct = [q for q in user.direct_qa if q.get("key") in recite]
    if "chat" in settings.kinds:
        out += [("chat", q["question"], recite[q["key"]]) for q in direct]
    if "fchat" in settings.kinds:
        # the question answered with its fact in the first person ("What year was I born?" ->
        # "I was born in"), the value left to the rows: the echo recipe on the paper's schema
        from engram_local.text.questions import first_person

        out += [("fchat", q["question"], "\t".join((first_person(by_key[q["key"]].prompt, facts),
                                                    by_key[q["key"]].answer)))
                for q in direct if q.get("key") in by_key]
    if "qa" in settings.kinds:
        out += [("qa", f"Q: {q['question']}\nA:", " " + recite[q["key"]]) for q in direct]
    ind = user.indirect_qa
    if "keep" in settings.kinds:
        # the model's own answer without the adapter (filled in by build_samples): the adapter
        # keeps the base model's behaviour on plain "Q:/A:" questions, which chat replies
        # must not change (contracts' indirect check: F >= A)
        out += [("keep", f"Q: {q['question']}\nA:", "") for q in ind]
    if "irecite" in settings.kinds:
        # an indirect question whose answer a remembered fact states: answer by reciting it
        for q in ind:
            keys = [k for k in q.get("required_fact_keys", []) if k in recite]
            gold = str(q.get("answer", "")).lower()
            for k in keys:
                if gold and re.search(rf"(?<!\w){re.escape(gold)}(?!\w)", by_key[k].answer.lower()):
                    out.append(("irecite", f"Q: {q['question']}\nA:", " " + recite[k]))
                    break
    if "reason" in settings.kinds:
        rng.shuffle(ind)
        for q in ind[:settings.reason_per_user]:
            keys = [k for k in q.get("required_fact_keys", []) if k in by_key]
            if not keys:
                continue
            listed = " ".join(fact_sentence(by_key[k].prompt, by_key[k].answer) for k in keys)
            out.append(("reason", f"Facts: {listed}\nQ: {q['question']}\nA:", f" {q['answer']}"))
    return out


# --------------------------------------------------------------------------- tokens

class Tokens:
    """Tokenize like `engram-local run` does: BOS as the backend adds it (text.tokens), chat
    turns as text.chat.render_conversation renders them (the runtime's prompt, then the reply
    as the model says it, closed by the end-of-turn text)."""

    def __init__(self, tok):
        from engram_local.text.chat import ChatVocab, render_conversation
        from engram_local.text.tokens import encode, sequence_start

        self.tok, self.vocab = tok, ChatVocab.of(tok)
        self._conversation, self._encode = render_conversation, encode
        self.bos = sequence_start(tok)
        self.template = self.vocab.template
        self.eos_text = self.vocab.end_of_turn

    def ids(self, text: str) -> list[int]:
        return self._encode(self.tok, text)

    def echo(self, user: str, question: str, prefix: str, answer: str) -> Sample:
        """A chat turn whose reply is `prefix` + answer + "."; the answer's tokens are left out of
        the loss (at run time the user's rows say them)."""
        from engram_local.text.facts import join_answer

        turn = lambda reply, open_: self._conversation(  # noqa: E731
            self.vocab, [{"role": "user", "content": question}, {"role": "assistant", "content": reply}],
            reply_open=open_)[0]
        head = turn(prefix, True)
        valued = turn(prefix + join_answer(prefix, answer), True)
        ids, mask = self._conversation(self.vocab, [{"role": "user", "content": question},
                                                    {"role": "assistant", "content": prefix + join_answer(prefix, answer) + "."}])
        labels = [i if m else -100 for i, m in zip(ids, mask)]
        if ids[:len(valued)] == valued and valued[:len(head)] == head:
            labels[len(head):len(valued)] = [-100] * (len(valued) - len(head))
        return Sample(user, "echo", ids, labels)

    def prose(self, user: str, ids: list[int]) -> Sample:
        return Sample(user, "prose", list(self.bos) + ids, [-100] * len(self.bos) + ids)

    def sample(self, user: str, kind: str, context: str, reply: str) -> Sample:
        if kind == "fchat":                     # reply = "prefix\tanswer"
            prefix, answer = reply.split("\t")
            s = self.echo(user, context, prefix, answer)
            s.kind = "fchat"
            return s
        if kind == "chat":
            ids, mask = self._conversation(self.vocab, [{"role": "user", "content": context},
                                                        {"role": "assistant", "content": reply}])
            return Sample(user, kind, ids, [i if m else -100 for i, m in zip(ids, mask)])
        if kind == "fact":
            ctx, rep = list(self.bos), self.ids(reply)
        else:
            full = self.ids(context + reply)
            ctx = self.ids(context)
            if full[:len(ctx)] != ctx:          # the reply's first token merged into the context
                ctx = ctx[:-1]
            ctx, rep = self.bos + ctx, full[len(ctx) - len(self.bos):]
        return Sample(user, kind, ctx + rep, [-100] * len(ctx) + rep)


def build_samples(files: Sequence[Path], tok, settings: SkillSettings,
                  complete: Callable[[list[int], int], list[int]] | None = None) -> list[Sample]:
    """Every training sample of `settings.kinds`. `complete(ids, n)`: n greedy tokens of the
    model without the adapter after `ids` (needed by the "keep" kind)."""
    rng = random.Random(settings.seed)
    t = Tokens(tok)
    out = []
    for path in files:
        uid = Path(path).stem
        for kind, ctx, reply in user_texts(path, settings, rng):
            if kind == "keep":
                if complete is None:
                    raise ValueError('the "keep" samples need the model (build_samples(complete=...))')
                ids = t.bos + t.ids(ctx)
                own = complete(ids, settings.keep_tokens)
                s = Sample(uid, kind, ids + own, [-100] * len(ids) + own)
            else:
                s = t.sample(uid, kind, ctx, reply)
            if len(s.ids) <= settings.max_len:
                out.append(s)
    if "echo" in settings.kinds:
        from engram_local.train.natural import echo_samples

        for i, (q, prefix, answer) in enumerate(echo_samples(settings.echo_people, settings.seed)):
            s = t.echo(f"echo{i % settings.echo_pools}", q, prefix, answer)
            if len(s.ids) <= settings.max_len:
                out.append(s)
    if "prose" in settings.kinds:
        out += prose_samples(t, settings)
    return out


def prose_samples(t: "Tokens", settings: SkillSettings) -> list[Sample]:
    """Chunks of the training corpus, so the adapter keeps the model's prose (issue 13: its
    price on unrelated text)."""
    path = Path(settings.corpus)
    if not path.exists():
        raise FileNotFoundError(f"{path}: the prose samples need the training corpus; build it with "
                                "python scripts/build_corpus.py --out data/corpus")
    text = path.read_text(encoding="utf-8", errors="replace")
    rng = random.Random(settings.seed + 2)
    n, out = settings.prose_tokens, []
    docs = [d for d in text.split("\n\n") if len(d) > 4 * n]
    for i in range(settings.prose_chunks):
        doc = rng.choice(docs)
        start = rng.randrange(0, max(1, len(doc) - 6 * n))
        ids = t.ids(doc[start:start + 6 * n])[1:n + 1]
        if len(ids) == n:
            out.append(t.prose(f"prose{i % settings.prose_pools}", ids))
    return out


# --------------------------------------------------------------------------- training users' rows

def training_rows(em, tok, fingerprint: int, files: Sequence[Path], work_dir: Path,
                  log: Callable[[str], None], chat: bool | None = None) -> dict[str, Path]:
    """uid -> .eov with that user's facts fitted on the frozen model `em` (`chat`: also in chat
    form; default: when `em` carries the skill adapter, as `remember` does). Cached in work_dir:
    a file whose ledger holds the same facts is reused."""
    from engram_local.memory.facade import remember, user_json_facts
    from engram_local.formats.eov import read_memory_file

    work_dir.mkdir(parents=True, exist_ok=True)
    out = {}
    for path in files:
        uid = Path(path).stem
        eov = work_dir / f"{uid}.eov"
        facts = user_json_facts(path)
        want = sorted((f.id, f.prompt, f.answer) for f in facts)
        if eov.exists():
            try:
                have = sorted((f.id, f.prompt, f.answer) for f in read_memory_file(eov, fingerprint).facts)
            except Exception:       # stale or foreign file: refit
                have = None
            if have == want:
                out[uid] = eov
                continue
            eov.unlink()
        t0 = time.time()
        rep = remember(eov, facts, em, tok, fingerprint, chat=chat)
        log(f"rows for {uid}: {len(facts)} facts, {rep.rows} rows, "
            f"{sum(rep.recalled.values())}/{len(facts)} recalled, {time.time() - t0:.0f} s")
        out[uid] = eov
    return out


# --------------------------------------------------------------------------- training

def _batches(samples: list[Sample], settings: SkillSettings):
    """Deterministic stream of batches, each from one user, users and samples shuffled."""
    rng = random.Random(settings.seed + 1)
    by_user: dict[str, list[Sample]] = {}
    for s in samples:
        by_user.setdefault(s.user, []).append(s)
    users = sorted(by_user)
    pools = {u: [] for u in users}
    while True:
        order = users[:]
        rng.shuffle(order)
        for u in order:
            if len(pools[u]) < settings.batch:
                fresh = by_user[u][:]
                rng.shuffle(fresh)
                pools[u] += fresh
            yield u, [pools[u].pop() for _ in range(min(settings.batch, len(pools[u])))]


@dataclass
class TrainReport:
    steps: int
    seconds: float
    samples: int
    users: list[str]
    first_loss: float
    last_loss: float
    kinds: dict = field(default_factory=dict)


def train_skill(out: str | os.PathLike, model: str | os.PathLike | None = None,
                users: Sequence[str | os.PathLike] | None = None,
                settings: SkillSettings | None = None, work_dir: str | os.PathLike | None = None,
                peft_out: str | os.PathLike | None = None, threads: int | None = None,
                progress: bool = True, log: Callable[[str], None] | None = None) -> TrainReport:
    """Train the shared skill adapter on `model` (a MODEL_DIR; the default model by default) and
    write it to `out` as a llama.cpp LoRA adapter GGUF (and as a PEFT directory to `peft_out`)."""
    import torch

    from engram_local.model import lora
    from engram_local.text.tokens import eog_ids, pad_id
    from engram_local.train.trainer import collate, token_loss, train

    from engram_local.memory import facade as memory
    from engram_local.formats.header import scan_gguf
    from engram_local.formats.sidecar import open_sidecar
    from engram_local.runtime.loader import attach_tables, load_model

    settings = settings or SkillSettings()
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    if threads:
        torch.set_num_threads(int(threads))
    files = user_files(users)
    out = Path(out)
    if out.suffix != ".gguf":
        raise ValueError(f"{out}: the adapter is written as a GGUF file; name it *.gguf")
    random.seed(settings.seed)
    np.random.seed(settings.seed)
    torch.manual_seed(settings.seed)

    em, tok, md = load_model(model, adapter=False)
    if md is None:
        raise ValueError(f"{model}: train-skill needs a MODEL_DIR (convert the checkpoint first)")
    sidecar = open_sidecar(md.engram)
    fingerprint = int(sidecar.fingerprint)
    samples = build_samples(files, tok, settings,
                            complete=lambda ids, n: memory.greedy_ids(em, ids, n, stop=eog_ids(tok)))
    if not samples:
        raise ValueError("no training samples: the user files hold no facts")
    kinds = {k: sum(s.kind == k for s in samples) for k in settings.kinds}
    log(f"train-skill: {len(files)} users, {len(samples)} samples ({kinds}), rank {settings.rank}, "
        f"{settings.steps} steps x {settings.batch}")

    stacks = {}
    if settings.rows:
        wd = Path(work_dir) if work_dir else out.with_name(out.stem + ".rows")
        for uid, eov in training_rows(em, tok, fingerprint, files, wd, log, settings.chat_rows).items():
            stacks[uid] = memory.open_overrides([eov], fingerprint)

    lora.add_lora(em.backbone, settings.rank, settings.alpha, settings.targets, seed=settings.seed)
    params = lora.lora_parameters(em.backbone)
    opt = torch.optim.Adam(params, lr=settings.lr)
    total = settings.steps

    def lr_at(step):
        if step < settings.warmup:
            return (step + 1) / settings.warmup
        frac = (step - settings.warmup) / max(1, total - settings.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * frac))

    pad = pad_id(tok)
    attached = None

    def loss(em, user_batch):
        nonlocal attached
        uid, batch = user_batch
        if settings.rows and attached != uid:
            attach_tables(em, sidecar, stacks.get(uid))
            attached = uid
        ids, labels, mask = collate([(s.ids, s.labels) for s in batch], pad)
        logits = em(ids, attention_mask=mask).logits                     # (B, T, V)
        return token_loss(logits[:, :-1], labels[:, 1:])

    em.train()
    state = train(em, opt, _batches(samples, settings), loss, total, schedule=lr_at, clip=1.0,
                  progress="train-skill" if progress else None)
    em.eval()
    losses, seconds = state.history, state.elapsed

    extra = {"engram_local": {"settings": {k: (list(v) if isinstance(v, tuple) else v)
                                           for k, v in asdict(settings).items()},
                              "users": [p.stem for p in files], "steps": total,
                              "chat_forms": list(chat_forms(settings.kinds))}}
    from engram_local.convert import adapter as adapter_io
    from engram_local.convert import registry

    tmp_dir = Path(peft_out) if peft_out else out.with_name(f".{out.stem}.{os.getpid()}.peft")
    try:
        lora.save_peft(em.backbone, tmp_dir, extra=extra)
        header = scan_gguf(md.backbone)
        arch = registry.for_gguf(header.architecture or "")
        out.parent.mkdir(parents=True, exist_ok=True)
        adapter_io.write_lora_adapter(tmp_dir, arch, arch.config_from_gguf(header.fields), out)
    finally:
        if not peft_out:
            import shutil
            shutil.rmtree(tmp_dir, ignore_errors=True)
    k = max(1, min(20, len(losses) // 5))
    return TrainReport(steps=total, seconds=seconds, samples=len(samples), users=[p.stem for p in files],
                       first_loss=float(np.mean(losses[:k])), last_loss=float(np.mean(losses[-k:])),
                       kinds=kinds)
