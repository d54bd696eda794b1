"""Signals as a terminal delivers them.

A process started in the background of a non-interactive shell (`cmd &`, as a CI runner
or `nohup` may start the test suite) inherits SIGINT and SIGQUIT ignored, and Python
then installs no KeyboardInterrupt handler at all.  A user's Ctrl-C reaches a foreground
command whose SIGINT is at its default, so the tests that send one restore that first."""

from __future__ import annotations

import signal


def terminal_signals() -> None:
    """SIGINT and SIGQUIT back to their defaults (a `preexec_fn`, or in a forked child)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)
