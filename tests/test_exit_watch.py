"""The test run's end: a Python that does not exit fails the run, even when every test passed."""
import subprocess
import sys

# What a leaked pool does: a thread Python joins at exit that never ends.
HANGS_AT_EXIT = """
import threading
from vlmux.testing.exit_watch import watch_interpreter_exit
threading.Thread(target=threading.Event().wait, name="leaked-pool-thread").start()
watch_interpreter_exit({status}, 0.5)
"""


def test_a_hang_at_exit_after_a_passing_session_fails_the_run_and_shows_the_stacks():
    result = subprocess.run([sys.executable, "-c", HANGS_AT_EXIT.format(status=0)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode != 0
    assert "has not exited 0.5 s after the session" in result.stderr and "in _shutdown" in result.stderr  # the join


def test_a_hang_at_exit_after_a_failing_session_keeps_the_sessions_status():
    result = subprocess.run([sys.executable, "-c", HANGS_AT_EXIT.format(status=2)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
