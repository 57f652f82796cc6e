"""Questions about a stated fact and the reply that answers each one by echoing it.

One rule, used on both sides of the memory (like `text.chat.render_conversation`):

* the shared skill adapter is trained to answer a question about the user by first turning the
  question into its statement ("What is my dog's name?" -> "My dog's name is ..."), the value
  left to the user's rows (`train.skill`, kind `echo`);
* the memory writer fits each fact's rows in those replies, for questions made from the fact's
  own words (`memory.facade.fact_inputs`), so the rows are keyed on the words the model says
  right before the answer - whatever the user's original wording was.

The rules look only at the fact's prompt (the statement up to its answer), the answer's shape
and a general lexicon of words people use for the same personal thing (`RELATED`); they know
no particular person or data set.

    question_forms("I have a golden retriever named", "Biscuit") ->
        [("What is my golden retriever's name?", "My golden retriever's name is"),
         ("What did I name my golden retriever?", "I named my golden retriever"),
         ("What is my dog's name?", "My dog's name is"), ...]
"""

from __future__ import annotations

import random
import re

# Words for the same personal thing, as people ask about it: the first word of a group is also
# asked about with the group's other words. General English personal-information categories
# (family, pets, work, home, vehicles, health, accounts, dates, tastes).
RELATED: tuple[tuple[str, ...], ...] = (
    ("husband", "spouse", "partner"), ("wife", "spouse", "partner"),
    ("boyfriend", "partner"), ("girlfriend", "partner"), ("fiance", "partner"), ("fiancee", "partner"),
    ("son", "boy", "kid", "child"), ("daughter", "girl", "kid", "child"),
    ("mother", "mom", "mum"), ("father", "dad"), ("brother", "sibling"), ("sister", "sibling"),
    ("grandson", "grandchild"), ("granddaughter", "grandchild"),
    ("grandmother", "grandma"), ("grandfather", "grandpa"),
    ("dog", "pet", "puppy"), ("cat", "pet", "kitten"), ("retriever", "dog", "pet"),
    ("labrador", "dog", "pet"), ("terrier", "dog", "pet"), ("poodle", "dog", "pet"),
    ("spaniel", "dog", "pet"), ("beagle", "dog", "pet"), ("collie", "dog", "pet"),
    ("shepherd", "dog", "pet"), ("parrot", "bird", "pet"), ("rabbit", "bunny", "pet"),
    ("hamster", "pet"), ("goldfish", "fish", "pet"), ("horse", "pony", "pet"),
    ("manager", "boss", "supervisor"), ("boss", "manager", "supervisor"), ("supervisor", "boss", "manager"),
    ("employer", "company", "workplace"), ("company", "employer", "firm"),
    ("colleague", "coworker"), ("job", "work", "profession", "occupation"),
    ("doctor", "physician", "GP"), ("therapist", "counselor"),
    ("car", "vehicle", "ride"), ("truck", "vehicle"), ("motorbike", "motorcycle", "bike"),
    ("bike", "bicycle"), ("bicycle", "bike"),
    ("password", "passcode", "code"), ("wifi", "wireless", "internet", "network"),
    ("pin", "code", "number"), ("code", "combination", "number"),
    ("birthday", "birth date", "date of birth"), ("anniversary", "wedding date"),
    ("hometown", "home town", "home"), ("city", "town", "home"), ("house", "home"),
    ("apartment", "flat", "home"), ("flat", "apartment", "home"),
    ("hobby", "pastime", "free time activity"), ("team", "club", "side"), ("club", "team"),
    ("favorite", "favourite"), ("favourite", "favorite"),
    ("food", "dish", "meal"), ("drink", "beverage"), ("tea", "drink"), ("coffee", "drink"),
    ("school", "college"), ("university", "college", "uni"), ("degree", "diploma"),
    ("allergy", "allergic reaction"), ("medication", "medicine", "drug", "prescription"),
    ("phone", "mobile", "cell"), ("email", "e-mail", "address"),
    ("band", "group", "music"), ("singer", "musician", "artist"), ("composer", "musician"),
    ("author", "writer"), ("book", "novel"), ("movie", "film"), ("show", "series"),
    ("language", "tongue"), ("religion", "faith"), ("neighbour", "neighbor"), ("neighbor", "neighbour"),
    # verbs of first-person statements ("I work as a", "I drive a") and the nouns asked for
    ("work", "job", "profession", "occupation"), ("live", "home", "city"), ("drive", "car", "vehicle"),
    ("support", "team", "club"), ("teach", "school"), ("study", "subject", "major"),
    ("allergic", "allergy"), ("born", "birth year"), ("enjoy", "hobby", "pastime"),
    ("employed", "employer", "company"), ("married", "spouse", "partner"),
)

# Echo forms a fact is fitted in (memory.facade.fact_inputs) and a chat reply may open with
# (runtime.routing): one number, so the two sides agree.
ECHO_FORMS_PER_FACT = 4

_WHERE = ("in", "at", "near", "from")
_ENDINGS = ("in", "at", "near", "from", "as", "to", "with", "for", "on", "by", "of", "a", "an", "the")
_ARTICLES = ("a", "an", "the")
_MONTHS = ("january", "february", "march", "april", "may", "june", "july", "august", "september",
           "october", "november", "december")


def _clean(prompt: str) -> str:
    return re.sub(r"\s+", " ", prompt).strip().rstrip(":").strip()


def _name_like(answer: str) -> bool:
    """A person or proper noun: every word a capitalised word ("Daniel", "Alan Whitfield")."""
    words = answer.replace(".", " ").split()
    return bool(words) and all(re.fullmatch(r"(?:Dr|Mr|Mrs|Ms)|[A-Z][a-z'-]+", w) for w in words)


def _when_like(answer: str) -> bool:
    """A date, year or time of day ("March 14", "1989", "7 pm", "22 July 1984")."""
    low = answer.lower()
    return bool(re.fullmatch(r"(?:1[5-9]|20)\d\d", low.strip())
                or any(m in re.findall(r"[a-z]+", low) for m in _MONTHS)
                or re.search(r"\d\s*(?:am|pm|a\.m\.|p\.m\.)\b|\d:\d\d", low))


def related_subjects(subject: str, limit: int = 3) -> list[str]:
    """Other words for `subject` ("golden retriever" -> ["dog", "pet"]; "favorite hobby" ->
    ["favourite hobby", "favorite pastime", ...]): a head noun after other words is replaced
    whole by a category word, any other word is swapped in place."""
    words = subject.split()
    out: list[str] = []
    for i, w in enumerate(words):
        for group in RELATED:
            if w.lower() != group[0]:
                continue
            for alt in group[1:]:
                whole = i == len(words) - 1 and len(words) > 1 and words[0].lower() not in (
                    "favorite", "favourite", "best", "first", "last", "usual")
                cand = alt if whole else " ".join(words[:i] + [alt] + words[i + 1:])
                if cand.lower() != subject.lower() and cand not in out:
                    out.append(cand)
    return out[:limit]


def _third_to_base(verb: str) -> str:
    """"lives" -> "live", "goes" -> "go", "has" -> "have"."""
    v = verb.lower()
    if v == "has":
        return "have"
    if re.search(r"(?:ss|sh|ch|x|o)es$", v):
        return verb[:-2]
    if v.endswith("ies"):
        return verb[:-3] + "y"
    if v.endswith("s") and not v.endswith("ss"):
        return verb[:-1]
    return verb


def _article(prompt_words: list[str]) -> str:
    """" a" when the prompt ends in an article (the answer follows it), else ""."""
    return f" {prompt_words[-1]}" if prompt_words and prompt_words[-1].lower() in _ARTICLES else ""


# ------------------------------------------------------------------ per statement shape

def _my_name(p, low, answer):
    m = re.fullmatch(r"my (?:(full|first|real) )?name (?:is|was)", low)
    if not m:
        return None
    return [("What is my name?", "My name is"), ("What's my full name?", "My full name is"),
            ("Who am I?", "My name is"), ("What am I called?", "My name is"),
            ("Do you remember my name?", "My name is"), ("What name do I go by?", "My name is")]


def _each_subject(subject: str, forms) -> list:
    """forms(s) for the subject as written and each related subject (`related_subjects`), in order."""
    return [f for s in [subject] + related_subjects(subject) for f in forms(s)]


def _my_named(p, low, answer):
    m = re.fullmatch(r"my (.+?)'s? (?:name|names) (?:is|are|was)", low)
    if not m:
        return None
    return _each_subject(p[3:3 + len(m.group(1))], lambda s: [
        (f"What is my {s}'s name?", f"My {s}'s name is"), (f"Who is my {s}?", f"My {s} is"),
        (f"What is my {s} called?", f"My {s} is called"), (f"What's my {s}'s name?", f"My {s}'s name is")])


def _my_is_named(p, low, answer):
    m = re.fullmatch(r"my (.+?) (?:is|was) (?:named|called)", low)
    if not m:
        return None
    rest = p[3 + len(m.group(1)):]
    return _each_subject(p[3:3 + len(m.group(1))], lambda s: [
        (f"What is my {s}'s name?", f"My {s}{rest}"), (f"What is my {s} called?", f"My {s} is called"),
        (f"Who is my {s}?", f"My {s}{rest}"), (f"What's my {s}'s name?", f"My {s}'s name is")])


def _my_passive(p, low, answer):
    m = re.fullmatch(r"my (.+?) (is|was|were|are) ([a-z]+(?:ed|en|rn|wn)) (in|on|at|from|by|to)", low)
    if not m:
        return None
    s0, verb, part, prep = p[3:3 + len(m.group(1))], m.group(2), m.group(3), m.group(4)
    wh = "When" if _when_like(answer) or re.fullmatch(r"\d+", answer) else ("Where" if prep in _WHERE else "Who")
    forms = []
    for s in [s0] + related_subjects(s0):
        echo = f"My {s} {verb} {part} {prep}"
        forms += [(f"{wh} {verb} my {s} {part}?", echo)]
        if wh == "When":
            forms.append((f"What year {verb} my {s} {part}?", echo))
    return forms


def _my_is(p, low, answer):
    m = re.fullmatch(r"my (.+?) (is|are|was|were)(?: (a|an|the|on|in|at|from)|( ?[$£€]))?", low)
    if not m:
        return None
    s0, verb, tail = p[3:3 + len(m.group(1))], m.group(2), m.group(3)
    if m.group(4):                                          # "My monthly rent is $"
        echo = p
        return [(f"What {verb} my {s0}?", echo), (f"How much {verb} my {s0}?", echo)] + \
            [(f"What {verb} my {alt}?", f"My {alt} {verb}{m.group(4)}") for alt in related_subjects(s0)]
    forms = []
    for k, s in enumerate([s0] + related_subjects(s0)):
        echo = f"My {s} {verb}{(' ' + p.split()[-1]) if tail else ''}"
        if tail in ("on", "in", "at", "from"):
            wh = "When" if tail == "on" or _when_like(answer) else "Where"
            forms += [(f"{wh} {verb} my {s}?", echo), (f"What {verb} my {s}?", echo)]
            continue
        if _name_like(answer):
            forms.append((f"Who {verb} my {s}?", echo))
            if not tail:
                forms.append((f"What is my {s}'s name?", f"My {s}'s name is"))
        if _when_like(answer):
            forms.append((f"When {verb} my {s}?", echo))
        forms += [(f"What {verb} my {s}?", echo), (f"What's my {s}?", echo)]
        if k == 0:
            forms += [(f"Do you remember my {s}?", echo), (f"Tell me my {s}.", echo),
                      (f"What did I tell you my {s} {verb}?", echo)]
    return forms


def _the_is(p, low, answer):
    m = re.fullmatch(r"the (.+? of my .+?) (is|are|was|were)(?: (a|an|the))?", low)
    if not m:                                               # "The model year of my car is"
        return None
    s0, verb = p[4:4 + len(m.group(1))], m.group(2)
    return [(f"What {verb} the {s0}?", p), (f"Do you remember the {s0}?", p)]


def _my_verb(p, low, answer):
    m = re.fullmatch(r"my (.+?) ([a-z]+s) (.+)", low)
    if not m or m.group(2) in ("is", "was", "has"):
        return None
    s0 = p[3:3 + len(m.group(1))]
    verb3 = p[4 + len(m.group(1)):4 + len(m.group(1)) + len(m.group(2))]
    verb, rest = _third_to_base(verb3), p[len(p) - len(m.group(3)):]
    words = rest.split()
    core = " ".join(w for w in words if w.lower() not in _ENDINGS)
    last = next((w.lower() for w in reversed(words) if w.lower() not in _ARTICLES), "")
    wh = "When" if _when_like(answer) else ("Where" if last in _WHERE + ("to",) else "What")
    forms = []
    for s in [s0] + related_subjects(s0):
        echo = f"My {s} {verb3} {rest}"
        forms.append((f"{wh} does my {s} {verb}{(' ' + core) if core else ''}?", echo))
        if wh != "What":
            forms.append((f"What does my {s} {verb} {rest}?", echo))
    return forms


def _i_have_named(p, low, answer):
    m = re.fullmatch(r"i (have|own|got) (a|an|the|two|three|one) (.+?) (named|called)", low)
    if not m:
        return None
    s0 = p[len(p) - len(m.group(3)) - len(m.group(4)) - 1:len(p) - len(m.group(4)) - 1]
    return _each_subject(s0, lambda s: [
        (f"What is my {s}'s name?", f"My {s}'s name is"), (f"What did I name my {s}?", f"I named my {s}"),
        (f"What is my {s} called?", f"My {s} is called"), (f"What's my {s}'s name?", f"My {s}'s name is")])


def _i_am(p, low, answer):
    m = re.fullmatch(r"i('m| am) (?:(a|an)|(.+))", low)
    if not m:
        return None
    own = p                                                  # the user's own wording ("I'm allergic to")
    if m.group(2):                                           # "I'm a" + "pediatric nurse"
        return [("What am I?", own), ("What do I do?", own), ("Who am I?", own),
                ("What kind of person am I?", own), ("What is my job?", "My job is"),
                ("What do I do for a living?", own)]
    rest = p[len(p) - len(m.group(3)):]
    other = ("I am " if m.group(1) == "'m" else "I'm ") + rest     # the adapter says either
    forms = [(f"What am I {rest}?", own), (f"Do you remember what I'm {rest}?", other)]
    if rest.split()[-1].lower() in _WHERE and len(rest.split()) > 1:
        forms.insert(0, (f"Where am I {rest.rsplit(' ', 1)[0]}?", own))
    for w in rest.split():
        for alt in related_subjects(w):
            forms += [(f"What is my {alt}?", f"My {alt} is"), (f"What {alt} do I have?", f"My {alt} is")]
    return forms


def _i_was(p, low, answer):
    m = re.fullmatch(r"i was (.+?)(?: (in|on|at|from))?", low)
    if not m:
        return None
    core = p[6:6 + len(m.group(1))]
    born = core.lower() == "born"
    if _when_like(answer) or re.fullmatch(r"[\d\s]+", answer):
        forms = [(f"When was I {core}?", p), (f"What year was I {core}?", p)]
        if born:
            forms += [("What is my birth year?", "My birth year is"), ("What is my date of birth?", "My date of birth is"),
                      ("How old am I?", p)]
    else:
        forms = [(f"Where was I {core}?", p), (f"Which city was I {core} in?", p)]
        if born:
            forms += [("What is my birthplace?", "My birthplace is"), ("Where am I from?", "I am from")]
    return forms + [(f"Do you remember when I was {core}?", p)]


def _i_verb(p, low, answer):
    m = re.fullmatch(r"i(?: [a-z]+ly)? ([a-z]+)(?: (.*))?", low)
    if not m:
        return None
    words = p[2:].rstrip(",;").split()       # "I have two kids," asks "What do I have two kids?"
    core_words = list(words)
    while len(core_words) > 1 and core_words[-1].lower() in _ENDINGS:
        core_words.pop()
    core = " ".join(core_words)
    last = next((w.lower() for w in reversed(words) if w.lower() not in _ARTICLES), "")
    asks = " ".join(words[:len(core_words) + 1]) if last != core_words[-1].lower() else core
    forms = []
    if last in _WHERE:
        forms += [(f"Where do I {core}?", p), (f"Tell me where I {core}.", p)]
        if last == "in":
            forms.append((f"Which city do I {core} in?", p))
    else:
        forms += [(f"What do I {asks}?", p), (f"Do you remember what I {asks}?", p), (f"Tell me what I {asks}.", p)]
        if _name_like(answer):
            forms.append((f"Who do I {asks}?", p))
    art = _article(words)
    for w in core_words:
        for alt in related_subjects(w):
            forms.append((f"What is my {alt}?", f"My {alt} is{art}"))
    return forms


_MY_SHAPES = (_my_name, _my_named, _my_is_named, _my_passive, _my_is, _my_verb)
_SHAPES = (_my_name, _my_named, _my_is_named, _my_passive, _my_is, _my_verb, _the_is, _i_have_named, _i_am, _i_was, _i_verb)


def question_forms(prompt: str, answer: str, limit: int | None = 8) -> list[tuple[str, str]]:
    """Up to `limit` distinct (question, reply prefix) pairs about the fact, most typical first:
    the reply prefix is what the skill adapter says before the answer."""
    p = _clean(prompt)
    low = p.lower()
    forms = None
    for shape in _SHAPES:
        if (shape in _MY_SHAPES) != low.startswith("my "):
            continue
        forms = shape(p, low, answer)
        if forms:
            break
    if not forms:                                           # any other shape: ask for its end
        forms = [("What do you know about me?", p)]
    seen, out = set(), []
    for q, echo in forms:
        q = re.sub(r"\s+", " ", q)
        if q.lower() not in seen:
            seen.add(q.lower())
            out.append((q, echo))
    return out if limit is None else out[:limit]


def questions_for(prompt: str, answer: str, limit: int = 8) -> list[str]:
    """The questions of `question_forms`."""
    return [q for q, _ in question_forms(prompt, answer, limit)]


# Ways people wrap the same question in chat (training variety for the skill adapter; the writer
# fits the plain questions).
_WRAPS = ("{q}", "{q}", "{lq}", "Hey, {lq}", "Quick question: {lq}", "Can you remind me: {lq}",
          "Remind me, {lq}", "{q_} again?", "Do you know {indirect}?", "I forgot - {lq}",
          "{q_}", "Sorry, {lq}")


def vary(question: str, rng: random.Random) -> str:
    """The question as a person might type it in chat (casing, a lead-in, no question mark)."""
    q_ = question.rstrip("?. ")
    lq = question[:1].lower() + question[1:]
    m = re.match(r"(What|Who|Where|When|Which \w+) (is|are|was|were) (my .+?)\?$", question)
    indirect = f"{m.group(1).lower()} {m.group(3)} {m.group(2)}" if m else lq.rstrip("?")
    return rng.choice(_WRAPS).format(q=question, lq=lq, q_=q_, indirect=indirect)


# ------------------------------------------------------------------ the writer's chat forms

def _third_person_verb(verb: str) -> str | None:
    """"lives" -> "live", "is" -> "am", "was" -> "was", "has" -> "have"; None for a non-verb."""
    v = verb.lower()
    if v in ("is", "was", "has"):
        return {"is": "am", "was": "was", "has": "have"}[v]
    if v.endswith("s") and not v.endswith("ss") and len(v) > 2:
        return _third_to_base(verb)
    return None


def first_person(prompt: str, facts) -> str:
    """The prompt as the user would say it: a prompt that starts with the user's own name (the
    answer of a "My name is" fact: "Alex Nguyen was born in") becomes "I was born in"; one that
    starts with a named person of another fact ("Logan was born in" after "My spouse is Logan")
    becomes "My spouse was born in". Other prompts are returned unchanged."""
    for f in facts:
        a = f.answer.strip()
        if len(a) < 2 or not a[:1].isupper() or not prompt.startswith(a + " ") and not prompt.startswith(a + "'s "):
            continue
        rest = prompt[len(a):]
        m_own = re.fullmatch(r"my (?:full |first |real )?name (?:is|was)", f.prompt.strip().lower())
        m_rel = re.fullmatch(r"my (.+?)(?:'s name)? (?:is|was)(?: named| called)?", f.prompt.strip().lower())
        if m_own:
            if rest.startswith("'s "):
                return "My " + rest[3:]
            words = rest.split()
            base = _third_person_verb(words[0])
            return " ".join(["I", base] + words[1:]) if base else prompt
        if m_rel:
            who = f.prompt.strip()[3:3 + len(m_rel.group(1))]
            return f"My {who}{rest}"
    return prompt


def echo_forms(prompt: str, answer: str, facts=(), per_fact: int = 4) -> list[tuple[str, str]]:
    """The (question, reply prefix) pairs the writer fits a fact in: the first question of each
    distinct reply prefix, up to `per_fact`, of the fact as the user would say it."""
    forms, seen = [], set()
    for q, echo in question_forms(first_person(prompt, facts), answer, limit=None):
        if echo.lower() not in seen:
            seen.add(echo.lower())
            forms.append((q, echo))
    return forms[:per_fact]


def echo_prefixes(facts, encode, per_fact: int = 4) -> dict[str, list[tuple[str, str]]]:
    """fact id -> [(question, reply prefix)]: the echo forms each fact is fitted in (`encode`:
    text -> token ids, as the reply is tokenized). A reply prefix that two facts would both be
    fitted in ("My hobby is" for "I enjoy chess" and "I also enjoy pottery") goes to one of them:
    the same words cannot key two answers. A fact's own wording (its first form) is always its
    own; a prefix that is no fact's own wording goes to the first fact (in `facts`' order, the
    ledger's: the one said first) that has it, so a question both could answer gets one of the
    user's answers, not an invented one, and adding a fact never takes a form from an earlier
    one. Left out, too, is a reply that goes on from the first two or more tokens of one kept
    before with other words ("My doctor is" / "My doctor's name is"): the rows at the shared
    words cannot lead on both ways, and would derail the first reply ("My doctor's doctor is
    ..."); the question that reply answers gets the kept one. The fact that owns a "My X is"
    several facts share is also fitted as "My main X is": the first of a person's hobbies is
    the one asked about as the main one."""
    forms = {f.id: echo_forms(f.prompt, f.answer, facts, per_fact + 2) for f in facts}
    owner: dict[str, str] = {}
    for f in facts:                                   # own wordings first, then first come
        if forms[f.id]:
            owner.setdefault(forms[f.id][0][1].lower(), f.id)
    claims: dict[str, int] = {}                       # reply prefix -> facts that have it
    for f in facts:
        for _, e in forms[f.id]:
            owner.setdefault(e.lower(), f.id)
            claims[e.lower()] = claims.get(e.lower(), 0) + 1
    out = {}
    for f in facts:
        kept, heads = [], []
        for i, (q, e) in enumerate(forms[f.id]):
            ids = encode(e)
            if i > 0 and (owner[e.lower()] != f.id or any(_forks(ids, h) for h in heads)):
                continue
            kept.append((q, e))
            heads.append(ids)
            # several facts of one kind ("I enjoy woodworking", "I also enjoy chess"): the
            # first said is the one asked about as the main one ("What is my main hobby?"; its
            # reply "My main hobby is" keys on other words than "My hobby is")
            m = re.fullmatch(r"My (\w+) (is|are)", e)
            if m and claims[e.lower()] > 1 and owner[e.lower()] == f.id:
                kept.append((f"What {m.group(2)} my main {m.group(1)}?", f"My main {m.group(1)} {m.group(2)}"))
                heads.append(encode(kept[-1][1]))
        out[f.id] = kept[:per_fact]
    return out


def echo_contexts(facts, tok, per_fact: int = 4) -> dict[str, list[tuple[tuple[int, ...], str]]]:
    """fact id -> [(lead ids, reply prefix)]: each of the fact's echo forms (`echo_prefixes`) as a
    chat turn up to the assistant's reply (the runtime's tokens, `render_conversation`), the
    prefix after it."""
    from engram_local.text.chat import ChatVocab, render_conversation
    from engram_local.text.tokens import encode

    vocab = ChatVocab.of(tok)
    out = {}
    for fid, kept in echo_prefixes(facts, lambda text: encode(tok, text), per_fact).items():
        out[fid] = []
        for q, echo in kept:
            ids, _ = render_conversation(vocab, [{"role": "user", "content": q}, {"role": "assistant", "content": ""}],
                                         reply_open=True)
            out[fid].append((tuple(ids), echo))
    return out


def _forks(a: list[int], b: list[int]) -> bool:
    """Whether token sequences a and b share their first two or more tokens, then differ."""
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    return 2 <= k < min(len(a), len(b))
