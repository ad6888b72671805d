"""Build and install shmstm.  The C core in native/ is compiled by cffi in
out-of-line API mode (native/build_shmstm.py) into ``shmstm._native``; the
hot calls go through ``shmstm._fast`` (native/pyfast.c, a few CPython
functions that call into the core through a table of pointers: fast.h)."""
import importlib.util
import os
import re

from setuptools import Extension, setup

HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, "shmstm", "__about__.py")) as f:
    VERSION = re.search(r'__version__ = "([^"]+)"', f.read()).group(1)
with open(os.path.join(HERE, "README.md")) as f:
    README = f.read()

_spec = importlib.util.spec_from_file_location(
    "_shmstm_build", os.path.join(HERE, "native", "build_shmstm.py"))
_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_build)
_cargs, _largs, _ = _build.compile_flags()
FAST = Extension(
    "shmstm._fast",
    sources=["native/pyfast.c"],
    depends=["native/fast.h", "native/shmstm.h"],
    include_dirs=["native"],
    extra_compile_args=[a for a in _cargs if a != "-std=c11"] + ["-std=gnu11"],
    extra_link_args=_largs,
)

setup(
    name="shmstm",
    version=VERSION,
    description="Multiprocess shared-memory software transactional memory for Python",
    long_description=README,
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.9",
    packages=["shmstm", "shmstm.cli", "shmstm.shm", "shmstm.stats", "shmstm.stm", "shmstm.store"],
    package_data={"shmstm": ["py.typed"], "shmstm.stm": ["*.pyi"]},
    setup_requires=["cffi>=1.15"],
    cffi_modules=["native/build_shmstm.py:ffibuilder"],
    ext_modules=[FAST],
    # lmdb is a dependency, not an extra: open(name, path=...) must work after
    # a plain install.  The "durable" extra stays (empty) for old requirements.
    install_requires=["cffi>=1.15", "posix_ipc>=1.1", "psutil>=5.9", "lmdb>=1.4"],
    extras_require={
        "test": ["pytest>=7", "pytest-xdist>=3", "pytest-timeout>=2", "prometheus_client>=0.16",
                 "mypy>=1.8", "ruff>=0.4"],
        "durable": [],
    },
    entry_points={"console_scripts": [
        "shmstm-demo=shmstm.cli.demo:main",
        "shmstm-stats=shmstm.cli.stats:main",
        "shmstm-cleanup=shmstm.cli.cleanup:main",
    ]},
    zip_safe=False,
)
