"""Make sure tests/conftest.py is in effect when pytest's rootdir is this folder.

Run as ``cd /tmp && pytest /work/main/tests/stress`` with no setup.py / ini file above
(rootdir and confcutdir become tests/stress), pytest would not load the parent
conftest; then load it here and register it as a plugin (its fixtures, hooks and the
``stress`` marker).  When pytest already loaded it, do nothing.
"""

import importlib.util
import os

_PARENT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                        os.pardir, "conftest.py"))


def pytest_configure(config):
    pm = config.pluginmanager
    for plugin in pm.get_plugins():
        if os.path.normpath(getattr(plugin, "__file__", None) or "") == _PARENT:
            return
    spec = importlib.util.spec_from_file_location("shmstm_tests_conftest", _PARENT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    pm.register(mod, "shmstm_tests_conftest")
