"""The C tests of the kernel under AddressSanitizer + UBSan: both ctest executables,
native/tests/test_engram.c (canonical ids, hashing, dequantization, overrides) and
native/tests/test_runtime.c (ek_engram_forward against a plain-loop reference, the ek_runtime
begin/commit/abort/truncate/reset state, ek_eval_callback through fake ggml entry points).
"100% tests passed" in ctest's summary covers both.

Runs the sequence documented in docs/native.md in a temporary build directory:
  cmake -S . -B build-asan -DENGRAM_BUILD_TESTS=ON -DENGRAM_SANITIZE=ON
  cmake --build build-asan && ctest --test-dir build-asan --output-on-failure
"""

import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run(cmd):
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("ctest") is None,
                    reason="cmake/ctest not installed")
def test_c_tests_pass_under_sanitizers(tmp_path):
    if not (ROOT / "native" / "tests" / "test_engram.c").exists():
        pytest.skip("not a source checkout (native/tests missing)")
    build = tmp_path / "build-asan"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    run(["cmake", "-S", ".", "-B", build, *generator,
         "-DENGRAM_BUILD_TESTS=ON", "-DENGRAM_SANITIZE=ON"])
    run(["cmake", "--build", build])
    out = run(["ctest", "--test-dir", build, "--output-on-failure"])
    assert "100% tests passed" in out
    assert "test_engram" in out and "test_runtime" in out, out
