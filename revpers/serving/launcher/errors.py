"""The launcher's errors, under the one error root: a server that failed is ``internal``; a
problem with what was asked, found before anything is launched, is ``input``."""

from __future__ import annotations

from pathlib import Path

from revpers.core.errors import RevpersError


class TritonServerError(RevpersError, RuntimeError):
    """The server could not be found, prepared, started, or it died.

    ``summary`` is the short reason; ``log_tail`` the last lines of the server log, if any
    (``str()`` gives both).
    """

    def __init__(self, summary: str, log_tail: str = "", log_path: Path | None = None):
        self.summary, self.log_tail, self.log_path = summary, log_tail, log_path
        text = summary
        if log_tail:
            text += f"\n--- last lines of {log_path or 'the server log'} ---\n{log_tail}"
        super().__init__(text)


class ServerUsageError(TritonServerError):
    """A problem with what was asked (paths, ports, keys, certificates), found before launching anything."""

    kind = "input"


class TritonNotFoundError(ServerUsageError):
    """No usable tritonserver installation."""


class PortInUseError(ServerUsageError):
    """A port the server should listen on is taken."""
