"""The data layer's one exception type, `DataError`.

Every failure caused by the user's data or data config (a bad jsonl line, a missing
index, a transform that raises, a mixture entry with a wrong field) is raised as a
`DataError` whose message names where the problem is (file:line, mixture entry and
field) and what to do next, so the CLI can print it as is without a traceback.
"""

from __future__ import annotations


class DataError(ValueError):
    """A problem with input data or data configuration; the message says where and how to fix it."""


def no_space_error(path: object) -> DataError:
    """The DataError for a full disk (ENOSPC/EDQUOT) while writing under `path`.

    It names the filesystem and its free space, so the fix is plain; whatever was
    half-written has been removed by then (outputs are built under temporary names)."""
    from fm9g.rundir.atomic import describe_no_space  # the bottom layer; deferred to keep this module bare

    mount, what = describe_no_space(str(path))
    return DataError(f"{what}; free space on {mount}, then run the same command again")
