"""Build and install shmstm.  The C core in native/ is compiled by cffi in
out-of-line API mode (native/build_shmstm.py) into ``shmstm._native``."""
import os
import re

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, "shmstm", "__about__.py")) as f:
    VERSION = re.search(r'__version__ = "([^"]+)"', f.read()).group(1)
with open(os.path.join(HERE, "README.md")) as f:
    README = f.read()

setup(
    name="shmstm",
    version=VERSION,
    description="Multiprocess shared-memory software transactional memory for Python",
    long_description=README,
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.9",
    packages=["shmstm"],
    package_data={"shmstm": ["py.typed"]},
    setup_requires=["cffi>=1.15"],
    cffi_modules=["native/build_shmstm.py:ffibuilder"],
    install_requires=["cffi>=1.15", "posix_ipc>=1.1", "psutil>=5.9"],
    extras_require={
        "test": ["pytest>=7", "pytest-xdist>=3", "pytest-timeout>=2", "prometheus_client>=0.16", "lmdb>=1.4"],
        "durable": ["lmdb>=1.4"],
    },
    entry_points={"console_scripts": [
        "shmstm-demo=shmstm.demo:main",
        "shmstm-stats=shmstm.stats_cli:main",
        "shmstm-cleanup=shmstm._cleanup_cli:main",
    ]},
    zip_safe=False,
)
