"""gRPC client for the revpers Triton service (tritonclient).

>>> from client import RevpersClient
>>> image_bytes, report = RevpersClient("localhost:8001").anonymize(open("photo.jpg", "rb").read(), steps=100)
"""

from .core import RevpersClient, ServiceError

__all__ = ["RevpersClient", "ServiceError"]
