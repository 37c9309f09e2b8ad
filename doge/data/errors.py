"""The one exception type of the data tools, so callers can tell bad data from bugs."""
import errno
import sys


class DataError(ValueError):
    """Bad input or prepared data. The message names the file (and field) and the fix."""


def from_os_error(exc: OSError, where) -> DataError:
    """An OSError while writing `where` (a full disk, a read-only or vanished location) as a
    one-line DataError naming the path, the system's reason and what to do about it."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free space, then rerun the same command"
    elif exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        fix = "choose an --output in a writable location"
    else:
        fix = "check the path and the disk, then rerun the same command"
    return DataError(f"{exc.filename or where}: {exc.strerror or exc}; {fix}")


def run_tool(work) -> int:
    """A data tool's exit: `wrote PATH` and 0 when `work()` returns the path it wrote, or one
    `error: ...` line (no traceback) and 2 when it raises DataError."""
    try:
        out = work()
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0
