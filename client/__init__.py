"""gRPC client for the revpers Triton service (tritonclient; no torch needed).

>>> from client import RevpersClient, BatchClient, Job
>>> image_bytes, report = RevpersClient("localhost:8001").anonymize(open("photo.jpg", "rb").read(), steps=100)
>>> with BatchClient(["gpu1:8001", "gpu2:8001"], concurrency=16) as bc:
...     for res in bc.map(Job(p, open(p, "rb").read, {"format": "jpeg"}) for p in paths):
...         print(res.key, res.ok, res.error)

The ``revpers-client`` command (``client.cli``) runs whole collections with progress, resume,
reports, a run summary and an audit manifest.
"""

from .attributes import attribute_prompt
from .batch import BatchClient, BatchResult, Job, RetryPolicy
from .core import RevpersClient, ServiceError

__all__ = ["RevpersClient", "ServiceError", "BatchClient", "BatchResult", "Job", "RetryPolicy",
           "attribute_prompt"]
