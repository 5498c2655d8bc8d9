"""The trainer's user-facing error type: its message is one line naming the problem and the fix."""


class TrainerError(Exception):
    """A run, evaluation or prediction cannot proceed as asked."""
