"""The data layer's one exception type, `DataError`.

Every failure caused by the user's data or data config (a bad jsonl line, a missing
index, a transform that raises, a mixture entry with a wrong field) is raised as a
`DataError` whose message names where the problem is (file:line, mixture entry and
field) and what to do next, so the CLI can print it as is without a traceback.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class DataError(ValueError):
    """A problem with input data or data configuration; the message says where and how to fix it."""


def no_space_error(path: object) -> DataError:
    """The DataError for a full disk (ENOSPC/EDQUOT) while writing under `path`.

    It names the filesystem and its free space, so the fix is plain; whatever was
    half-written has been removed by then (outputs are built under temporary names)."""
    from fm9g.rundir.atomic import no_space_reason  # the bottom layer; deferred to keep this module bare

    return DataError(no_space_reason(str(path), "run the same command again"))


@contextlib.contextmanager
def reraise_no_space(path: object) -> Iterator[None]:
    """Turn a full disk (ENOSPC/EDQUOT) inside the block into no_space_error(path); any
    other error passes through.  Leaving the block runs the inner clean-up first, so the
    free space reported is what is left."""
    from fm9g.rundir.atomic import is_no_space

    try:
        yield
    except OSError as error:
        if not is_no_space(error):
            raise
        raise no_space_error(path) from None
