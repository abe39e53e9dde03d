"""The suite's one exception tree.

Each class's docstring is its default message; callers add the specifics
(file, key, header) in the message they raise with.
"""

from __future__ import annotations


class MiltersError(Exception):
    """milters error"""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (type(self).__doc__ or "").strip())


class ConfigError(MiltersError):
    """invalid configuration"""

    def __init__(self, message: str | None = None, problems: list[str] | None = None) -> None:
        self.problems = list(problems or ([message] if message else []))
        super().__init__(message or "\n".join(self.problems) or None)


class TempError(MiltersError):
    """temporary failure (DNS timeout, service down); try again later"""


class PermError(MiltersError):
    """permanent error (malformed record or input)"""


class NeedsThread(BaseException):
    """a lookup would wait on the network in the event loop's thread

    Raised by the resolver in the Python core's event loop (core/eventloop.py)
    when its cache cannot answer; the loop hands the connection to a thread,
    which runs the step again. A BaseException, so that no backstop of a
    filter or the pipeline (`except Exception`) turns it into a verdict.
    """
