"""The fact-sentence rules: how a typed statement becomes (prompt, answer), how an answer joins
its prompt, and how a fact is recited in a chat reply. Used by the memory writer, the skill
adapter's training samples and the evaluation alike.
"""

from __future__ import annotations

import re

from engram_local.text.chat import ChatVocab, render_conversation


class FactInputError(ValueError):
    """A fact that cannot be read or split; nothing is written."""


_TRAILING = ".!;"


# Words after which an answer may start. Copulas and prepositions match in any case; the
# articles only in lower case (a capitalised "The" is taken as part of a name).
_LINKS = ("is", "are", "was", "were", "am", "in", "at", "on", "by", "to", "from", "for", "with",
          "of", "as", "into", "near", "named", "called")


_ARTICLES = ("a", "an", "the")


_LINK_RE = re.compile(r"(?:\b(?:" + "|".join(_LINKS) + r")\b|(?<=\w)'m\b|(?<=\w)'re\b)", re.IGNORECASE)


_ARTICLE_RE = re.compile(r"\b(?:" + "|".join(_ARTICLES) + r")\b")


def split_statement(statement: str) -> tuple[str, str]:
    """(prompt, answer) of a plain sentence such as "My doctor is Dr. Krause.".

    Rule: drop surrounding whitespace and one final ".", "!" or ";" (a question is refused);
    if the sentence has a colon followed by a space, the answer is what follows the last one
    ("Home city: Portland"; "10:00" is no such colon); otherwise the answer is what follows the LAST linking word - a copula (is, are,
    was, were, am, 'm, 're), a preposition (in, at, on, by, to, from, for, with, of, as, into,
    near), "named"/"called", or a lower-case article (a, an, the). The prompt is everything up
    to and including that word. Examples: "My doctor is Dr. Krause." -> ("My doctor is",
    "Dr. Krause"); "I live in Portland" -> ("I live in", "Portland"); "My usual coffee order is
    a cortado." -> ("My usual coffee order is a", "cortado"); "I have a cat named Figaro" ->
    ("I have a cat named", "Figaro"). An answer that itself contains a linking word ("Lord of
    the Rings") is cut at it: give such facts with --prompt/--answer.
    """
    s = " ".join(statement.split())
    if s.endswith("?"):
        raise FactInputError(f"{statement!r} is a question, not a statement of a fact")
    if s and s[-1] in _TRAILING:
        s = s[:-1].rstrip()
    if not s:
        raise FactInputError("empty statement")
    cut = None
    colons = [m.end() - 1 for m in re.finditer(r":\s", s)]
    if colons:
        cut = colons[-1]
    else:
        for m in list(_LINK_RE.finditer(s)) + list(_ARTICLE_RE.finditer(s)):
            if cut is None or m.end() > cut:
                cut = m.end()
    if cut is None or not s[cut:].strip() or not s[:cut].strip():
        raise FactInputError(
            f"cannot split {statement!r} into a prompt and an answer: no linking word (is, are, was, "
            f"in, at, named, ...) or colon followed by the answer; give it as --prompt TEXT --answer TEXT")
    return s[:cut].rstrip(), s[cut:].strip()


def _answer_text(answer) -> str:
    if isinstance(answer, list):
        return ", ".join(map(str, answer))
    return str(answer)


def prompt_from_sentence(sentence: str, answer: str) -> str | None:
    """The paper's rule for one paraphrase: if it ends with the answer (a trailing "." stripped),
    the prompt is the sentence without the answer; otherwise None."""
    s = sentence.rstrip().removesuffix(".")
    if answer and s.endswith(answer):
        p = s[: -len(answer)].rstrip()
        return p or None
    return None



def join_answer(prompt: str, answer: str) -> str:
    """The text that follows the prompt: the answer after one space, unless the prompt already
    ends in whitespace or in an opening character ("$", "(", "[", quotes, "#", "@", "/")."""
    if not prompt or prompt[-1].isspace() or prompt[-1] in "$£€¥([{\"'“‘#@/-":
        return answer
    return " " + answer



def fact_sentence(prompt: str, answer: str) -> str:
    """The sentence a fact was written from: "My name is" + "Maya Weber" -> "My name is Maya Weber."."""
    return prompt + join_answer(prompt, answer) + "."





def recitations(facts) -> dict[str, str]:
    """fact id -> the reply that recites it in its written words.

    A fact whose prompt names another fact's answer (a person: "Avery was born in") is preceded
    by that fact's sentence ("My spouse is Avery."), so the reply can be produced from rows alone.
    """
    sentences = {f.id: fact_sentence(f.prompt, f.answer) for f in facts}
    out = {}
    for f in facts:
        lead = [g for g in facts if g.id != f.id and len(g.answer) >= 2 and g.answer[:1].isupper()
                and re.search(rf"(?<!\w){re.escape(g.answer)}(?!\w)", f.prompt)]
        lead.sort(key=lambda g: -len(g.answer))
        out[f.id] = " ".join([sentences[g.id] for g in lead[:1]] + [sentences[f.id]])
    return out


# Stand-in questions of the fitted chat turns (the real question is not known when writing):
# a generic one, and one that names the fact's topic.
CHAT_QUESTIONS = ("What do you remember about me?", "{prompt}?")


def chat_contexts(facts, tok) -> dict[str, list[tuple[tuple[int, ...], str]]]:
    """fact id -> [(lead ids, prompt)]: the fact as the skill adapter recites it in a chat reply.

    The lead is a chat turn up to the assistant's reply (the model's own template, a stand-in
    question) plus any sentence the recitation starts with, tokenized as the runtime reads the
    turn and the model says the reply (`render_conversation`, the reply still open); the prompt
    follows it. `remember` fits the rows to give the answer there too, so they work where the
    adapter makes the model say the prompt.
    """
    recite, out = recitations(facts), {}
    vocab = ChatVocab.of(tok)
    for f in facts:
        lead = recite[f.id][: -len(fact_sentence(f.prompt, f.answer))].rstrip()
        out[f.id] = []
        for q in CHAT_QUESTIONS:
            turn = [{"role": "user", "content": q.format(prompt=f.prompt)},
                    {"role": "assistant", "content": lead}]
            ids, _ = render_conversation(vocab, turn, reply_open=True)
            out[f.id].append((tuple(ids), (" " if lead else "") + f.prompt))
    return out
