"""The exception of the inference layer, defined node side (fm9g.launchers.prompts) so
that the login side catches what the node-side code raises."""

from __future__ import annotations

from fm9g.launchers.prompts import InferenceError

__all__ = ["InferenceError"]
