"""The paper's user files, read in one place (memory's --from-user-json, the skill adapter's
training samples and the head-to-head evaluation all read them through here).

A user file is one JSON document per user (users/*.json)::

    {"uid": ..., "facts": [{"key", "answer" (text, number or list), "paraphrases": [...]}],
     "direct_qa": [{"key", "question", "answer"}],
     "indirect_qa": [{"question", "answer", "required_fact_keys": [...]}], ...}

A fact's prompt follows the paper's rule: the first paraphrase that ends with the answer (a
trailing "." stripped), minus the answer; without one, "My <key words> is". Its other
paraphrases that end with the answer give further trigger prompts.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from engram_local.text.facts import FactInputError, _answer_text, prompt_from_sentence


@dataclass(frozen=True)
class UserFact:
    key: str
    prompt: str                                    # by the paper's rule
    answer: str                                    # a list answer joined with ", "
    paraphrases: list[str] = field(default_factory=list)   # the other prompts, distinct


@dataclass
class UserFile:
    path: Path
    doc: dict                                      # the whole document, as parsed
    facts: list[UserFact]

    @property
    def uid(self) -> str:
        return self.path.stem

    @property
    def direct_qa(self) -> list[dict]:
        return list(self.doc.get("direct_qa", []))

    @property
    def indirect_qa(self) -> list[dict]:
        return list(self.doc.get("indirect_qa", []))


def read_user_file(path: str | os.PathLike) -> UserFile:
    """The user file at `path`; FactInputError where it is unreadable, not JSON, or has no list
    of facts each with a key and an answer."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        raw = doc["facts"]
        if not isinstance(raw, list):
            raise TypeError("facts is not a list")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FactInputError(f"{path}: not a user file with a list of facts ({exc})") from None
    facts = []
    for i, f in enumerate(raw):
        try:
            key, answer, paras = str(f["key"]), f["answer"], list(f.get("paraphrases", []))
        except (KeyError, TypeError) as exc:
            raise FactInputError(f"{path}: fact {i} lacks {exc}") from None
        answer = _answer_text(answer, f"{path}: fact {i}", numbers=True)
        prompts = [p for p in (prompt_from_sentence(str(s), answer) for s in paras) if p]
        main = prompts[0] if prompts else f"My {key.replace('_', ' ')} is"
        extra = [p for p in dict.fromkeys(prompts[1:]) if p != main]
        facts.append(UserFact(key, main, answer, extra))
    return UserFile(path, doc, facts)


def user_files(dirs: Sequence[str | os.PathLike]) -> list[Path]:
    """The user files of `dirs`: a file as given, a directory as its *.json (sorted);
    FileNotFoundError for a missing path or a directory without user files."""
    out = []
    for d in dirs:
        d = Path(d)
        if d.is_dir():
            found = sorted(d.glob("*.json"))
            if not found:
                raise FileNotFoundError(f"{d}: no user files (*.json)")
            out += found
        elif d.is_file():
            out.append(d)
        else:
            raise FileNotFoundError(f"{d}: no such user file or directory")
    return out
