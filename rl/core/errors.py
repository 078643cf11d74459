"""User-facing errors. Each carries a one-line cause that names the bad key, row or function.

The launcher prints `error: <message>` for these instead of a stack trace.
"""


class UserError(Exception):
    """An error caused by the user's input (config, data, plug-in code), not by a bug."""


class ConfigError(UserError):
    """A config key or value is invalid; the message names the key."""


class DataError(UserError):
    """A data source or row is invalid; the message names the source, row and column."""


class RewardError(UserError):
    """A reward function failed or returned bad values; the message names the function."""


class RewardCallError(RewardError):
    """A reward function or head raised or timed out (not: returned bad values); the message
    names it and the rows. `reward.on_error=zero` turns these into zero rewards."""


def one_line(err: BaseException) -> str:
    """`Type: first line of the message`, for one-line error reports."""
    lines = str(err).strip().splitlines()
    msg = lines[0] if lines else ""
    return f"{type(err).__name__}: {msg}" if msg else type(err).__name__


class HaltError(Exception):
    """The run stopped itself on purpose for a fault it names (non-finite numbers step after
    step, a rank that stopped answering). The launcher prints `error: <message>` and exits 3,
    without a traceback."""
