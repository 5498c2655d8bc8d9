"""The trainer's user-facing error type: its message is one line naming the problem and the fix."""


class TrainerError(Exception):
    """A run, evaluation or prediction cannot proceed as asked."""


class RunInterrupted(Exception):
    """Training stopped on SIGINT or SIGTERM after writing a resumable checkpoint."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def first_line(exc: BaseException, limit: int = 160) -> str:
    """The first line of `exc`'s message for a one-line error that quotes it: at most `limit` characters, a cut
    made at a word and shown as "..." (never a sentence silently ending mid-word)."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    line = text.splitlines()[0]
    if len(line) <= limit:
        return line
    return line[: limit - 4].rsplit(" ", 1)[0].rstrip(" ,;:(") + " ..."
