"""worker/lean.py: the fork servers' imports leave scikit-learn and SciPy out, and transformers' checks as they were for
everything else (every family still captions in a worker: tests/test_families.py)."""
import subprocess
import sys

import pytest

from vlmux.worker.prep import PRELOAD

SERVERS = {"workers": ["vlmux.worker.preload"],
           "preparing processes": [module for module in PRELOAD if module != "vlmux.worker.prep_server"]}
REPORT = """
import importlib, importlib.util, os, sys
for module in {modules!r}:
    importlib.import_module(module)
import transformers.utils
from transformers.utils import import_utils
from vlmux.worker.lean import KEPT_OUT
for check in KEPT_OUT.values():
    package = check.removeprefix("is_").removesuffix("_available")
    real = getattr(import_utils, check)
    bound = [getattr(m, "__dict__", {{}}).get(check, real) for m in list(sys.modules.values())]
    kept = {{function() for function in bound if function is not real}}
    # loaded in the server | the answers of the modules that kept one | transformers' answer now | installed
    print(package, package in sys.modules, kept == {{False}}, getattr(transformers.utils, check)(),
          importlib.util.find_spec(package) is not None)
os._exit(0)
"""


def report(modules: list[str]) -> list[list[str]]:
    done = subprocess.run([sys.executable, "-c", REPORT.format(modules=modules)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return [line.split() for line in done.stdout.splitlines()]


@pytest.mark.parametrize("server", SERVERS)
def test_the_servers_leave_the_packages_out_and_every_later_check_sees_them_as_installed(server):
    for package, loaded, kept_false, now, installed in report(SERVERS[server]):
        assert loaded == "False", f"the {server}' server imported {package}"
        assert kept_false == "True", package
        assert now == installed, package


def test_the_callers_process_keeps_transformers_as_it_is():
    code = "import sys, vlmux.backends.transformers; print('vlmux.worker.lean' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.split() == ["False"], done.stderr[-3000:]
