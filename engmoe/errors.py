"""One-line errors for every command: a user's mistake is one ``engmoe: error: …`` line, exit status 2.

The messages of ConfigError, BlendError, the data errors and the checkpoint errors already name the file or
field and what was expected; a traceback around them only buries that line. ``--traceback`` (any command)
or ``ENGMOE_TRACEBACK=1`` shows the full trace instead. Anything else (a bug) keeps its traceback.
"""
from __future__ import annotations

import os
import sys
from typing import Callable, Sequence

USER_ERROR_STATUS = 2


class MissingExtraError(ImportError):
    """An optional dependency group is not installed; the message names the pip command."""


def missing_extra(module: str, extra: str, what: str) -> MissingExtraError:
    return MissingExtraError(f"{what} needs the '{module}' package, which is not installed: "
                             f"pip install 'engmoe[{extra}]'")


# top-level modules of each optional extra (setup.py extras_require)
EXTRA_MODULES = {"data": ("datatrove", "tokenizers", "orjson", "regex", "pyarrow", "zstandard")}


def extra_for(error: ImportError) -> str | None:
    """The extra that provides the module an ImportError could not import, if any."""
    top = (getattr(error, "name", None) or "").split(".")[0]
    return next((extra for extra, mods in EXTRA_MODULES.items() if top in mods), None)


def user_error_types() -> tuple[type[BaseException], ...]:
    """The exception classes whose message is the whole story (imported lazily, each group optional: the
    handler must work in an install without torch/megatron or without the data extra)."""
    types: list[type[BaseException]] = [MissingExtraError, FileNotFoundError]
    groups = [("engmoe.config", ("ConfigError",)), ("engmoe.data.blend", ("BlendError", "ShardError")),
              ("engmoe.data.packing", ("PackedDataError",)), ("engmoe.checkpoint.sharded", ("CheckpointError",)),
              ("engmoe.data_prep.readers", ("DataError",)), ("engmoe.data_prep.chat_data", ("ChatDataError",))]
    import importlib

    for module, names in groups:
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        types += [getattr(mod, name) for name in names]
    return tuple(types)


def wants_traceback(argv: Sequence[str]) -> bool:
    return "--traceback" in argv or os.environ.get("ENGMOE_TRACEBACK", "") not in ("", "0")


def strip_traceback_flag(argv: Sequence[str]) -> list[str]:
    """``argv`` without ``--traceback`` (before a ``--`` separator only: what follows belongs to a job)."""
    argv = list(argv)
    end = argv.index("--") if "--" in argv else len(argv)
    return [a for a in argv[:end] if a != "--traceback"] + argv[end:]


def run_cli(main: Callable[[list[str]], int], argv: Sequence[str] | None = None, prog: str = "engmoe") -> int:
    """``main(argv)`` with user errors reported as one line on stderr (status 2)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if wants_traceback(argv):
        return main(strip_traceback_flag(argv))
    try:
        return main(strip_traceback_flag(argv))
    except user_error_types() as e:
        message = str(e).strip() or type(e).__name__
        if isinstance(e, FileNotFoundError) and e.filename and str(e.filename) not in message:
            message = f"{e.filename}: {message}"
        print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
        return USER_ERROR_STATUS
