"""The trainer's user-facing error type: its message is one line naming the problem and the fix."""


class TrainerError(Exception):
    """A run, evaluation or prediction cannot proceed as asked."""


class RunInterrupted(Exception):
    """Training stopped on SIGINT or SIGTERM after writing a resumable checkpoint."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code
