"""Imported first by the preparing processes' fork server (worker/prep.py PRELOAD), and only there: the server exits
once its worker is gone, even while it still imports torch and the processor's modules (seconds on a busy host),
before it would notice its worker's end itself."""
import os

from vlmux.worker.orphan import exit_when_orphaned

exit_when_orphaned(os.getppid())
