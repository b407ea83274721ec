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
reports, a run summary, an audit manifest and a review list. Its parts: ``collection`` (inputs ->
work items), ``engine`` (``run_collection(items, process, options)``, reusable by any runner),
``ledger`` (per-image records, resume, summary, manifest, review list), ``report`` (progress and
printed summary), ``remote`` (the BatchClient-based ``process``), ``cli`` (argparse).
"""

__version__ = "0.1.0"  # keep equal to client/pyproject.toml (a test compares)

from .attributes import attribute_prompt  # noqa: E402
from .batch import BatchClient, BatchResult, Job, RetryPolicy, ServersDown  # noqa: E402
from .core import RevpersClient, Security, ServiceError  # noqa: E402

__all__ = [
    "RevpersClient",
    "ServiceError",
    "Security",
    "BatchClient",
    "BatchResult",
    "Job",
    "RetryPolicy",
    "ServersDown",
    "attribute_prompt",
    "__version__",
]
