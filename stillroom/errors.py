"""Errors the CLI prints as one line, without a traceback.

UserError: what the user must fix (file, key, value, model, a full disk); exit code 2.
Stopped: the run stopped on request (Ctrl-C, SIGTERM) after saving a checkpoint; exit 130 / 143.
"""


class UserError(ValueError):
    """Bad input from the user (file, key, value, model). Its message says what to fix. A
    ValueError, so library callers catch it as the ordinary exception it is."""


class Terminated(KeyboardInterrupt):
    """SIGTERM outside the training loop (which stops at a step boundary instead): raised like
    Ctrl-C's KeyboardInterrupt, so everything that cleans up on an interrupt does so; exit 143."""


def on_sigterm(signum, frame):
    raise Terminated


class Stopped(Exception):
    """A run that stopped cleanly on a signal; `code` is the shell's 128 + signal number."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def write_failure(e: BaseException, where) -> str:
    """What went wrong, in a few words, when writing under `where` raised `e`."""
    return ("no space left on the device" if disk_full(e, where)
            else f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}")


def disk_full(e: BaseException, where) -> bool:
    """Was `e`, raised while writing under `where`, a full disk? Writers say so in their own ways
    (OSError ENOSPC; torch.save: RuntimeError 'iostream error'; safetensors: its own error), so
    the file system is asked too, before the partial files are removed."""
    import errno
    import shutil

    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return True
    try:
        return shutil.disk_usage(where).free < 1 << 20
    except OSError:
        return False
