"""The errors a user can act on, each ending a command with one line: here, with no import beyond the standard library,
so that catching them (cli.user_errors) loads no torch."""

from __future__ import annotations


def one_line(text: str) -> str:
    """Control characters escaped, so a message is one line on a terminal however odd the input."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class ConfigError(Exception):
    """A mistake in a sweep file: where it is and what is allowed instead. Always one line."""

    def __init__(self, source: str, key: str, message: str):
        source, key, message = one_line(str(source)), one_line(str(key)), one_line(message)
        super().__init__(f"{source}: {key}: {message}" if key else f"{source}: {message}")
        self.source, self.key, self.message = source, key, message


class DataError(Exception):
    """A dataset that is missing or not in a format depthlab reads."""


class DeviceError(Exception):
    """A device was asked for that this machine does not have."""


class SweepConflict(Exception):
    """Finished results exist for cells whose configuration has changed, or another sweep holds the folder."""


class ReportError(Exception):
    """The results folder holds nothing to report on."""


class StorageError(Exception):
    """The results folder cannot be written (disk full, read-only, no permission): every cell would fail the same way."""


USER_ERRORS = (ConfigError, DataError, DeviceError, SweepConflict, ReportError)  # the user's input: exit code 2
