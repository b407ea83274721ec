"""gRPC client for the revpers Triton service (tritonclient; no torch needed).

>>> from pathlib import Path
>>> from revpers_client import RevpersClient, BatchClient, Job
>>> image_bytes, report = RevpersClient("localhost:8001").anonymize(Path("photo.jpg").read_bytes(), steps=100)
>>> if report["verdict"] == "rejected":  # the identity gate released no image (image_bytes == b"")
...     print(report["rejected_reason"])
>>> with BatchClient(["gpu1:8001", "gpu2:8001"], concurrency=16) as bc:
...     for res in bc.map(Job(p, Path(p).read_bytes, {"format": "jpeg"}) for p in paths):
...         print(res.key, res.ok, res.rejected, res.error)

The ``revpers-client`` command (``revpers_client.cli``) runs whole collections with progress, resume,
reports, a run summary and an audit manifest.
"""

from .attributes import attribute_prompt
from .batch import BatchClient, BatchResult, Job, RetryPolicy
from .core import RevpersClient, ServiceError

__all__ = ["RevpersClient", "ServiceError", "BatchClient", "BatchResult", "Job", "RetryPolicy",
           "attribute_prompt"]
