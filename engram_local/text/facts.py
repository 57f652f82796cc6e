"""The fact-sentence rules: how a typed statement becomes (prompt, answer), how an answer joins
its prompt, and how a fact is recited in a chat reply. Used by the memory writer, the skill
adapter's training samples and the evaluation alike.
"""

from __future__ import annotations

import re
import weakref

from engram_local.text.chat import ChatVocab, render_conversation

# A fact's prompt, answer or paraphrase, or a statement: longer text is refused (the CLI and the
# server's memory routes; docs/security.md). Fitting cost grows with the tokens: a 10,000-character
# statement ran for over 10 minutes and took gigabytes.
MAX_FACT_CHARS = 400


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


# Words a statement often carries that no answer repeats. Leading discourse fillers ("btw,",
# "Just so you know:") always go; the ones that are ordinary words too ("also", "so", "now",
# "actually", "reminder") go only before a separator (, : ; ! . - and dashes) or before a word that
# starts a clause ("I", "my", "the", ...), so "Well water is ..." keeps its "Well". Trailing
# fillers (", btw"), corrections (", not Lisbon") and time adverbs ("now", "these days") go from
# the end; the adverbs only in lower case, so an answer such as "Apocalypse Now" keeps its last word.
_LEAD_FILLERS = ("by the way", "btw", "fyi", "for your information", "for the record", "just so you know",
                 "so you know", "just to let you know", "just letting you know", "for what it's worth",
                 "fwiw", "ps", "p.s.", "p.p.s.", "heads up", "just a heads up", "fun fact", "side note",
                 "quick update", "just a reminder", "for future reference", "from now on", "oh by the way",
                 "oh btw", "oh and", "oh also", "and also", "just fyi", "remember that", "please remember that",
                 "please remember", "please note that", "note that", "keep in mind that",
                 "don't forget that", "do not forget that")
_LEAD_WORDS = ("oh", "and", "also", "plus", "so", "well", "ok", "okay", "hey", "hi", "hello", "anyway",
               "anyways", "actually", "in fact", "update", "correction", "reminder", "note", "remember",
               "to be clear", "to clarify", "now", "currently", "these days", "nowadays", "at the moment",
               "right now", "as of now", "as of today", "lately", "at present")
_CLAUSE_START = ("i", "i'm", "i’m", "i've", "i’ve", "i'd", "i’d", "i'll", "i’ll", "my", "mine", "me", "we",
                 "we're", "we’re", "our", "you", "your", "the", "a", "an", "he", "she", "his", "her", "they",
                 "their", "it", "it's", "it’s", "there")
_TRAIL_FILLERS = ("by the way", "btw", "fyi", "for the record", "just so you know", "so you know",
                  "for what it's worth", "fwiw", "just fyi", "for future reference")
_TRAIL_ADVERBS = ("now", "right now", "for now", "as of now", "as of today", "these days", "nowadays",
                  "at the moment", "at present", "currently", "anymore", "any more", "again", "lately",
                  "from now on")
# time adverbs dropped inside the prompt ("I now live in" -> "I live in") and at the start of
# the answer ("My doctor is now Dr. Chen" -> "Dr. Chen"), lower case only; not in phrases such
# as "from now on", "until now", "now that"
_INNER_ADVERBS = ("now", "currently", "nowadays")
_INNER_KEEP_BEFORE = ("from", "until", "till", "up", "by", "right", "just", "for", "as", "of", "to", "than",
                      "since", "before", "know", "knew")
_INNER_KEEP_AFTER = ("on", "that", "and", "or", "then")


def _alternation(words) -> str:
    return "|".join(re.escape(w) for w in sorted(set(words), key=len, reverse=True))


_SEP = r"(?:\s*(?:[,:;!.…]|\s-+|[—–])+)"
_LEAD_RE = re.compile(rf"^(?:{_alternation(_LEAD_FILLERS)})(?:{_SEP}\s+|\s+)", re.IGNORECASE)
_LEAD_WORD_RE = re.compile(
    rf"^(?:{_alternation(_LEAD_WORDS)})(?:{_SEP}\s+|\s+(?=(?:{_alternation(_CLAUSE_START)})(?![\w'’])))",
    re.IGNORECASE)
_TRAIL_FILLER_RE = re.compile(rf"(?:{_SEP}?\s+|\s*[—–]\s*)(?:{_alternation(_TRAIL_FILLERS)})\s*[.!;]?$",
                              re.IGNORECASE)
_TRAIL_ADVERB_RE = re.compile(rf"(?:,?\s+|\s*[—–]\s*)(?:{_alternation(_TRAIL_ADVERBS)})\s*[.!;]?$")
# a trailing correction names the old answer, never the new one: "Porto, not Lisbon"
_TRAIL_CORRECTION_RE = re.compile(r"(?:,\s*|\s*[—–]\s*|\s+\()(?:not|instead of|rather than|no longer)\s[^,;()]+\)?$")
_INNER_RE = re.compile(rf"(?<![\w'’-])(?:{_alternation(_INNER_ADVERBS)})(?![\w'’-])")
# chat noise at the end of a statement that no answer repeats: laughter, kisses, emoticons, emoji,
# and runs of "!" or "." (one final "." "!" or ";" goes anyway); "Anjali lol" -> "Anjali"
_TRAIL_NOISE_RE = re.compile(
    r"(?:\s+(?:lol|lmao|rofl|haha(?:ha)*|hehe(?:he)*|ha ha|xd|tbh|<3|xx+)"
    r"|\s*(?<![\w:])[:;=][-'^]?[()dDpP3/\\|\[\]oO*]+"
    r"|\s*[\U0001F000-\U0001FAFF\u2600-\u27BF\u2B00-\u2BFF\uFE0F\u200D]+"
    r"|\s*[!.]{2,})\s*$", re.IGNORECASE)
# change words: a statement saying one of these replaces the fact with its prompt even where the
# prompt is open (below): "I drink tea now" after "I drink coffee"
_CHANGE_RE = re.compile(r"\b(?:now|nowadays|these days|anymore|any more|instead|no longer|switched|"
                        r"changed|moved|since then|not anymore)\b", re.IGNORECASE)
# words that may stand between "I" and the verb of an open statement ("I really love hiking",
# "I don't eat pork")
_PRE_VERB = ("really", "also", "always", "usually", "mostly", "often", "still", "just", "totally",
             "absolutely", "mainly", "basically", "generally", "normally", "sometimes", "actually",
             "definitely", "honestly", "truly", "typically", "rarely", "never", "only", "especially",
             "do", "don't", "dont", "do not", "can", "can't", "cant", "cannot", "can not", "kinda",
             "kind of", "sort of", "pretty much")
# ... of which only the negations and modals stay in the prompt: "I also love hiking" is the
# "I love" fact (it adds to "I love jazz"), "I don't eat pork" is not
_PRE_VERB_KEPT = ("don't", "dont", "do not", "never", "can", "can't", "cant", "cannot", "can not")
_PRE_VERB_RE = re.compile(rf"(?:{_alternation(_PRE_VERB)})(?![\w'’])", re.IGNORECASE)
# present-tense verbs of lasting facts that end an open prompt whose subject is not "I" ("My wife
# loves sushi", "My kids play hockey"); "I" + any word needs no list
_OPEN_VERBS = ("love", "loves", "like", "likes", "hate", "hates", "enjoy", "enjoys", "adore", "adores",
               "prefer", "prefers", "play", "plays", "speak", "speaks", "support", "supports", "have",
               "has", "own", "owns", "drive", "drives", "ride", "rides", "drink", "drinks", "eat",
               "eats", "collect", "collects", "study", "studies", "teach", "teaches", "practice",
               "practices", "practise", "practises", "take", "takes", "use", "uses", "need", "needs",
               "wear", "wears", "cook", "cooks", "grow", "grows", "follow", "follows", "watch",
               "watches", "read", "reads", "keep", "keeps", "run", "runs", "fly", "flies", "go", "goes",
               "attend", "attends", "visit", "visits", "make", "makes", "sing", "sings", "write",
               "writes", "bake", "bakes", "knit", "knits", "fix", "fixes", "build", "builds")
_NAME_JOIN = ("and", "&", "of", "de", "la", "le", "van", "von", "da", "del", "du", "y", "the")


def fix_first_person_case(s: str) -> str:
    """The pronoun "i" ("i", "i'm", "i've", "i'd", "i'll", "im", "ive") in upper case, and a
    first word of lower-case letters capitalised ("my" -> "My"; "eBay", "w30" stay): "i live in
    lyon" -> "I live in lyon", "im a nurse" -> "I'm a nurse". The chat-turn fact rules
    (text.statements) normalise a clause with it; a statement given to `remember` keeps its case."""
    s = re.sub(r"\bi\b(?!')", "I", s)
    s = re.sub(r"\bi'(m|ve|d|ll)\b", lambda m: "I'" + m.group(1), s, flags=re.IGNORECASE)
    s = re.sub(r"\b[Ii]m\b", "I'm", s)
    s = re.sub(r"\b[Ii]ve\b", "I've", s)
    if re.match(r"[a-z]+(?:'[a-z]+)?(?![\w'])", s):
        s = s[0].upper() + s[1:]
    return s


def strip_chat_noise(s: str) -> str:
    """`s` without trailing chat noise ("green :)" -> "green", "Anjali lol!!" -> "Anjali!"; see
    _TRAIL_NOISE_RE); used by read_statement and the chat-turn fact rules (text.statements)."""
    while True:
        t = _TRAIL_NOISE_RE.sub("", s).rstrip()
        if t == s:
            return s
        s = t


def _drop_fillers(s: str) -> str:
    """`s` without leading discourse fillers and trailing fillers or time adverbs (each
    repeatedly: "Oh and btw, I drive a Toyota now, fyi" -> "I drive a Toyota"); never empty."""
    while True:
        t = s
        for rx in (_LEAD_RE, _LEAD_WORD_RE):
            m = rx.match(t)
            if m and t[m.end():].strip():
                t = t[m.end():]
        for rx in (_TRAIL_FILLER_RE, _TRAIL_ADVERB_RE, _TRAIL_CORRECTION_RE):
            m = rx.search(t)
            if m and t[:m.start()].strip():
                t = t[:m.start()].rstrip()
        if t == s:
            return s
        s = t


def _drop_inner_adverbs(text: str, at_start_only: bool = False) -> str:
    """`text` without the time adverbs of _INNER_ADVERBS (lower case, whole words, not in
    phrases such as "from now on"); `at_start_only`: only a leading one (an answer)."""
    words = text.split(" ")
    keep = []
    for i, w in enumerate(words):
        prev = keep[-1].lower() if keep else ""
        nxt = words[i + 1].lower() if i + 1 < len(words) else ""
        if (_INNER_RE.fullmatch(w) and (not at_start_only or not keep) and prev not in _INNER_KEEP_BEFORE
                and nxt not in _INNER_KEEP_AFTER and (at_start_only or nxt)):
            continue
        keep.append(w)
    out = " ".join(keep)
    return out if out.strip() else text


def _split(s: str) -> tuple[str, str] | None:
    """The plain split rule (see split_statement) of a normalised sentence; None without a cut."""
    cut = None
    colons = [m.end() - 1 for m in re.finditer(r":\s", s)]
    if colons:
        cut = colons[-1]
    else:
        for m in list(_LINK_RE.finditer(s)) + list(_ARTICLE_RE.finditer(s)):
            if cut is None or m.end() > cut:
                cut = m.end()
    if cut is None or not s[cut:].strip() or not s[:cut].strip():
        return None
    return s[:cut].rstrip(), s[cut:].strip()


def _split_open(s: str) -> tuple[str, str] | None:
    """The split of a sentence with no linking word or colon (an "open" statement: "I love
    hiking", "I support Arsenal", "My wife loves sushi"), None when it has one or fewer than
    three words:
      1. a trailing name or number (capitalised words or digits, joined by "and", "of", ...) is
         the answer: "I speak French and Spanish" -> ("I speak", "French and Spanish"), "I have
         two cats, Mochi and Pepper" -> ("I have two cats,", "Mochi and Pepper");
      2. else after "I" or "I've" (and words such as "really", "don't": only negations and
         modals stay) the next word is the verb and the rest the answer: "I take my coffee
         black" -> ("I take", "my coffee black"), "I also love hiking" -> ("I love", "hiking");
      3. else after the first verb of _OPEN_VERBS: "My son plays ice hockey" -> ("My son plays",
         "ice hockey");
      4. else the last word is the answer: "My wife adores sushi" -> ("My wife adores", "sushi")."""
    words = s.split(" ")
    if len(words) < 3 or _LINK_RE.search(s) or _ARTICLE_RE.search(s) or re.search(r":\s", s):
        return None          # a linking word or colon with nothing after it: "My doctor is"
    # 1. a trailing name or number
    k = len(words)
    while k > 1:
        w = words[k - 1].strip(",")
        if w[:1].isupper() or w[:1].isdigit():
            k -= 1
        elif w.lower() in _NAME_JOIN and k < len(words) and k - 1 > 1 and (
                words[k - 2].strip(",")[:1].isupper() or words[k - 2][:1].isdigit()):
            k -= 1
        else:
            break
    if k < len(words) and k >= 2 and not (k == 2 and words[1].strip(",")[:1].isupper()):
        return " ".join(words[:k]), " ".join(words[k:])
    # 2. "I" + the verb
    if words[0].replace("’", "'").lower() in ("i", "i've", "ive"):
        rest, kept = " ".join(words[1:]), [words[0]]
        while True:
            m = _PRE_VERB_RE.match(rest)
            if not m or not rest[m.end():].strip():
                break
            if m.group(0).lower().replace("’", "'") in _PRE_VERB_KEPT:
                kept.append(m.group(0))
            rest = rest[m.end():].lstrip()
        verb, _, answer = rest.partition(" ")
        if answer.strip():
            return " ".join(kept + [verb]), answer.strip()
        return None
    # 3. the first known verb after the subject
    for i in range(1, len(words) - 1):
        if words[i].lower() in _OPEN_VERBS:
            return " ".join(words[:i + 1]), " ".join(words[i + 1:])
    # 4. the last word
    return " ".join(words[:-1]), words[-1]


def split_statement(statement: str) -> tuple[str, str]:
    """(prompt, answer) of a plain sentence such as "My doctor is Dr. Krause.".

    Rule: drop surrounding whitespace and one final ".", "!" or ";" (a question is refused);
    drop words no answer repeats: leading discourse fillers ("btw,", "by the way", "fyi", "for
    the record", "just so you know", "oh and", "also", "PS:", "heads up", "fun fact:",
    "reminder:", ...), trailing fillers (", btw"), trailing corrections (", not Lisbon") and
    trailing time adverbs in lower case ("now", "these days", "nowadays", "at the moment",
    "currently", "anymore", ...), and the
    adverbs "now", "currently", "nowadays" inside the prompt and at the start of the answer
    ("I now live in Berlin", "My doctor is now Dr. Chen"). Then: if the sentence has a colon
    followed by a space, the answer is what follows the last one ("Home city: Portland"; "10:00"
    is no such colon); otherwise the answer is what follows the LAST linking word - a copula
    (is, are, was, were, am, 'm, 're), a preposition (in, at, on, by, to, from, for, with, of,
    as, into, near), "named"/"called", or a lower-case article (a, an, the). The prompt is
    everything up to and including that word. Case is kept as typed. Examples:
    "My doctor is Dr. Krause." -> ("My doctor is", "Dr. Krause"); "I live in Portland" -> ("I live in",
    "Portland"); "My usual coffee order is a cortado." -> ("My usual coffee order is a",
    "cortado"); "I have a cat named Figaro" -> ("I have a cat named", "Figaro"); "Btw, I drive
    a Toyota now." -> ("I drive a", "Toyota"). An answer that itself contains a linking word
    ("Lord of the Rings") is cut at it: give such facts with --prompt/--answer. When nothing is
    left to split once the fillers are gone, the sentence is split as typed.
    """
    return read_statement(statement)[:2]


def read_statement(statement: str) -> tuple[str, str, bool]:
    """(prompt, answer, adds) of a statement: its split_statement, and whether its answer adds
    to a fact with the same prompt instead of replacing it. An open statement (one without a
    linking word, split by `_split_open`: "I love hiking") adds - "I love jazz" and then "I love
    hiking" mean both - unless it says a change ("now", "anymore", "instead", "switched", ...):
    "I drink tea now" replaces "I drink coffee". Every other statement replaces (facts change)."""
    s = " ".join(statement.split())
    if s.endswith("?"):
        raise FactInputError(f"{statement!r} is a question, not a statement of a fact")
    while True:                  # "Anjali lol!!", "green :)" -> "Anjali", "green"
        t = strip_chat_noise(s)
        if t and t[-1] in _TRAILING:
            t = t[:-1].rstrip()
        if t == s or not t:
            break
        s = t
    if not s or not re.search(r"\w", s):
        raise FactInputError("empty statement")
    if s.endswith("?"):
        raise FactInputError(f"{statement!r} is a question, not a statement of a fact")
    plain = _drop_fillers(s)
    split, open_ = _split(plain), False
    if split is not None:
        prompt, answer = split
        split = _drop_inner_adverbs(prompt), _drop_inner_adverbs(answer, at_start_only=True)
    else:
        split = _split(s)
    if split is None:
        split, open_ = _split_open(plain), True
        if split is not None:
            split = _drop_inner_adverbs(split[0]), split[1]
    if split is None:
        raise FactInputError(
            f"cannot split {statement!r} into a prompt and an answer: no linking word (is, are, was, "
            f"in, at, named, ...), colon or verb followed by the answer; give it as --prompt TEXT --answer TEXT")
    return split[0], split[1], open_ and not _CHANGE_RE.search(statement)


def prompt_key(prompt: str) -> str:
    """What two prompts must share to be the same fact's: the prompt in lower case, whitespace
    collapsed, typographic apostrophes plain, "I'm"/"you're"/... spelled out, and the adverbs
    "now"/"currently"/"nowadays" dropped ("My Doctor is" = "my doctor is", "I'm a" = "I am a",
    "I now live in" = "I live in")."""
    s = " ".join(prompt.replace("’", "'").replace("‘", "'").split()).casefold()
    s = re.sub(r"(?<=\w)'m\b", " am", s)
    s = re.sub(r"(?<=\w)'re\b", " are", s)
    return " ".join(_drop_inner_adverbs(s).split())


def _answer_text(answer, where: str | None = None, numbers: bool = False) -> str:
    """A fact's answer as text: a string as it is, a list of strings joined with ", ".

    Anything else (null, true, an object, a nested list) raises FactInputError naming `where`
    (e.g. "facts.jsonl:3"), never becomes "None". `numbers`: a number (or a list holding numbers)
    is allowed too, as its decimal text - the paper's user files have answers such as 12.
    """
    def ok(v) -> bool:
        return isinstance(v, str) or (numbers and isinstance(v, (int, float)) and not isinstance(v, bool))

    if ok(answer):
        return str(answer)
    if isinstance(answer, list) and all(ok(v) for v in answer):
        return ", ".join(map(str, answer))
    wanted = "a string, a number or a list of them" if numbers else "a string or a list of strings"
    raise FactInputError(f"{where + ': ' if where else ''}\"answer\" must be {wanted}")


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
    vocab, cache = None, _rendered(tok)
    for f in facts:
        lead = recite[f.id][: -len(fact_sentence(f.prompt, f.answer))].rstrip()
        out[f.id] = []
        for q in CHAT_QUESTIONS:
            key = (q.format(prompt=f.prompt), lead)
            if key not in cache:
                vocab = vocab or ChatVocab.of(tok)
                turn = [{"role": "user", "content": key[0]}, {"role": "assistant", "content": lead}]
                cache[key] = tuple(render_conversation(vocab, turn, reply_open=True)[0])
            out[f.id].append((cache[key], (" " if lead else "") + f.prompt))
    return out


_RENDERED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _rendered(tok) -> dict:
    """(question, reply lead) -> ids of the chat turn, per tokenizer: adding a fact to a file of
    100 renders the turns of all 101 again (the leads depend on the other facts), most of them
    unchanged (0.4-0.6 s of a live `remember` on two cores). A tokenizer that cannot be weakly
    referenced gets a fresh dict (no cache)."""
    try:
        return _RENDERED.setdefault(tok, {})
    except TypeError:
        return {}
