"""Coverage-guided fuzzing of one harness with atheris (libFuzzer for Python):

    python tests/fuzz/atheris_main.py HARNESS [libFuzzer flags, e.g. -runs=100000 -max_total_time=60]

HARNESS is eov, eov-valid, gguf or kernel (tests/fuzz/harnesses.py). The seeds are read from
tests/fuzz/seeds/ (never written); add a corpus directory argument to keep what libFuzzer
finds. An expected error is a normal outcome; any other exception, a silent acceptance, a
crash or a -timeout (default 10 s) stops the run with libFuzzer's report and a non-zero exit;
the crashing input goes to a new temporary directory (printed at the start), never the
working directory, unless -artifact_prefix= is given. Without atheris (no wheel for this
Python), use the plain runner, tests/fuzz/run.py.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import atheris  # noqa: E402

import engram_local.formats.eov  # noqa: F401,E402
import engram_local.formats.header  # noqa: F401,E402
import engram_local.formats.sealed  # noqa: F401,E402
import engram_local.formats.sidecar  # noqa: F401,E402
import engram_local.native  # noqa: F401,E402
import engram_local.native.hashing  # noqa: F401,E402
from tests.fuzz import harnesses  # noqa: E402

# The editable install imports engram_local through a custom loader, which
# atheris.instrument_imports skips: instrument the loaded engram_local functions instead.
for _name, _module in list(sys.modules.items()):
    if _name.startswith("engram_local") and _module is not None:
        for _obj in list(vars(_module).values()):
            if getattr(_obj, "__module__", None) == _name:
                if isinstance(_obj, type):
                    for _attr, _fn in list(vars(_obj).items()):
                        if hasattr(_fn, "__code__"):
                            setattr(_obj, _attr, atheris.instrument_func(_fn))
                elif hasattr(_obj, "__code__"):
                    setattr(_module, _obj.__name__, atheris.instrument_func(_obj))


def main():
    if len(sys.argv) < 2 or sys.argv[1] not in harnesses.TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(harnesses.TARGETS)}}} [libFuzzer flags]")
    name = sys.argv.pop(1)
    target = harnesses.make(name)
    expected = target.expected

    def one_input(data: bytes):
        try:
            target(data)
        except expected:
            pass

    seeds = sorted((harnesses.SEEDS / harnesses.SEED_DIRS[name]).iterdir())
    args = [sys.argv[0]] + sys.argv[1:]
    if not any(a.startswith("-timeout=") for a in args):
        args.append("-timeout=10")
    if not any(a.startswith(("-artifact_prefix=", "-exact_artifact_path=")) for a in args):
        # libFuzzer writes crash-/leak-/timeout-<sha1> into the working directory by default
        # (the repository root): keep them out of the tree
        artifacts = tempfile.mkdtemp(prefix=f"engram-fuzz-{name}-")
        args.append(f"-artifact_prefix={artifacts}/")
        print(f"atheris_main: artifacts (crashing inputs) go to {artifacts}/", file=sys.stderr)
    # seeds passed read-only (-seed_inputs): libFuzzer writes no corpus directory
    args.append("-seed_inputs=" + ",".join(str(p) for p in seeds))
    atheris.Setup(args, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
