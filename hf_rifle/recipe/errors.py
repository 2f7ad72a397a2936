"""What `hf-rifle-train` does with an error: a user's mistake ends in one line and a documented exit code, a bug in
a traceback (as pip, git and the `hf` CLI do).

The classification is explicit, by two tests that must both hold: the error is of a type hf_rifle raises on purpose
for a user to act on (`EXIT_CODES`), and hf_rifle raised it itself, with a `raise` statement of its own code
(`raised_by_hf_rifle`). Every such raise in hf_rifle already names the problem and the fix (the house rule), while the
same types raised inside torch, transformers or datasets, or by a faulty line of ours (`int("x")`, a bad unpacking)
are unexplained, so they keep their traceback. `HF_RIFLE_DEBUG=1` shows the traceback of user errors too.
"""

import errno
import linecache
import os
import sys
from contextlib import contextmanager
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # hf_rifle/
DEBUG_VARIABLE = "HF_RIFLE_DEBUG"
# The exit codes, most specific type first (FileNotFoundError and PermissionError are OSErrors). 1 is Python's own, for
# a traceback (a bug); argparse exits with 2 for a bad flag, as our bad settings do; 143 is a preempted run's.
BAD_SETTINGS, DATA_OR_HUB, DISK_FULL = 2, 3, 4
EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (ValueError, BAD_SETTINGS),  # a flag, a config file, a refused resume, data that does not fit the flags
    (ImportError, BAD_SETTINGS),  # an extra the run needs is not installed
    (FileNotFoundError, DATA_OR_HUB),  # a dataset, model, folder or checkpoint that is not there
    (ConnectionError, DATA_OR_HUB),  # a Hub that cannot be reached, or that is busy
    (PermissionError, DATA_OR_HUB),  # a Hub that refuses the token
    (OSError, DATA_OR_HUB),  # an unreadable image or model file; a full disk is DISK_FULL (`exit_code`)
)
EXIT_CODES_HELP = (
    "Exit codes: 0 done; 1 a bug (with a traceback: please report it); 2 bad arguments or settings (a flag, a config "
    "file, a refused resume, a missing extra); 3 data, model or Hub not found, unreadable, unreachable or refusing "
    f"the token; 4 a full disk; 143 preempted (SIGTERM/SIGUSR1; the same command resumes). {DEBUG_VARIABLE}=1 shows "
    "the traceback of every error."
)


def raised_by_hf_rifle(error: BaseException) -> bool:
    """Whether `error` was raised by a `raise` statement in hf_rifle's own code: the innermost frame of its traceback
    is in the package, at a line that raises (not at a call into a library, nor at a faulty expression of ours)."""
    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    filename = tb.tb_frame.f_code.co_filename
    if not Path(filename).resolve().is_relative_to(PACKAGE_DIR):
        return False
    return linecache.getline(filename, tb.tb_lineno).lstrip().startswith("raise")


def exit_code(error: BaseException) -> int | None:
    """The documented exit code of a user error, or None for anything else (a bug: it keeps its traceback)."""
    if not raised_by_hf_rifle(error):
        return None
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return DISK_FULL
    return next((code for kind, code in EXIT_CODES if isinstance(error, kind)), None)


def message(error: BaseException) -> str:
    """The error's own words, without the `[Errno N]` an OSError built with an errno puts before them."""
    if isinstance(error, OSError) and error.errno is not None and error.strerror:
        return error.strerror
    return str(error)


@contextmanager
def user_errors_reported(program: str):
    """Around a command's `main()`: a user error prints `<program>: error: <message>` to stderr and exits with its
    code (`exit_code`); anything else, and every error under `HF_RIFLE_DEBUG=1`, propagates with its traceback."""
    try:
        yield
    except (ValueError, ImportError, OSError) as error:  # the types of EXIT_CODES; `exit_code` tells ours apart
        code = exit_code(error)
        if code is None or os.environ.get(DEBUG_VARIABLE, "") not in ("", "0"):
            raise
        print(f"{program}: error: {message(error)}", file=sys.stderr)
        sys.exit(code)
