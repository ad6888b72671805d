"""The public API's type annotations (the package ships py.typed): a typed user
program checks cleanly under ``mypy --strict`` with the types a user expects
(``rt.tvar("a", 100)`` is a ``TVar[int]``), a wrong value type is caught, and
the stubs that carry them (shmstm/stm/*.pyi) match the modules
(mypy.stubtest)."""
import os
import subprocess
import sys
import sysconfig
import textwrap

import shmstm

PKG_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(shmstm.__file__)))

USER = textwrap.dedent('''
    import asyncio
    from typing import List

    import shmstm
    from shmstm import TVar


    def total(accts: List[TVar[int]]) -> int:
        return sum(a.value for a in accts)


    def main() -> None:
        with shmstm.open("typing-demo", create=None) as rt:
            a = rt.tvar("a", 100)
            b = rt.tvar("b", 0)
            reveal_type(a)

            @shmstm.atomic
            def transfer(n: int) -> bool:
                shmstm.check(a.value >= n)
                a.value -= n
                b.value += n
                return True

            @shmstm.atomic(timeout=1.0)
            def both() -> int:
                return total([a, b])

            ok: bool = transfer(10)
            reveal_type(both)
            reveal_type(shmstm.atomically(lambda: a.value))
            reveal_type(shmstm.or_else(lambda: "x", lambda: "y"))
            reveal_type(rt.lookup("a"))
            names: List[str] = rt.names()
            reveal_type(asyncio.run(shmstm.atomically_async(both)))
            with shmstm.durability("sync"):
                pass
            print(ok, names, shmstm.read_durable("/nowhere"), shmstm.list_segments())
        shmstm.unlink("typing-demo")
''')

EXPECTED = [       # mypy may print builtins qualified or not
    'Revealed type is "shmstm.stm.tvar.TVar[int]"',
    'Revealed type is "def () -> int"',
    'Revealed type is "int"',
    'Revealed type is "str"',
    'Revealed type is "shmstm.stm.tvar.TVar[Any]"',
    'Revealed type is "int"',
]


def _installed():
    """True if shmstm is in site-packages (mypy finds it there by itself and
    refuses site-packages on MYPYPATH); else (an in-place build) its parent
    goes on MYPYPATH."""
    paths = {os.path.realpath(sysconfig.get_paths()[k]) for k in ("purelib", "platlib")}
    return os.path.realpath(PKG_PARENT) in paths


def mypy(tmp_path, *args, module="mypy"):
    # shmstm's own modules are not what is checked here: only the user
    # program against the annotations they export.
    ini = tmp_path / "mypy.ini"
    ini.write_text("[mypy]\nstrict = True\ncache_dir = %s\n[mypy-shmstm.*]\nignore_errors = True\n"
                   % (tmp_path / ".mypy_cache"))
    env = dict(os.environ)
    if not _installed():
        env["MYPYPATH"] = PKG_PARENT
    config = ["--mypy-config-file" if module == "mypy.stubtest" else "--config-file", str(ini)]
    return subprocess.run([sys.executable, "-m", module] + config + list(args),
                          cwd=str(tmp_path), env=env, capture_output=True, text=True,
                          timeout=600)


def test_a_typed_user_program_checks_strictly_with_the_expected_types(tmp_path):
    (tmp_path / "user.py").write_text(USER)
    r = mypy(tmp_path, "user.py")
    assert r.returncode == 0, r.stdout + r.stderr
    revealed = [line.split("note: ", 1)[1].replace("builtins.", "")
                for line in r.stdout.splitlines() if "Revealed type" in line]
    assert revealed == EXPECTED, r.stdout


def test_a_value_of_the_wrong_type_is_caught(tmp_path):
    (tmp_path / "wrong.py").write_text(textwrap.dedent('''
        import shmstm

        def f(rt: shmstm.Runtime) -> None:
            a = rt.tvar("a", 100)
            a.value = "not an int"
    '''))
    r = mypy(tmp_path, "wrong.py")
    assert r.returncode == 1 and "Incompatible types in assignment" in r.stdout, r.stdout


def test_the_stub_matches_the_module(tmp_path):
    allow = tmp_path / "allow.txt"
    allow.write_text("shmstm.stm.tvar.TVar.__class_getitem__\n")   # the stub's Generic has it
    r = mypy(tmp_path, "shmstm.stm.tx", "shmstm.stm.tvar", "shmstm.stm.runtime",
             "--allowlist", str(allow), module="mypy.stubtest")
    assert r.returncode == 0, r.stdout + r.stderr
