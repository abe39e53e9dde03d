"""The milter client's errors: one root, one class per way a dialogue fails."""

from __future__ import annotations

from milters.core.errors import MiltersError


class MilterClientError(MiltersError):
    """the milter dialogue failed"""


class ProtocolError(MilterClientError):
    """the milter broke the milter protocol"""


class MilterTimeout(MilterClientError):
    """the milter did not answer in time"""


class MilterClosed(MilterClientError):
    """the milter closed the connection in the middle of the dialogue"""


class MilterUnavailable(MilterClientError):
    """cannot connect to the milter"""
