"""One error root for everything a user can get wrong, translated once at each boundary.

Every error revpers raises on purpose is a :class:`RevpersError` of one ``kind``. The command line
maps a kind to an exit code (``revpers.cli.errors``), the Triton model maps it to a gRPC status
(``revpers.serving.bls``); neither lists exception classes one by one. Anything that is not a
RevpersError is a bug: the CLI and the server log its traceback and tell the user only that an
internal error happened (with a request id on the server).
"""

from __future__ import annotations


class RevpersError(Exception):
    """Base of every deliberate revpers error; ``kind`` says whose mistake it is."""

    kind = "internal"


class InputError(RevpersError, ValueError):
    """An input image or file is missing, unreadable, too large or not an image."""

    kind = "input"


class ParameterError(RevpersError, ValueError):
    """A request parameter is missing, of the wrong type or out of range (message says which)."""

    kind = "parameter"


class BundleError(RevpersError, ValueError):
    """The model bundle is missing files, or a file is damaged or of the wrong kind."""

    kind = "bundle"


class FaceModelError(RevpersError, RuntimeError):
    """The face models (detector, landmarks, recognizers) cannot be loaded or run."""

    kind = "face_model"


class LimitError(ParameterError):
    """A request exceeds a configured limit (bytes, pixels, faces, steps, retries)."""

    kind = "limit"


class Cancelled(RevpersError):
    """The request was cancelled by its client or its deadline passed; the work stopped."""

    kind = "cancelled"


class DependencyError(RevpersError):
    """An optional dependency a command needs is not installed (TensorRT, ModelOpt, Ray, ...)."""

    kind = "dependency"


class Unavailable(RevpersError):
    """The server takes no new work now (it is draining before a stop); try another or later."""

    kind = "unavailable"


KINDS = ("input", "parameter", "limit", "bundle", "face_model", "cancelled", "dependency", "unavailable", "internal")
