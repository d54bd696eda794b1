"""The data layer's one exception type, `DataError`.

Every failure caused by the user's data or data config (a bad jsonl line, a missing
index, a transform that raises, a mixture entry with a wrong field) is raised as a
`DataError` whose message names where the problem is (file:line, mixture entry and
field) and what to do next, so the CLI can print it as is without a traceback.
"""

from __future__ import annotations


class DataError(ValueError):
    """A problem with input data or data configuration; the message says where and how to fix it."""
