"""Load a mixture entry's transform script and check it defines transform(data, num_sample, r).

The script is executed from its path as a fresh module each time it is loaded (one
load per process: the loader's workers load it themselves), under a name derived
from the task, and is not registered in sys.modules, so two tasks using scripts with
the same file name cannot shadow each other.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fm9g.data.errors import DataError

TransformFn = Callable[[dict[str, Any], int, random.Random], Any]


def load_transform(path: str | Path, where: str) -> TransformFn:
    """Execute the script at `path` and return its `transform`; `where` names the entry in errors."""
    script = Path(path)
    if not script.is_file():
        raise DataError(f"{where}: field 'transforms': {script} does not exist")
    digest = hashlib.sha1(str(script.resolve()).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(f"fm9g_transform_{digest}", script)
    if spec is None or spec.loader is None:
        raise DataError(f"{where}: field 'transforms': {script} is not a loadable Python file")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as error:  # the user's script: report anything it raises
        raise DataError(
            f"{where}: field 'transforms': {script} raised {type(error).__name__} on import: {error}"
        ) from None
    function = getattr(module, "transform", None)
    if not callable(function):
        raise DataError(f"{where}: field 'transforms': {script} does not define transform(data, num_sample, r)")
    try:
        inspect.signature(function).bind({}, 0, random.Random(0))
    except TypeError:
        raise DataError(
            f"{where}: field 'transforms': transform in {script} must accept (data, num_sample, r)"
        ) from None
    except ValueError:
        pass  # builtins without a signature: trust them
    return function  # type: ignore[no-any-return]
