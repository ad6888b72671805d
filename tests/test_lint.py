"""The lints CI enforces: ruff over the Python (configured in pyproject.toml)
and the C core and shmstm._fast compiled with -Wall -Wextra -Werror (the core's
files also build with -Werror in tests/native)."""
import os
import subprocess
import sys
import sysconfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NATIVE = os.path.join(REPO, "native")


def _tools():
    d = os.path.join(REPO, "tools")
    return [os.path.join(d, f) for f in sorted(os.listdir(d))
            if not f.endswith(".c") and os.path.isfile(os.path.join(d, f))]


def test_ruff_finds_nothing():
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache",
                        os.path.join(REPO, "shmstm"), os.path.join(REPO, "tests")] + _tools(),
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_c_builds_without_warnings(tmp_path):
    flags = ["-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-I" + NATIVE,
             '-DSHMSTM_PKG_VERSION="lint"']
    for src in sorted(f for f in os.listdir(NATIVE) if f.endswith(".c") and f != "pyfast.c"):
        r = subprocess.run(["gcc"] + flags + ["-c", os.path.join(NATIVE, src),
                                              "-o", str(tmp_path / (src + ".o"))],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, (src, r.stderr)
    # shmstm._fast: a CPython extension (gnu11, as setup.py builds it)
    r = subprocess.run(["gcc", "-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror", "-fPIC",
                        "-I" + NATIVE, "-I" + sysconfig.get_paths()["include"], "-c",
                        os.path.join(NATIVE, "pyfast.c"), "-o", str(tmp_path / "pyfast.o")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
