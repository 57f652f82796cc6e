"""Huge pages for llama.cpp's weights (Linux with glibc): why the console entry may re-exec itself.

Decoding reads every weight once per token; on an F16 backbone (the default MODEL_DIR's, 271 MB)
4 KB-page TLB misses are a large part of that. llama.cpp maps the file (mmap) by default, and the
page cache holds a file in folios as large as the writes that made it (`convert` lays its files
down in 64 MB writes for that reason: convert.tensors.write_gguf) - until the file is evicted and
read back by readahead, whose folio sizes vary. Measured here: the same bytes decoded at 33 to 44
tok/s depending on how they sat in the cache. Read into memory instead (LLAMA_LOAD_MODE_NONE) they
go through glibc's malloc, which asks for transparent huge pages only when the tunable
`glibc.malloc.hugetlb=1` is set - and glibc reads tunables at process start only. So `engram-local`
can re-execute itself once with the tunable (`entry`), and the llama.cpp backend reads the weights
into memory when the tunable is in force (`active`): 43.6 tok/s whatever the cache holds
(docs/benchmarks.md). The price is at start: the kernel may have to compact memory to find the
huge pages, 0.1-1.8 s of loading measured here, which could put a cold `run` past its 2 s
first-token target. So it is the default for `serve` (started once, decodes for hours) and
opt-in elsewhere: `ENGRAM_LOCAL_HUGE_PAGES=1` (any command that decodes with llama.cpp), `=0`
(never, not even `serve`). Torch (the memory writer) gained nothing from it.

No heavy imports here: this runs before every command.
"""

from __future__ import annotations

import os
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
ENV_SWITCH = "ENGRAM_LOCAL_HUGE_PAGES"          # "1": for every LLAMA_COMMANDS; "0": never
ENV_REEXEC = "ENGRAM_LOCAL_REEXECED"            # set on the re-executed process: never twice
THP_SYSFS = "/sys/kernel/mm/transparent_hugepage/enabled"
# Commands that decode with llama.cpp (the others gain nothing and start faster without it).
LLAMA_COMMANDS = frozenset({"run", "serve", "eval", "perplexity"})
DEFAULT_COMMANDS = frozenset({"serve"})          # on without being asked (see the docstring)


def active(environ=None) -> bool:
    """Whether this process started with glibc's malloc huge-page tunable set."""
    env = os.environ if environ is None else environ
    return TUNABLE in env.get("GLIBC_TUNABLES", "").split(":")


def _glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") is not None
    except (ValueError, OSError, AttributeError):
        return False


def _thp_available(path: str = THP_SYSFS) -> bool:
    try:
        with open(path) as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def should_reexec(args: list[str], environ=None, platform: str | None = None) -> bool:
    """Whether `engram-local ARGS` should run again with the tunable (see the module docstring)."""
    env = os.environ if environ is None else environ
    switch = env.get(ENV_SWITCH)
    if (platform or sys.platform) != "linux" or switch == "0" or env.get(ENV_REEXEC):
        return False
    if active(env) or not args or "-h" in args or "--help" in args:
        return False
    if args[0] not in (LLAMA_COMMANDS if switch == "1" else DEFAULT_COMMANDS):
        return False
    return _glibc() and _thp_available()


def reexec_env(environ=None) -> dict:
    env = dict(os.environ if environ is None else environ)
    env["GLIBC_TUNABLES"] = ":".join(x for x in (env.get("GLIBC_TUNABLES"), TUNABLE) if x)
    env[ENV_REEXEC] = "1"
    return env


def maybe_reexec(args: list[str]) -> None:
    """Replace this process by `python -m engram_local.cli ARGS` with the tunable, when it helps;
    returns (doing nothing) otherwise or when the exec itself fails."""
    if not should_reexec(args):
        return
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, "-m", "engram_local.cli", *args], reexec_env())
    except OSError:
        return
