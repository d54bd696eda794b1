"""The exception of the inference layer."""

from __future__ import annotations


class InferenceError(RuntimeError):
    """A convert, infer or serve stage cannot go on; the message names the file (and
    line) or the job at fault and says what to do next."""
