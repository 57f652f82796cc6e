"""Optional encryption at rest of memory files: AES-256-GCM (the `cryptography` package).

A sealed file is `MAGIC (8 bytes) | nonce (12 bytes) | AES-GCM(key, nonce, plain, aad=MAGIC)`,
where `plain` is the whole checksummed .eov (GGUF) file; the GCM tag (last 16 bytes) makes any
change to a sealed file, or a wrong key, fail to open. The key is 32 bytes, given as 64 hex
digits in the environment variable ENGRAM_LOCAL_KEY or in the file ENGRAM_LOCAL_KEY_FILE names
(its mode must give no access to group or others, e.g. 0600). With a key set, every memory
file written is sealed; a sealed file cannot be read without the key. docs/security.md says
what this protects and what it does not.
"""

from __future__ import annotations

import os
import stat

MAGIC = b"EOVSEAL1"
NONCE_BYTES = 12
TAG_BYTES = 16
KEY_ENV = "ENGRAM_LOCAL_KEY"
KEY_FILE_ENV = "ENGRAM_LOCAL_KEY_FILE"


class SealError(ValueError):
    """A key that cannot be used, a sealed file without a key, or a wrong key / damaged file."""


def is_sealed(data: bytes) -> bool:
    return data[:len(MAGIC)] == MAGIC


def is_sealed_file(path: str | os.PathLike) -> bool:
    """Whether `path` is a regular file that starts like a sealed memory file."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
        with open(path, "rb") as f:
            return is_sealed(f.read(len(MAGIC)))
    except OSError:
        return False


def _parse_key(text: str, source: str) -> bytes:
    text = text.strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise SealError(f"{source}: the memory key must be 64 hex digits (32 bytes)")
    return key


def configured_key() -> bytes | None:
    """The key from ENGRAM_LOCAL_KEY or ENGRAM_LOCAL_KEY_FILE, or None when neither is set."""
    value = os.environ.get(KEY_ENV)
    if value:
        return _parse_key(value, KEY_ENV)
    path = os.environ.get(KEY_FILE_ENV)
    if not path:
        return None
    try:
        st = os.stat(path)
    except OSError as exc:
        raise SealError(f"{path}: cannot read the memory key file ({KEY_FILE_ENV}): "
                        f"{exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise SealError(f"{path}: the memory key file ({KEY_FILE_ENV}) is not a regular file")
    if st.st_mode & 0o077:
        raise SealError(f"{path}: the memory key file is readable by others (mode "
                        f"{stat.S_IMODE(st.st_mode):04o}); chmod 600 it")
    try:
        with open(path, encoding="ascii") as f:
            return _parse_key(f.read(4096), path)
    except (OSError, UnicodeDecodeError) as exc:
        raise SealError(f"{path}: cannot read the memory key file: {exc}") from None


def _aesgcm(key: bytes):
    try:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    except ImportError:
        raise SealError("encrypted memory files need the `cryptography` package: "
                        "pip install 'engram-local[crypto]'") from None
    return AESGCM(key)


def seal(plain: bytes, key: bytes) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    return MAGIC + nonce + _aesgcm(key).encrypt(nonce, plain, MAGIC)


def unseal(data: bytes, key: bytes | None, where: str) -> bytes:
    """The plain file inside a sealed one; SealError (one line, naming `where`) otherwise."""
    if key is None:
        raise SealError(f"{where}: the memory file is encrypted; set {KEY_ENV} or {KEY_FILE_ENV} "
                        "to its key")
    if len(data) < len(MAGIC) + NONCE_BYTES + TAG_BYTES:
        raise SealError(f"{where}: truncated encrypted memory file")
    aes = _aesgcm(key)
    from cryptography.exceptions import InvalidTag

    nonce = data[len(MAGIC):len(MAGIC) + NONCE_BYTES]
    try:
        return aes.decrypt(nonce, data[len(MAGIC) + NONCE_BYTES:], MAGIC)
    except InvalidTag:
        raise SealError(f"{where}: cannot decrypt the memory file: wrong key, or the file was "
                        "changed or damaged") from None
