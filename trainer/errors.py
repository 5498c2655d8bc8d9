"""The trainer's user-facing error type: its message is one line naming the problem and the fix."""


class TrainerError(Exception):
    """A run, evaluation or prediction cannot proceed as asked."""


class RunInterrupted(Exception):
    """Training stopped on SIGINT or SIGTERM after writing a resumable checkpoint."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def first_line(exc: BaseException, limit: int = 160) -> str:
    """The first line of `exc`'s message, at most `limit` characters, for a one-line error that quotes it."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else "no message"
