"""Errors a user can fix. The CLI and the components print them as one line, no traceback."""


class InputError(Exception):
    """Bad input or settings: the message names the file or setting and the reason."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the last checkpoint."""


class TrackingUnavailable(RuntimeError):
    """The tracking server stayed unreachable; what could not be sent is kept on disk (the message says where)."""


class Preempted(RuntimeError):
    """The process was asked to stop (SIGTERM); the message names the checkpoint it wrote."""
