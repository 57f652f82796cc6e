"""Facts a user states about themselves in a chat turn ("btw I'm allergic to penicillin").

Pure text rules, no model: `extract_facts(turn)` returns the statements worth writing to the
user's memory, each a sentence `engram_local.text.facts.split_statement` accepts. The rules are
built for precision - a wrong fact in someone's memory is worse than a missed one (they can
always `/remember` it) - so a clause is written only when every test below passes:

1. It is a statement about the user: it starts (after fillers such as "btw", "oh and", "fyi",
   "remember that") with "I" + a verb of a lasting fact (live, work, drive, have, was born,
   grew up, love, ...), with "I'm" + a lasting complement (a noun phrase, an age, a name or
   nationality, "allergic to ...", "from ...", "vegetarian", ...), with "my X is/are ..."
   (my name, my birthday, my car, my favourite ...), with "my wife and I <verb> ...", or names
   one of the user's people ("my sister is called Anjali", "Anjali is my sister",
   "I have a dog named Rex"). Every other subject (he, she, they, we, my sister + anything but
   her name, the weather, Python, ...) is somebody else's fact or no fact.
2. It is not a question (a "?" clause, a clause opening with a question word or an inverted
   auxiliary, a tag such as ", right?"), a request or command, or about the assistant ("you").
3. It is asserted, not hedged, imagined or reported: no "if", "would", "might", "maybe",
   "wish", "imagine", "pretend", "I think", "I guess", no quotation marks or reporting verbs
   ("said", "told me"), no story or role-play words; such a frame also covers the clauses after
   it in the same sentence ("Pretend you're my grandma and I'm 5").
4. It is lasting, not a passing state, an episode or a plan: no "today", "right now",
   "tonight", "yesterday", "tomorrow", "next week", "going to", "will", "planning", no
   feelings ("tired", "hungry", "so happy"), no "-ing" activity ("I'm working on my essay")
   except living/working/studying somewhere, no appointments ("I have a meeting at 3").
5. It is positive and current: no negation ("I don't eat meat", "no longer") and no "used to".
6. The sentence splits into (prompt, answer) by `split_statement`, with a short, contentful
   answer (not "it", "this", "you", ...).

A turn is split into sentences, and sentences into clauses at ", and I", " but my", "; " and
the like, so "My name is Sam and I'm a nurse, what should I cook tonight?" gives "My name is
Sam" and "I'm a nurse". Light normalisation: "i" -> "I", "im" -> "I'm", "ive" -> "I've",
"my name's Sam" -> "my name is Sam", curly quotes straightened, fillers and trailing "lol",
"now", "btw" dropped, a lower-case first word capitalised; the words are otherwise the user's own.
`explain(turn)` gives the verdict and reason of every clause (for the benchmark and debugging).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from engram_local.text.facts import FactInputError, fix_first_person_case, split_statement, strip_chat_noise

__all__ = ["extract_facts", "explain", "statement_key", "Clause"]


@dataclass
class Clause:
    """One clause of a turn: its text, the statement written for it (None: not written), and why."""
    text: str
    statement: str | None
    reason: str


# --------------------------------------------------------------------------- word lists

# Openers dropped before a clause is judged (longest first; applied repeatedly).
_LEAD_FILLERS = sorted([
    "btw", "by the way", "oh", "oh and", "ah", "and", "also", "plus", "fyi", "fyi,", "just fyi",
    "just so you know", "for the record", "for context", "for future reference", "for reference",
    "some context", "context", "ok", "okay", "ok so", "okay so", "so", "well", "anyway", "anyways",
    "actually", "um", "umm", "uh", "hmm", "haha", "lol", "hey", "hi", "hello", "yeah", "yes", "yep",
    "no", "nope", "sure", "right", "alright", "fun fact", "random fact", "quick note", "note",
    "oh btw", "oh by the way", "ps", "p.s.", "also btw", "and btw", "but", "as i said",
    "like i said", "as i mentioned", "like i mentioned", "as i told you", "again", "honestly",
    "tbh", "to be honest", "in case you need it", "in case it matters", "if it helps",
    "if that helps", "side note", "on a side note", "speaking of which", "anyway so",
    "oh also", "oh yeah", "oh right", "update", "correction", "basically", "honestly though", "small correction", "update:",
    "thanks", "thank you", "cool", "great", "nice", "good", "awesome", "perfect", "got it",
], key=len, reverse=True)

# Explicit requests to remember: what follows is the statement (the request itself is no fact).
_REMEMBER_RE = re.compile(
    r"^(?:(?:please|pls|plz|can you|could you|would you|will you|you should|you can|you could)\s+)?"
    r"(?:remember|note|keep in mind|don'?t forget|do not forget|make a note|take note|save|store|"
    r"write down|jot down|memori[sz]e|note down)\b"
    r"(?:\s+(?:this|that|for me|for later))*\s*(?::|,|-)?\s*(?:that\s+)?", re.IGNORECASE)

_TRAIL_FILLERS = ["lol", "haha", "hahaha", "lmao", "btw", "by the way", "fyi", "now", "though",
                  "tho", "too", "as well", "these days", "nowadays", "anyway", "anyways", "ok",
                  "okay", "just so you know", "for the record", "for future reference", ":)", ":(",
                  ":D", ";)", "xd", "ha", "hehe", "fwiw", "if that matters", "if it matters",
                  "if that helps", "if it helps", "in case you need it", "remember that",
                  "remember it", "remember this", "please remember", "please", "thanks", "thank you"]
_TRAIL_RE = re.compile(r"(?:[\s,;\-–—]+(?:" + "|".join(re.escape(t) for t in sorted(_TRAIL_FILLERS, key=len,
                                                                                      reverse=True))
                       + r"))+\s*$", re.IGNORECASE)

_QUESTION_OPENERS = {"what", "what's", "whats", "where", "where's", "wheres", "when", "when's", "who",
                     "who's", "whos", "whom", "whose", "why", "how", "how's", "hows", "which", "do",
                     "does", "did", "is", "are", "am", "was", "were", "can", "could", "would",
                     "should", "will", "shall", "may", "might", "have", "has", "had", "isn't",
                     "aren't", "don't", "doesn't", "didn't", "won't", "wouldn't", "can't",
                     "couldn't", "shouldn't", "any", "anything", "guess", "tell", "know", "wanna",
                     "remind", "recall"}

_TAG_QUESTIONS = re.compile(r",\s*(?:right|correct|no|yes|yeah|isn'?t it|aren'?t i|am i not|don'?t i|didn'?t i|"
                            r"innit|huh|eh|ok|okay|true|yeah)\s*\?[?!.]*\s*$", re.IGNORECASE)

_SUBORDINATE_LEAD = re.compile(r"^(?:since|because|cause|cuz|as|given that|seeing as|seeing that|considering|"
                               r"now that)\s+(?=(?:i|i'm|im|my)\b)", re.IGNORECASE)

_HYPOTHETICAL = re.compile(
    r"\b(?:if|would|wouldn'?t|could|couldn'?t|might|maybe|mayb|perhaps|wish|wished|suppose|supposed|"
    r"supposedly|imagine|imagining|pretend|pretending|hypothetically|hypothetical|unless|whether|should|"
    r"probably|possibly|let'?s say|say that|what if|in theory|theoretically|dream|dreaming|fantasy|"
    r"role-?play|roleplaying|character|story|scene|script|"
    r"as if|someday|some day|one day|i'?d|id like)\b", re.IGNORECASE)

_FUTURE = re.compile(
    r"\b(?:will|won'?t|i'?ll|gonna|going to|goin to|planning|plan to|plans to|about to|want to|wanna|"
    r"wants to|hope to|hoping|hopefully|thinking of|thinking about|considering|intend|intending|"
    r"tomorrow|tmrw|tmr|next (?:week|month|year|weekend|monday|tuesday|wednesday|thursday|friday|"
    r"saturday|sunday|summer|winter|spring|fall|autumn|time)|soon|later|in a (?:bit|minute|moment|while|"
    r"few)|tonight|tonite|today|right now|rn|atm|at the moment|just now|this (?:morning|afternoon|"
    r"evening|weekend|week|month|semester|term)|yesterday|last (?:night|week|weekend|monday|tuesday|"
    r"wednesday|thursday|friday|saturday|sunday|time)|earlier|on my way|tbh i need)\b", re.IGNORECASE)

_HEDGE = re.compile(
    r"\b(?:i think|i thought|i guess|i believe|i feel like|i suspect|i assume|i reckon|i suppose|"
    r"not sure|unsure|i wonder|wondering|kind of|kinda|sort of|sorta|apparently|allegedly|"
    r"pretty sure|i heard|i doubt|seems|seem|seemed|i feel|i felt|feeling|i'?m told|i was told|"
    r"rumou?r|claims?|claimed|so called|so-called|something like|i mean|almost)\b",
    re.IGNORECASE)

_REPORTED = re.compile(
    r"\b(?:said|says|say|saying|told|tells|tell|asked|asks|wrote|writes|tweeted|posted|texted|"
    r"quote|quoted|quoting|according to|lyrics?|line from|sings|sang|the movie|the film|the book|"
    r"the song|the show|the episode|in the play)\b", re.IGNORECASE)

_NEGATION = re.compile(r"\b(?:not|never|no|none|nobody|nothing|neither|nor|no longer|anymore|any more|"
                       r"without|hardly|barely|used to|use to|ex|formerly|former|dont|cant|wont|isnt|arent|"
                       r"doesnt|didnt|havent|hasnt|wasnt|werent|aint|shouldnt|wouldnt|couldnt)\b|\wn't\b",
                       re.IGNORECASE)

_ADDRESSEE = re.compile(r"\b(?:you|your|yours|yourself|u|ur|ya|y'all|chatgpt)\b",
                        re.IGNORECASE)

_RELATIVE = re.compile(r"\b(?:who|whom|whose|which|that|where|when|what|how|why|because|cause|cuz|until|"
                       r"although|though|while|whenever|so that)\b", re.IGNORECASE)

# Intensifiers before a complement mark a feeling or an opinion ("I'm so tired", "I'm really
# excited"), not a lasting fact.
_INTENSIFIERS = re.compile(r"\b(?:so|very|super|really|soo+|sooo+|too|extremely|totally|quite|pretty|"
                           r"a bit|a little|a tad|bit|kinda|rather|fairly|incredibly|absolutely|"
                           r"completely|utterly|such|literally|lowkey|highkey|hella|mega)\b",
                           re.IGNORECASE)

_DEICTIC_ANSWER = {"it", "this", "that", "these", "those", "them", "him", "her", "me", "us", "you",
                   "here", "there", "everything", "anything", "something", "nothing", "stuff",
                   "things", "one", "ones", "mine", "yours", "so", "too", "well", "fine", "ok",
                   "okay", "good", "great", "bad", "lot", "much", "more", "less", "all", "some",
                   "same", "other", "others", "back", "out", "up", "down", "again"}

# People the user may name: "my sister is called Anjali" is written, "my sister lives in Pune" is
# her fact, not the user's.
_PEOPLE = {
    "mother", "mom", "mum", "mommy", "mummy", "mama", "ma", "father", "dad", "daddy", "papa", "pa",
    "parents", "parent", "sister", "sis", "brother", "bro", "sibling", "siblings", "twin", "wife",
    "husband", "hubby", "spouse", "partner", "boyfriend", "girlfriend", "bf", "gf", "fiance", "fiancé",
    "fiancee", "fiancée", "son", "daughter", "kid", "kids", "child", "children", "baby", "babies",
    "toddler", "grandma", "grandmother", "granny", "nana", "grandpa", "grandfather", "grandad",
    "granddad", "grandparents", "grandson", "granddaughter", "grandchildren", "grandkids", "aunt",
    "auntie", "aunty", "uncle", "cousin", "cousins", "niece", "nephew", "friend", "friends",
    "bestie", "bff", "mate", "buddy", "pal", "boss", "manager", "supervisor", "colleague",
    "colleagues", "coworker", "coworkers", "co-worker", "co-workers", "roommate", "roommates",
    "flatmate", "flatmates", "housemate", "housemates", "neighbor", "neighbour", "neighbors",
    "neighbours", "teacher", "teachers", "professor", "prof", "tutor", "doctor", "gp", "dentist",
    "therapist", "psychiatrist", "lawyer", "accountant", "landlord", "landlady", "coach", "trainer",
    "mentor", "pastor", "priest", "rabbi", "imam", "nanny", "babysitter", "stepmom", "stepmother",
    "stepdad", "stepfather", "stepbrother", "stepsister", "in-laws", "mother-in-law",
    "father-in-law", "sister-in-law", "brother-in-law", "godmother", "godfather", "ex", "family",
    "students", "student", "client", "clients", "employees", "team", "classmate", "classmates",
    "pediatrician", "paediatrician", "physio", "physiotherapist", "surgeon", "cardiologist",
    "optometrist", "vet", "mechanic", "hairdresser", "barber", "advisor", "adviser", "counselor",
    "counsellor", "assistant", "secretary", "guy", "girl", "man", "woman", "people", "folks",
}
_HONORIFIC = re.compile(r"^(?:dr|doctor|mr|mrs|ms|miss|prof|professor|sir|dame|rev|father|sister|aunt|uncle)\.?\s",
                        re.IGNORECASE)

# Things whose "my X is ..." is an event or appointment, not a lasting fact.
_EVENTS = {"flight", "train", "bus", "meeting", "appointment", "appt", "exam", "exams", "test",
           "interview", "class", "lecture", "party", "wedding", "deadline", "presentation", "shift",
           "date", "call", "trip", "vacation", "holiday", "holidays", "surgery", "operation", "game",
           "match", "concert", "show", "reservation", "booking", "package", "parcel",
           "delivery", "homework", "assignment", "essay", "project", "battery", "wifi", "internet",
           "connection", "head", "stomach", "back", "throat", "feet", "legs", "eyes", "bug",
           "lunch", "dinner", "breakfast", "life", "goal", "goals", "aim", "hope", "wish", "dream",
           "priority", "focus", "mind", "heart", "gut", "advice", "experience", "concern", "worry",
           "fear", "issue", "excuse", "reason", "favourite", "favorite",
           "day", "week", "weekend", "morning", "night", "mood", "plan", "plans", "question",
           "problem", "point", "guess", "bad", "opinion", "view", "take", "turn", "answer", "bet"}

# "my X is Y" where Y is one lower-case word: an opinion or a state ("my job is boring")
# unless X names a value (my name, my favourite colour, my blood type, my major ...).
_VALUE_NOUNS = {"name", "nickname", "surname", "birthday", "bday", "birthdate", "age", "email",
                "address", "number", "phone", "zip", "postcode", "type", "blood", "sign", "size",
                "height", "weight", "major", "minor", "job", "profession", "occupation", "role",
                "title", "hometown", "city", "town", "country", "nationality", "religion", "diet",
                "language", "languages", "pronouns", "handle", "username", "color", "colour",
                "food", "dish", "drink", "sport", "team", "band", "song", "movie", "film", "book",
                "author", "game", "show", "season", "animal", "flower", "fruit", "cuisine",
                "hobby", "hobbies", "subject", "degree", "school", "university", "uni", "college",
                "employer", "company", "workplace", "office", "gym", "church", "breed", "dog", "cat",
                "car", "bike", "phone", "laptop", "middle", "maiden", "allergy", "allergies",
                "condition", "specialty", "speciality", "field", "instrument", "genre", "artist",
                "singer", "place", "restaurant", "cafe", "coffee", "order", "shoe", "shirt", "dress",
                "ring", "star", "zodiac", "mbti", "personality", "native", "first", "second",
                "mother", "tongue", "handedness", "pet", "pets", "horse", "parrot", "fish", "rabbit",
                "hamster", "bird", "snake", "turtle", "lizard", "guinea", "pig", "kitten", "puppy"}

_STATE_WORDS = {
    "tired", "exhausted", "sleepy", "hungry", "starving", "thirsty", "bored", "busy", "sick", "ill",
    "unwell", "cold", "hot", "warm", "sad", "happy", "angry", "mad", "upset", "stressed", "anxious",
    "nervous", "excited", "late", "early", "back", "home", "here", "there", "done", "ready", "fine",
    "good", "ok", "okay", "great", "free", "awake", "drunk", "high", "full", "lost", "confused",
    "sorry", "glad", "annoyed", "worried", "scared", "frustrated", "depressed", "lonely", "hungover",
    "sore", "injured", "hurt", "broke", "broken", "dead", "down", "out", "in", "up", "off", "on",
    "away", "online", "offline", "gone", "bored", "curious", "jealous", "proud", "grateful",
    "thankful", "embarrassed", "overwhelmed", "burnt", "burned", "relieved", "calm", "chill",
    "alright", "sure", "right", "wrong", "correct", "serious", "kidding", "joking", "stuck",
    "struggling", "surprised", "shocked", "impressed", "disappointed", "fed", "sick", "pumped",
    "psyched", "stoked", "thrilled", "hyped", "sweating", "freezing", "boiling", "soaked", "wet",
    "late", "behind", "ahead", "finished", "tipsy", "stuffed", "dizzy", "nauseous", "feverish",
    "awesome", "amazing", "terrible", "horrible", "awful", "boring", "fun", "interesting",
    "weird", "strange", "crazy", "nice", "cool", "hard", "easy", "difficult", "annoying", "stupid",
    "dumb", "smart", "better", "worse", "best", "worst", "same", "different", "new", "old",
    "expensive", "cheap", "slow", "fast", "big", "small", "huge", "tiny", "ugly", "beautiful",
    "cute", "messy", "clean", "dirty", "loud", "quiet", "noisy", "perfect", "bad", "okay",
    "meh", "available", "unavailable", "alone", "together", "asleep", "awake", "outside", "inside",
    "downstairs", "upstairs", "nearby", "close", "far", "lucky", "unlucky", "pregnant",
}

# "I'm <word>" complements that are lasting facts about a person.
_LASTING_ADJ = {
    "vegetarian", "vegan", "pescatarian", "pescetarian", "kosher", "halal", "teetotal", "sober",
    "married", "single", "divorced", "widowed", "separated", "engaged", "retired", "unemployed",
    "self-employed", "freelance", "left-handed", "right-handed", "ambidextrous", "colorblind",
    "colourblind", "color-blind", "colour-blind", "deaf", "blind", "diabetic", "asthmatic",
    "epileptic", "autistic", "dyslexic", "celiac", "coeliac", "lactose-intolerant",
    "gluten-free", "bilingual", "trilingual", "monolingual", "introverted", "extroverted",
    "introvert", "extrovert", "straight", "gay", "lesbian", "bisexual", "bi", "queer", "trans",
    "nonbinary", "non-binary", "christian", "muslim", "jewish", "hindu", "buddhist", "sikh",
    "atheist", "agnostic", "catholic", "protestant", "mormon", "orthodox",
    "american", "canadian", "mexican", "brazilian", "argentinian", "argentine", "chilean",
    "peruvian", "colombian", "venezuelan", "cuban", "british", "english", "scottish", "welsh",
    "irish", "french", "german", "dutch", "belgian", "swiss", "austrian", "italian", "spanish",
    "portuguese", "greek", "turkish", "polish", "czech", "slovak", "hungarian", "romanian",
    "bulgarian", "serbian", "croatian", "ukrainian", "russian", "swedish", "norwegian", "danish",
    "finnish", "icelandic", "estonian", "latvian", "lithuanian", "indian", "pakistani",
    "bangladeshi", "nepali", "sri lankan", "chinese", "japanese", "korean", "vietnamese", "thai",
    "filipino", "filipina", "indonesian", "malaysian", "singaporean", "australian",
    "kiwi", "egyptian", "moroccan", "nigerian", "ghanaian", "kenyan", "ethiopian",
    "south african", "iranian", "iraqi", "israeli", "lebanese", "syrian", "saudi", "emirati",
    "palestinian", "jordanian", "afghan", "taiwanese", "mongolian", "armenian", "georgian",
    "lactose", "gluten", "allergic", "alergic", "allergik", "intolerant", "nearsighted",
    "short-sighted", "farsighted", "long-sighted", "an only child", "adopted", "homeschooled",
    "vaccinated", "tall", "short", "blonde", "blond", "redhead", "bald", "pregnant",
}

# "I'm <adjective> <preposition> X" that is lasting ("allergic to", "married to", "from").
_ADJ_PREP = re.compile(
    r"^(?:(?:al+er+g[ie]c|intolerant|married|engaged|afraid|scared|terrified|fluent|good|great|"
    r"terrible|bad|obsessed|addicted|fond|sensitive|related|certified|qualified|trained|licensed|"
    r"registered|enrolled|employed|speciali[sz]ed|native|a (?:big |huge )?fan|a member|member|"
    r"part|based|raised|born|lactose intolerant|gluten intolerant)\s+(?:to|of|in|at|with|from|on|as|by)|"
    r"into|from|originally from|called|named|known as)\b", re.IGNORECASE)

# "I <verb> ..." that states a lasting fact (present habits, possessions, preferences, biography).
_LASTING_VERBS = {
    "live", "lives", "work", "drive", "own", "have", "'ve got", "have got", "speak", "play",
    "use", "ride", "teach", "study", "go", "love", "like", "enjoy", "hate", "prefer", "adore",
    "dislike", "detest", "support", "follow", "collect", "wear", "take", "eat", "drink", "cook",
    "bake", "run", "swim", "practice", "practise", "volunteer", "belong", "attend", "commute",
    "bike", "cycle", "walk", "listen", "read", "watch", "write", "sing", "dance", "climb", "knit",
    "paint", "code", "program", "program", "rent", "share", "keep", "raise", "breed", "grow",
    "train", "lift", "surf", "ski", "skate", "hike", "fish", "volunteer", "manage", "run",
    "lead", "coach", "own", "rent", "was born", "were born", "grew up", "was raised",
    "studied", "graduated", "majored", "moved", "went", "'ve lived", "have lived", "'ve worked",
    "have worked", "'ve been", "have been", "'ve had", "have had", "'ve studied", "have studied",
    "'ve played", "have played", "'ve taught", "have taught", "'ve owned", "have owned",
    "identify", "go by",
}

_FREQ_ADVERBS = r"(?:usually|always|mostly|also|still|currently|actually|really|normally|generally|" \
                r"mainly|often|typically|basically|just|only|even|both|originally|definitely|" \
                r"absolutely|truly|honestly|sometimes|occasionally|regularly|daily|now)"

_WENT_OK = re.compile(r"^went to (?:school|college|university|uni|high school|grad school|med school|law school|"
                      r"boarding school|primary school|secondary school)\b", re.IGNORECASE)

_HAVE_NOUN_BAD = {"meeting", "appointment", "appt", "exam", "test", "interview", "date", "call",
                  "class", "flight", "headache", "migraine", "cold", "fever", "cough", "hangover",
                  "question", "questions", "idea", "ideas", "problem", "problems", "issue", "issues",
                  "doubt", "feeling", "plan", "plans", "deadline", "presentation", "party", "lot",
                  "bit", "few", "couple", "minute", "second", "moment", "sec", "chance", "look",
                  "good", "great", "bad", "hard", "rough", "long", "busy", "quick", "favor", "favour",
                  "request", "suggestion", "thought", "thoughts", "dream", "crush", "nightmare",
                  "bug", "error", "sore", "stomachache", "toothache", "rash", "flu", "infection",
                  "feeling", "craving", "shift", "lecture", "game", "match", "concert", "trip",
                  "surgery", "operation", "checkup", "check-up", "visit", "visitor", "visitors",
                  "guests", "guest", "homework", "assignment", "essay", "report", "project", "task",
                  "tasks", "errand", "errands", "way", "point", "say", "right", "reason", "feeling",
                  "work", "school", "class", "classes", "practice", "rehearsal", "training", "plans",
                  "stuff", "things", "something", "nothing", "everything", "time", "fun", "blast"}

_MEMBERS = r"(?:wife|husband|partner|boyfriend|girlfriend|bf|gf|fiance|fiancé|fiancee|fiancée|spouse|" \
           r"family|kids|children|parents|mom|mum|dad|sister|brother|roommate|flatmate|son|daughter|dog|cat)"


# --------------------------------------------------------------------------- normalisation

def _normalise(text: str) -> str:
    t = text.replace("\u2019", "'").replace("\u2018", "'").replace("\u201c", '"').replace("\u201d", '"')
    t = t.replace("\u2014", " - ").replace("\u2013", " - ")
    return " ".join(t.split())


def _fix_words(s: str) -> str:
    """i -> I, im -> I'm, ive -> I've, a lower-case first word capitalised (fix_first_person_case);
    "my name's Sam" -> "my name is Sam"."""
    s = fix_first_person_case(s)
    s = re.sub(r"\bI am\b", "I am", s, flags=re.IGNORECASE)
    s = re.sub(r"\b([Mm]y name)'s\b", r"\1 is", s)
    s = re.sub(r"\b([Mm]y(?: [\w\-]+){1,3}?)'s (?=(?:called|named|a|an|from|in|at|on)\b|[A-Z0-9])", r"\1 is ", s)
    return s


_ABBREV = re.compile(r"\b(?:Dr|Mr|Mrs|Ms|St|Prof|Jr|Sr|Mt|vs|etc|e\.g|i\.e|No|approx|Ave|Rd|Inc|Ltd|Co|Dept)\.$"
                     r"|\b[A-Z]\.$", re.IGNORECASE)


def _sentences(text: str) -> list[tuple[str, str]]:
    """(sentence, its end mark) in order; the end mark is "?", "!", "." or ""."""
    out, buf = [], ""
    i = 0
    n = len(text)
    while i < n:
        c = text[i]
        if c == "\n":
            if buf.strip():
                out.append((buf.strip(), ""))
            buf = ""
            i += 1
            continue
        buf += c
        if c in ".?!;":
            j = i + 1
            while j < n and text[j] in ".?!":
                buf += text[j]
                j += 1
            at_end = j >= n or text[j].isspace() or text[j] in "\"')"
            if c == "." and _ABBREV.search(buf.rstrip(".") + ".") and j < n:
                i = j
                continue
            if c == "." and j < n and not text[j].isspace():
                i = j
                continue
            if at_end:
                marks = buf.rstrip()[len(buf.rstrip().rstrip(".?!;")):]
                mark = "?" if "?" in marks else ("!" if "!" in marks else ("." if marks else ""))
                out.append((buf.rstrip().rstrip(".?!;").strip(), mark))
                buf = ""
            i = j
            continue
        i += 1
    if buf.strip():
        out.append((buf.strip(), ""))
    return [(s, m) for s, m in out if s]


# clause boundaries inside a sentence: a new subject after a comma or a conjunction
_SUBJECT_START = r"(?:i|i'm|im|i've|ive|i'd|i'll|my|me|we|we're|he|she|they|he's|she's|they're|it|it's|" \
                 r"what|what's|whats|where|when|who|why|how|which|do|does|did|can|could|would|will|" \
                 r"is|are|any|anything|should|tell|please|but|so|and|also|btw|remember)"
_CLAUSE_SPLIT = re.compile(
    r"\s*(?:,\s*(?:and|but|so|plus|also|btw|oh and)?\s+|\s+(?:and|but|so|plus)\s+|\s+-\s+|:\s+(?=(?:i|my|i'm|im)\b))"
    r"(?=" + _SUBJECT_START + r"\b)", re.IGNORECASE)


_PAIR = re.compile(r"\b(my\s+(?:[\w\-]+\s+){0,2}?" + _MEMBERS + r")\s+and\s+(I|me)\b|\b(me)\s+and\s+(my)\b",
                   re.IGNORECASE)


def _clauses(sentence: str) -> list[str]:
    protected = _PAIR.sub(lambda m: (f"{m.group(1)}\x00{m.group(2)}" if m.group(1) else f"{m.group(3)}\x00{m.group(4)}"),
                          sentence)
    parts = [p.strip(" ,").replace("\x00", " and ") for p in _CLAUSE_SPLIT.split(protected)]
    return [p for p in parts if p]


def _strip_lead(c: str) -> tuple[str, bool]:
    """Drop openers; returns (clause, explicit) where explicit = the user asked to remember it."""
    explicit = False
    changed = True
    while changed:
        changed = False
        c = c.lstrip(" ,.-:;!")
        m = _REMEMBER_RE.match(c)
        if m and c[m.end():].strip():
            c, explicit, changed = c[m.end():], True, True
            continue
        m = _SUBORDINATE_LEAD.match(c)
        if m:
            c, changed = c[m.end():], True
            continue
        low = c.lower()
        for f in _LEAD_FILLERS:
            if low.startswith(f) and (len(c) == len(f) or not (c[len(f)].isalnum() or c[len(f)] in "'-")):
                c, changed = c[len(f):], True
                break
    return c.strip(" ,.-:;"), explicit


def _strip_trail(c: str) -> str:
    prev = None
    while prev != c:
        prev = c
        c = strip_chat_noise(_TRAIL_RE.sub("", c)).rstrip(" ,.!;:-")
        c = re.sub(r",\s*(?:and\s+)?not\s+(?:in\s+|at\s+|from\s+|an?\s+|the\s+)?[\w\-' ]{1,30}$", "", c,
                   flags=re.IGNORECASE).rstrip()
    return c


# --------------------------------------------------------------------------- the rules

def _words(s: str) -> list[str]:
    return re.findall(r"[\w][\w'\-\.]*", s)


def _is_name(word_seq: str) -> bool:
    """A capitalised name ("Anjali", "Dr. Krause", "Mary Ann"), not a demonym or an adjective."""
    s = word_seq.strip()
    if not s:
        return False
    if _HONORIFIC.match(s):
        return True
    words = s.split()
    if len(words) > 4:
        return False
    if not all(w[:1].isupper() for w in words if w.lower() not in ("de", "van", "von", "da", "al", "bin", "del", "la")):
        return False
    return words[0].lower() not in _LASTING_ADJ and words[0].lower() not in _STATE_WORDS \
        and words[0].lower() not in {"the", "a", "an", "i", "my", "mine", "not", "so", "very", "also"}


_JOINT = re.compile(r"^(?:my\s+(?:[\w\-]+\s+){0,2}?" + _MEMBERS + r"\s+and\s+i|me\s+and\s+my\s+(?:[\w\-]+\s+){0,2}?"
                    + _MEMBERS + r")\s+(?:both\s+)?(\w+)\s*(.*)$", re.IGNORECASE)

_MY_RE = re.compile(r"^my\s+((?:[\w\-]+\s+){0,3}?[\w\-]+?)(?:'s\s+(name|names)\s+(?:is|are)\s+(.+)|"
                    r"\s+(?:is|are|was|were)\s+(?:called|named|known as)\s+(.+)|"
                    r"\s+(?:is|are)\s+(.+))$", re.IGNORECASE)

_OPINION_NOUNS = {"mess", "wreck", "bit", "little", "lot", "bad", "good", "complete", "total", "nervous",
                  "sucker", "fool", "idiot", "genius", "disaster", "nightmare", "joke", "pain", "drag",
                  "struggle", "circus", "zoo", "blast", "dream", "while", "moment", "minute", "second",
                  "hot", "real", "bummer", "shame", "relief", "win", "fail", "failure", "trainwreck",
                  "rollercoaster", "roller", "mystery", "lie", "gift", "curse", "fan"}

_FAVOURITE = {"favourite", "favorite", "fave", "fav", "usual", "go-to", "regular", "all-time"}


def _judge_joint(c: str) -> str | None:
    m = _JOINT.match(c)
    if not m:
        return "not \"my X and I ...\""
    verb, rest = m.group(1).lower(), m.group(2).lower()
    if verb in {"live", "own", "have", "run", "share", "rent"}:
        return None
    if verb == "are" and not re.match(r"^(?:in|at|on|with|going|\w+ing\b)", rest) \
            and (rest.split() or [""])[0] not in _STATE_WORDS and not _INTENSIFIERS.match(rest):
        return None
    return "not a lasting fact"


_MOVABLE = {"car", "phone", "keys", "key", "bag", "wallet", "laptop", "bike", "package", "parcel", "kids",
            "dog", "cat", "glasses", "passport", "luggage", "suitcase", "coat", "jacket", "umbrella",
            "charger", "headphones", "book", "van", "truck", "boat"}


def _name_answer(answer: str) -> str | None:
    w = answer.split()
    if not w or len(w) > 4:
        return "not a name"
    if w[0].lower() in {"a", "an", "the", "my", "your", "his", "her", "their", "our", "secret", "private",
                        "unknown", "weird", "long", "short", "hard", "difficult", "complicated", "classified",
                        "confidential", "unusual", "funny", "same", "different", "none", "whatever"}:
        return "not a name"
    return None


def _judge_my(c: str) -> str | None:
    """A clause opening with "my": None when it is a written fact, else the reason it is not."""
    m = _MY_RE.match(c)
    if not m:
        if re.match(r"^my\s+(?:[\w\-]+\s+){0,2}?" + _MEMBERS + r"\s+and\s+i\b", c, re.IGNORECASE):
            return _judge_joint(c)
        return "not \"my X is ...\""
    noun_phrase = m.group(1).lower()
    nouns = noun_phrase.split()
    head = nouns[-1]
    if m.group(2):                                   # my X's name is Y
        return _name_answer(m.group(3))
    if m.group(4):                                   # my X is called / named Y
        return _name_answer(m.group(4))
    rest = m.group(5).strip()
    first = rest.split()[0].lower() if rest.split() else ""
    if head in {"name", "names", "nickname", "surname"}:
        return _name_answer(rest)
    if head in _MOVABLE and re.match(r"^(?:at|in|on|with|under|behind|outside|inside|somewhere|still)\b", rest,
                                     re.IGNORECASE):
        return "where a thing is now"
    if head in _PEOPLE or (set(nouns) & _PEOPLE and head not in _VALUE_NOUNS):
        # another person's fact, unless it names them
        return None if _is_name(rest) else "a fact about another person"
    if head in _FAVOURITE:
        return "no thing named (\"my favourite is ...\")"
    if set(nouns) & _EVENTS and not set(nouns) & _FAVOURITE:
        return "an event or a passing thing"
    if re.match(r"^(?:to|about|that|when|how|what|why|whether|going|getting|\w+ing)\b", rest, re.IGNORECASE):
        return "an aim, an opinion or an activity"
    if re.match(r"^(?:a|an|the)\s+(\w+)", rest, re.IGNORECASE) and \
            re.match(r"^(?:a|an|the)\s+(\w+)", rest, re.IGNORECASE).group(1).lower() in _OPINION_NOUNS:
        return "a state or an opinion"
    if first in _STATE_WORDS or _INTENSIFIERS.match(rest):
        return "a state or an opinion"
    words = rest.split()
    if len(words) == 1 and words[0][:1].islower() and not re.match(r"^\d", words[0]) \
            and not (set(nouns) & (_VALUE_NOUNS | _FAVOURITE)):
        return "a state or an opinion"
    return None


_AGE = re.compile(r"^(?:\d{1,3}|(?:twenty|thirty|forty|fifty|sixty|seventy|eighty|ninety)(?:[\s\-](?:one|two|three|"
                  r"four|five|six|seven|eight|nine))?|eleven|twelve|thirteen|fourteen|fifteen|sixteen|seventeen|"
                  r"eighteen|nineteen)(?:\s+(?:years?|yrs?)(?:\s+old)?|\s*y/?o)?$")

_REACTION_OBJECT = re.compile(r"^(?:it|this|that|these|those|them|him|her|the idea|when|how|what|your|"
                              r"the (?:first|second|third|last|other|new|latest|previous|next|one|way|idea|"
                              r"sound|look|answer|suggestion|plan)|both|either|all of)\b")


def _judge_im(c: str, rest: str) -> str | None:
    """I'm / I am + `rest`."""
    rest = re.sub(r"^(?:" + _FREQ_ADVERBS + r"\s+)+", "", rest, flags=re.IGNORECASE)
    low = rest.lower()
    w = low.split()
    if not w:
        return "no complement"
    if _INTENSIFIERS.match(low):
        return "a feeling or an opinion"
    if re.match(r"^(?:a|an|the)\s", low):
        fan = re.match(r"^an? (?:(?:big|huge|massive|lifelong|die-hard|diehard)\s+)?(?:[\w\-]+\s+){0,2}?fan\b", low)
        if re.fullmatch(r"an? (?:(?:big|huge|massive|lifelong|die-hard|diehard) )?fan", low):
            return "a fan of what?"
        if fan and (re.match(r"^an? (?:big|huge|massive|lifelong|die-hard|diehard)\s", low) or " of " in low
                    or not low.endswith(" fan")):
            return None
        if len(w) > 1 and (w[1] in _OPINION_NOUNS or w[1] in _STATE_WORDS):
            return "a feeling or an opinion"
        if len(w) > 1 and w[1] in {"big", "huge"} and not re.match(r"^an? (?:big|huge) (?:[\w\-]+ ){0,2}fan\b", low):
            return "a feeling or an opinion"
        return None
    if _AGE.match(low):
        return None
    if re.match(r"^(?:living|working|studying|majoring|training|employed|based|settled)\b", low):
        if re.match(r"^(?:working on|working out|working late|studying for|training for)\b", low):
            return "an activity"
        return None
    if _ADJ_PREP.match(low):
        return None
    if re.match(r"^\w+ing\b", low):
        return "an activity (-ing)"
    if w[0] in _LASTING_ADJ or " ".join(w[:2]) in _LASTING_ADJ:
        if re.search(r"\b(?:on|at|in|for|about|with|to|from|of|by)\b", low):
            return "not a lasting complement"
        return None
    if rest[:1].isupper() and _is_name(rest):
        return None
    if re.match(r"^(?:in|at|on|with|by|near|outside|inside|off|out|over|under|heading|headed|stuck|about)\b", low):
        return "where they are now"
    return "not a lasting complement"


def _judge_i(c: str, now: bool = False) -> str | None:
    """A clause opening with I / I'm / I've: None when it is a written fact, else why not."""
    low = c.lower()
    m = re.match(r"^i\s*(?:'m|am)\s+", low)
    if m:
        return _judge_im(c, c[m.end():])
    m = re.match(r"^i(?:\s+|(?='))((?:" + _FREQ_ADVERBS + r"\s+)*)(.*)$", low)
    if not m:
        return "not about the user"
    rest = m.group(2)
    verb = None
    for v in sorted(_LASTING_VERBS, key=len, reverse=True):
        if rest.startswith(v) and (len(rest) == len(v) or not rest[len(v)].isalnum()):
            verb = v
            break
    if verb is None:
        return "not a verb of a lasting fact"
    after = rest[len(verb):].strip()
    words = after.split()
    if verb == "go" and (not after.startswith("to ") or re.match(r"^to (?:sleep|bed|the toilet|the bathroom|great|"
                                                                   r"war|pieces|waste|hell|work now)\b", after)):
        return "not a lasting fact"
    if now and verb in {"go", "eat", "drink", "cook", "bake", "watch", "read", "write", "walk", "run", "take",
                        "listen", "play", "swim", "ride", "hike", "climb", "dance", "sing", "study", "train",
                        "lift", "surf", "ski", "skate", "cycle", "bike", "fish"}:
        return "an activity now"
    if verb in {"live", "lives"} and not re.match(r"^(?:in|near|with|at|on|outside|abroad|alone|by|close|next|"
                                                  r"just|about|around|downtown|upstate|here|there)\b", after):
        return "not a lasting fact"
    if verb in {"live", "lives"} and re.match(r"^(?:on the edge|for|with it|with that|and)\b", after):
        return "an idiom"
    if verb == "run" and re.match(r"^(?:out|late|away|into|over|off|around|from|through|low)\b", after):
        return "not a lasting fact"
    if verb in {"speak", "play", "work", "go", "write", "read"} and \
            re.match(r"^(?:from experience|to win|to me|with what|for fun|it by ear|along|around|hard|on it|at it|"
                     r"to great lengths)\b", after):
        return "an idiom"
    if verb == "went" and not _WENT_OK.match(rest):
        return "an episode"
    if verb in ("study", "studied") and re.match(r"^(?:for|all|late|hard)\b", after):
        return "an episode"
    if verb in ("have", "'ve got", "have got", "'ve had", "have had"):
        if re.match(r"^(?:to|got to|gotta)\b", after):
            return "an obligation"
        if words and words[0] in _HAVE_NOUN_BAD:
            return "an event or a passing thing"
        if words and words[0] in ("a", "an", "the", "my", "some") and any(x in _HAVE_NOUN_BAD for x in words[1:3]):
            return "an event or a passing thing"
    if verb in ("'ve been", "have been"):
        if not re.match(r"^(?:a|an|living|working|studying|teaching|playing|practi[cs]ing|married|" +
                        "|".join(re.escape(x) for x in sorted(_LASTING_ADJ)) + r")\b", after):
            return "not a lasting complement"
    if verb in ("like", "love", "enjoy", "prefer", "adore", "hate", "dislike", "detest"):
        if _REACTION_OBJECT.match(after):
            return "a reaction, not a preference"
    if verb == "take" and not re.match(r"^(?:\w+ (?:for|daily|every|twice|once)\b|my (?:coffee|tea)\b)", after):
        return "not a lasting fact"
    if verb in ("watch", "read", "write", "eat", "drink", "cook", "bake", "keep", "share", "grow", "raise",
                "train", "lift", "walk", "listen"):
        if re.match(r"^(?:a|an|the|this|that|it|some)\b", after) \
                and not re.search(r"\b(?:every|always|daily|weekly|usually)\b", low):
            return "an episode"
    return None


_NAME_IS_MY = re.compile(r"^([A-Z][\w\-]+(?:\s+[A-Z][\w\-]+)?)(?:\s+is|\s*'s)\s+my\s+((?:[\w\-]+\s+){0,2}[\w\-]+)$")


def _judge_clause(c: str, now: bool = False) -> str | None:
    low = c.lower()
    m = _NAME_IS_MY.match(c)                         # "Anjali is my sister"
    if m:
        if m.group(1).lower() in {"this", "that", "she", "he", "it", "today", "tomorrow", "there", "here",
                                  "what", "who", "which", "everything", "nothing", "someone", "somebody",
                                  "they", "these", "those", "mine"}:
            return "not a name"
        tail = m.group(2).lower().split()
        if tail[-1] in _PEOPLE | {"dog", "cat", "pet", "horse", "parrot", "rabbit", "hamster"} or set(tail) & _FAVOURITE:
            return None
        return "not a person of the user's"
    if re.match(r"^me\s+and\s+my\b", low):
        return _judge_joint(c)
    if low.startswith("my "):
        return _judge_my(c)
    if re.match(r"^i\b|^i'", low):
        return _judge_i(c, now)
    return "not about the user"


# clause patterns that keep a clause out of memory, in the order they are tried, with the reason
_SKIP_RULES = ((_HYPOTHETICAL, "hypothetical or conditional"), (_FUTURE, "a plan or a passing moment"),
               (_HEDGE, "hedged"), (_REPORTED, "reported speech"), (_NEGATION, "negated or former"),
               (_ADDRESSEE, "about the conversation"))


def _judge(c: str, mark: str, explicit: bool, last: bool, now: bool = False) -> str | None:
    """None when the clause is written; otherwise the reason."""
    low = c.lower()
    if not c:
        return "empty"
    if mark == "?" and last and not explicit:
        return "a question"
    first = low.split()[0].strip(",.!?") if low.split() else ""
    if first in _QUESTION_OPENERS:
        return "a question or a request"
    if '"' in c or re.search(r"(?:^|\s)'\w", c) or re.search(r"\w'(?:\s|$)", c) and not re.search(r"s'(?:\s|$)", c):
        return "a quotation"
    for rule, reason in _SKIP_RULES:
        if rule.search(c):
            return reason
    if _RELATIVE.search(c) and not re.search(r"\b(?:who|that)\s+(?:is|are)\s+(?:called|named)\b", low):
        return "a subordinate clause"
    if len(_words(c)) > 18:
        return "too long to be one fact"
    if re.search(r"\b(?:we|our|us|he|she|they|his|hers|their|theirs|its)\b", low) and \
            not _JOINT.match(c):
        return "about someone else too"
    return _judge_clause(c, now)


# reasons that also cover the clauses after it in the same sentence
_FRAMES = {"hypothetical or conditional", "a quotation", "reported speech", "hedged"}


def answer_fault(answer: str) -> str | None:
    """Why an answer is no fact's content ("it", "the blue one", nine words or more), or None."""
    aw = [w.lower() for w in _words(answer)]
    if not aw:
        return "no answer"
    if len(aw) > 8:
        return "answer too long"
    if aw[0] in _DEICTIC_ANSWER and len(aw) == 1:
        return "the answer is no content"
    if aw[-1] in {"one", "ones"} or aw[0] in {"it", "this", "that", "you", "them", "him", "her", "me"}:
        return "the answer is no content"
    return None


def statement_clauses(statement: str) -> list[str]:
    """The clauses of a typed statement, split as a chat turn's are (sentences, then ", and I",
    " but my", ...; no judging): "My name is Sam and I'm a nurse." -> ["My name is Sam", "I'm a
    nurse"]; "I work at Marks and Spencer" stays whole."""
    return [c for sentence, _ in _sentences(_normalise(statement)) for c in _clauses(sentence)]


def _checked_statement(c: str) -> tuple[str | None, str]:
    """The statement for a clause judged a fact, if split_statement accepts it with a good answer."""
    s = c.strip().rstrip(".!;").strip()
    try:
        prompt, answer = split_statement(s)
    except FactInputError:
        return None, "no linking word: split_statement cannot split it"
    fault = answer_fault(answer)
    if fault is not None:
        return None, fault
    return s, "a fact about the user"


def explain(turn: str) -> list[Clause]:
    """Every clause of a user turn with the statement written for it (or None) and the reason."""
    out = []
    text = _normalise(turn)
    for sentence, mark in _sentences(text):
        tagged = bool(_TAG_QUESTIONS.search(sentence + (mark or "")))
        if tagged:
            out.append(Clause(sentence, None, "a question (tag)"))
            continue
        clauses = _clauses(sentence)
        carry = False
        frame = None            # a clause that opens a hypothetical, quoted or hedged frame
        for k, raw in enumerate(clauses):
            last = k == len(clauses) - 1
            if _REMEMBER_RE.fullmatch(raw.strip(" ,.:;-")) or _REMEMBER_RE.fullmatch(raw.strip(" ,.:;-") + " "):
                carry = True
                continue
            c, explicit = _strip_lead(raw)
            explicit, carry = explicit or carry, False
            if not c:
                continue
            stripped = _strip_trail(c)
            now = bool(re.search(r"\bnow\b", c[len(stripped):], re.IGNORECASE))
            c = stripped
            # "I live in Pune and work as a nurse": the second verb shares the subject
            pieces = [c]
            m = re.match(r"^(i\s+.+?)\s+and\s+(" + "|".join(
                v for v in sorted(_LASTING_VERBS, key=len, reverse=True) if re.fullmatch(r"[a-z ]+", v)
                and v not in ("am",)) + r")\b(.*)$", c, re.IGNORECASE)
            if m:
                pieces = [m.group(1), "I " + m.group(2) + m.group(3)]
            for p in pieces:
                p = _fix_words(p.strip())
                if frame is not None:           # "Pretend you're my grandma and I'm 5"
                    out.append(Clause(p, None, f"inside a frame ({frame})"))
                    continue
                reason = _judge(p, mark, explicit, last, now)
                if reason in _FRAMES:
                    frame = reason
                if reason is not None:
                    out.append(Clause(p, None, reason))
                    continue
                stmt, why = _checked_statement(p)
                out.append(Clause(p, stmt, why))
    return out


def extract_facts(turn: str) -> list[str]:
    """The statements of facts about the user in one chat turn (possibly none), in order, each
    accepted by `split_statement`. See the module docstring for the rules."""
    seen, out = set(), []
    for c in explain(turn):
        if c.statement is not None and statement_key(c.statement) not in seen:
            seen.add(statement_key(c.statement))
            out.append(c.statement)
    return out


def statement_key(statement: str) -> str:
    """A statement compared loosely: case, curly quotes, spacing, the final stop, and i/im/ive
    spellings ignored ("im allergic to penicillin." == "I'm allergic to penicillin")."""
    s = _normalise(statement).lower().rstrip(" .!;")
    s = re.sub(r"\bim\b", "i'm", s)
    s = re.sub(r"\bi am\b", "i'm", s)
    s = re.sub(r"\bive\b", "i've", s)
    s = re.sub(r"\bi have got\b", "i've got", s)
    s = re.sub(r"\bmy name's\b", "my name is", s)
    return s
