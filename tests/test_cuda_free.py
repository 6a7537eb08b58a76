"""worker/cuda_free.py: what the fork servers import never starts CUDA, so the processes they fork can use it."""
import subprocess
import sys

import pytest


def python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.split()


def test_torchs_questions_are_answered_by_the_shims_with_torchs_own_answers():
    assert python("import torch.utils._triton as t; before = t.has_triton(); import vlmux.worker.cuda_free as c; "
                  "import torch; print(t.has_triton is c.has_triton, c.has_triton() == before, "
                  "torch.cuda.get_device_capability is c.get_device_capability)") == ["True", "True", "True"]


def test_a_server_whose_imports_started_cuda_says_so():
    code = ("import torch; torch.cuda.is_initialized = lambda: True\n"
            "from vlmux.worker.cuda_free import check_cuda_not_started\n"
            "try:\n    check_cuda_not_started('test server')\nexcept RuntimeError as e:\n    print(*str(e).split()[:6])")
    assert python(code) == ["importing", "the", "test", "server's", "modules", "started"]


@pytest.mark.gpu
def test_the_workers_fork_server_imports_leave_cuda_to_the_children():
    """With torchao installed, transformers' import asked torch's has_triton, which started CUDA in the server."""
    code = """
import os, importlib.util, torch
import vlmux.worker.preload
print("torchao", importlib.util.find_spec("torchao") is not None, "started", torch.cuda.is_initialized())
pid = os.fork()
if pid == 0:
    try:
        os._exit(0 if float(torch.ones(4, device="cuda").sum()) == 4.0 else 1)
    except BaseException as e:
        print("child failed:", repr(e).replace(" ", "_"), flush=True)
        os._exit(2)
print("child", os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
"""
    out = python(code)
    print(out)
    assert out[2:] == ["started", "False", "child", "0"]
