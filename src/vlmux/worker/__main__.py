"""`python -m vlmux.worker CONTROL_FD PARENT_PID`: the fork server (vlmux/worker/forkserver.py). multiprocessing does
not re-import a main module named `*.__main__` in the processes a worker starts (worker/prep.py)."""
import os
import sys

from vlmux.worker.forkserver import main

main(int(sys.argv[1]), int(sys.argv[2]))
os._exit(0)  # torch's interpreter teardown takes a second, and a terminal waits for every process of its group
