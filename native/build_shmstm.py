"""The one cffi builder: out-of-line API mode, producing ``shmstm._native``.

The cdef is read from native/shmstm.h (the part between the CDEF markers, plus
the CDEF-ONLY blocks), so the header is the single source of truth for the
C/Python boundary.  Set SHMSTM_DEBUG=1 for a debug build (assertions and
fault-injection points), SHMSTM_SANITIZE=address for an ASan build.
"""
import os
import re

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))


def package_version():
    with open(os.path.join(HERE, "..", "shmstm", "__about__.py")) as f:
        return re.search(r'__version__ = "([^"]+)"', f.read()).group(1)
SOURCES = ["clock.c", "segment.c", "heap.c", "tvar.c", "txn.c", "wait.c", "proc.c", "fault.c",
           "ring_commit.c", "ring_flush.c"]


def read_cdef():
    with open(os.path.join(HERE, "shmstm.h")) as f:
        text = f.read()
    body = text.split("/* CDEF BEGIN */", 1)[1].split("/* CDEF END */", 1)[0]
    body = re.sub(r"/\* CDEF-ONLY\n(.*?)CDEF-ONLY \*/", r"\1", body, flags=re.S)
    return body


ffibuilder = FFI()
ffibuilder.cdef(read_cdef())


def compile_flags():
    """(extra_compile_args, extra_link_args, define_macros) for the core and
    for shmstm._fast (setup.py), from SHMSTM_DEBUG / SHMSTM_SANITIZE /
    SHMSTM_WERROR."""
    cargs = ["-std=c11", "-O2", "-Wall", "-Wextra", "-fno-strict-aliasing"]
    largs = []
    macros = [("SHMSTM_PKG_VERSION", '"%s"' % package_version())]
    if os.environ.get("SHMSTM_DEBUG"):
        macros.append(("SHMSTM_DEBUG", "1"))
        cargs = [a for a in cargs if a != "-O2"] + ["-O1", "-g"]
    if os.environ.get("SHMSTM_SANITIZE"):
        san = os.environ["SHMSTM_SANITIZE"]
        cargs += ["-fsanitize=" + san, "-fno-omit-frame-pointer", "-g"]
        largs += ["-fsanitize=" + san]
    if os.environ.get("SHMSTM_WERROR"):
        cargs.append("-Werror")
    return cargs, largs, macros


extra_compile_args, extra_link_args, define_macros = compile_flags()

ffibuilder.set_source(
    "shmstm._native",
    '#include "core.h"\n',
    sources=[os.path.join("native", s) for s in SOURCES],
    include_dirs=["native"],
    define_macros=define_macros,
    extra_compile_args=extra_compile_args,
    extra_link_args=extra_link_args,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
