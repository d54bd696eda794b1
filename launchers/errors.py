"""The error of the post-training stages (convert, infer, serve), in its own module so the
prompt and sampling modules can both raise it without importing each other."""

from __future__ import annotations


class InferenceError(RuntimeError):
    """A convert, infer or serve stage cannot go on; the message names the file (and
    line) or the job at fault and says what to do next."""
