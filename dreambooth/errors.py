"""Errors a user can fix. The CLI and the components print them as one line, no traceback."""


class InputError(Exception):
    """Bad input or settings: the message names the file or setting and the reason."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the last checkpoint."""
