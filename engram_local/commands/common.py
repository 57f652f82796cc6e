"""Option help and helpers shared by several commands."""

MODEL_HELP = ("Model: a MODEL_DIR from `engram-local convert`, or an Engram checkpoint directory "
              "(default: the built-in SmolLM2-135M-Instruct + Engram).")


def printable(text) -> str:
    """`text` safe for a terminal: every non-printable character (C0/C1 controls such as ESC
    that start terminal escape sequences, DEL, bidi and other format characters, line
    separators) is shown escaped (\\x1b, \\u202e), never sent raw."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape(c) for c in text)


def printable_lines(text: str) -> str:
    """`printable` of each line of `text` (the line breaks stay)."""
    return "\n".join(printable(line) for line in str(text).split("\n"))


def printable_json(doc) -> str:
    """json.dumps(doc, ensure_ascii=False) with every non-printable character \\u-escaped
    (json leaves C1 controls, DEL and format characters raw); still valid JSON of the same value."""
    import json

    text = json.dumps(doc, ensure_ascii=False)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _json_escape(c) for c in text)


def _escape(c: str) -> str:
    n = ord(c)
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"


def _json_escape(c: str) -> str:
    n = ord(c)
    if n < 0x10000:
        return f"\\u{n:04x}"
    n -= 0x10000
    return f"\\u{0xD800 + (n >> 10):04x}\\u{0xDC00 + (n & 0x3FF):04x}"
