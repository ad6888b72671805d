"""Crash tests: fixtures.

* ``debug_pkg``: a debug build of shmstm (kill points, delays, shake compiled in) in a
  temporary directory, built once per test process (each xdist worker builds its own
  into its own basetemp: no lock needed, ~2 s).  The .py files are copied from the
  ``shmstm`` package this test run imports (the installed release package in CI),
  the C core (and ``shmstm._fast``, which must match its pointer table) is compiled
  from this repository's ``native/`` with SHMSTM_DEBUG=1 by the project's one cffi
  builder, ``native/build_shmstm.py``.
* ``run_driver(scenario, cfg, debug=True)``: runs ``_driver.py`` in a subprocess (with
  the debug build on PYTHONPATH when ``debug``) and returns its JSON observations.

Also loads tests/conftest.py when pytest's rootdir is this folder (see
tests/stress/conftest.py for why).
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

_HERE = os.path.dirname(os.path.abspath(__file__))
_PARENT = os.path.normpath(os.path.join(_HERE, os.pardir, "conftest.py"))
_REPO = os.path.normpath(os.path.join(_HERE, os.pardir, os.pardir))
DRIVER = os.path.join(_HERE, "_driver.py")


def pytest_configure(config):
    if not any(m.split(":")[0].strip() == "crash" for m in config.getini("markers")):
        config.addinivalue_line(
            "markers", "crash: kill/stop/interrupt tests with real processes (run by default)")
    pm = config.pluginmanager
    for plugin in pm.get_plugins():
        if os.path.normpath(getattr(plugin, "__file__", None) or "") == _PARENT:
            return
    spec = importlib.util.spec_from_file_location("shmstm_tests_conftest", _PARENT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    pm.register(mod, "shmstm_tests_conftest")


_BUILD = r"""
import os, sys
sys.path.insert(0, "native")
os.environ["SHMSTM_DEBUG"] = "1"
import build_shmstm
print(build_shmstm.ffibuilder.compile(tmpdir="."))
# shmstm._fast from the same sources (its ABI must match this core's table)
from setuptools import Distribution, Extension
from setuptools.command.build_ext import build_ext
cargs, largs, _ = build_shmstm.compile_flags()
ext = Extension("shmstm._fast", ["native/pyfast.c"], include_dirs=["native"],
                extra_compile_args=[a for a in cargs if a != "-std=c11"] + ["-std=gnu11"],
                extra_link_args=largs)
cmd = build_ext(Distribution({"ext_modules": [ext]}))
cmd.inplace = 1
cmd.ensure_finalized()
cmd.run()
"""


@pytest.fixture(scope="session")
def debug_pkg(tmp_path_factory):
    """Directory to put on PYTHONPATH for the debug build of shmstm."""
    import shmstm

    native = os.path.join(_REPO, "native")
    if not os.path.isfile(os.path.join(native, "build_shmstm.py")):
        pytest.fail("crash tests need the C sources (native/) next to tests/: %s" % native)
    root = str(tmp_path_factory.mktemp("shmstm-debug"))
    shutil.copytree(native, os.path.join(root, "native"))
    src = os.path.dirname(shmstm.__file__)
    shutil.copytree(src, os.path.join(root, "shmstm"),
                    ignore=lambda d, names: [n for n in names if not (
                        n.endswith((".py", ".pyi")) or n == "py.typed"
                        or os.path.isdir(os.path.join(d, n)) and n != "__pycache__")])
    env = dict(os.environ)
    env.pop("SHMSTM_SANITIZE", None)
    r = subprocess.run([sys.executable, "-c", _BUILD], cwd=root, env=env,
                       capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        pytest.fail("debug build failed:\n%s\n%s" % (r.stdout[-3000:], r.stderr[-3000:]))
    check = subprocess.run(
        [sys.executable, "-c", "import shmstm._core as b; print(b._build)"],
        cwd=root, env=dict(env, PYTHONPATH=root), capture_output=True, text=True, timeout=60)
    if check.returncode != 0 or not check.stdout.strip().endswith("debug"):
        pytest.fail("debug build does not import: %s %s" % (check.stdout, check.stderr[-2000:]))
    return root


@pytest.fixture
def run_driver(tmp_path, request):
    """Run a driver scenario; returns its observations (a dict)."""

    def run(scenario, cfg, debug=True, timeout=240):
        env = dict(os.environ)
        if debug:
            env["PYTHONPATH"] = request.getfixturevalue("debug_pkg")
        for var in ("SHMSTM_FAULT", "SHMSTM_DELAY", "SHMSTM_SHAKE"):
            env.pop(var, None)
        env.update(cfg.pop("_env", {}))
        cfg_path = tmp_path / ("%s.json" % scenario)
        out_path = tmp_path / ("%s.out.json" % scenario)
        cfg_path.write_text(json.dumps(cfg))
        r = subprocess.run([sys.executable, DRIVER, scenario, str(cfg_path), str(out_path)],
                           env=env, cwd=str(tmp_path), capture_output=True, text=True,
                           timeout=timeout)
        if not out_path.exists():
            pytest.fail("driver %s wrote no result (exit %s)\nstdout:\n%s\nstderr:\n%s" % (
                scenario, r.returncode, r.stdout[-4000:], r.stderr[-6000:]))
        res = json.loads(out_path.read_text())
        if "driver_error" in res:
            pytest.fail("driver %s failed:\n%s\nstderr:\n%s" % (
                scenario, res["driver_error"], r.stderr[-4000:]))
        res["_stderr"] = r.stderr[-4000:]
        return res

    return run
