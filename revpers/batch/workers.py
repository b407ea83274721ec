"""The Ray Data actors: each takes a batch of input files (``path``, ``bytes``) and gives back one
image row per file (``tables.IMAGE_SCHEMA``), having written the output image and its report
beside it under OUTPUT.

Two engines do the work, behind the same request options (``RequestOptions`` keys):

- :class:`ModelEngine`: the in-process :class:`~revpers.service.anonymizer.Anonymizer`, loaded once
  per actor (the actor's ``num_gpus`` picks its GPU; on the CPU torch gets the actor's CPUs as threads);
- :class:`ServerEngine`: a :class:`revpers_client.BatchClient` to a Triton fleet (its retry policy
  resends a request that failed with UNAVAILABLE or DEADLINE_EXCEEDED).

A file that fails (not an image, refused by the server) becomes a ``failed`` row and the run goes on;
the run-wide :class:`~revpers.batch.run.Budget` actor stops it once ``--max-failures`` is exceeded
or ``--limit`` images were started (the rest come back ``not_done`` and are not written, so a
re-run does them). Outputs are written under a temporary name and renamed, so a file is whole or
absent; an actor that dies mid-image is restarted by Ray and its batch redone, which writes the same
names again.
"""

from __future__ import annotations

import json
import os
import posixpath
import socket
import time

import pyarrow as pa
import pyarrow.fs as pafs
import ray

from revpers.batch import tables
from revpers.batch.inputs import locate, output_name, relative
from revpers.core.errors import RevpersError
from revpers.service.anonymizer import Anonymizer
from revpers.service.request import RequestOptions, anonymize_bytes
from revpers_client import BatchClient, Job, RetryPolicy
from revpers_client.core import sha256_hex


class ImageFailed(Exception):
    """This image cannot be done (the message says why); ``requests``: requests it took."""

    def __init__(self, message: str, requests: int = 1):
        super().__init__(message)
        self.requests = requests


class ModelEngine:
    def __init__(self, models: str, device: str | None, inversion_batch: int, threads: int):
        import torch

        if device in (None, "cpu") or not torch.cuda.is_available():
            torch.set_num_threads(max(1, threads))  # results depend on the thread count: keep it fixed
        self.anonymizer = Anonymizer(models, device=device, inversion_batch=inversion_batch)

    def anonymize(self, data: bytes, request: dict, name: str) -> tuple[bytes, dict, int]:
        try:
            response = anonymize_bytes(self.anonymizer, data, RequestOptions.from_mapping(request), name=name)
        except RevpersError as exc:  # input, parameter and limit errors: this image only
            raise ImageFailed(str(exc)) from None
        return response.image, response.report.to_dict(), 1

    def close(self) -> None:
        pass


class ServerEngine:
    def __init__(self, urls: list[str], timeout: float, max_attempts: int):
        self.client = BatchClient(urls, concurrency=1, timeout=timeout, retry=RetryPolicy(max_attempts=max_attempts))

    def anonymize(self, data: bytes, request: dict, name: str) -> tuple[bytes, dict, int]:
        res = self.client.run(Job(name, data, request))
        if res.error is not None:
            raise ImageFailed(f"{res.error.code}: {res.error.message}", res.attempts)
        return res.image, res.report, res.attempts

    def close(self) -> None:
        self.client.close()


def write_atomic(fs, path: str, data: bytes) -> None:
    """``.<name>.part`` beside ``path``, then a move: ``path`` is whole or absent (a rename locally)."""
    folder, name = posixpath.split(path)
    fs.create_dir(folder, recursive=True)
    tmp = posixpath.join(folder, f".{name}.part")
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, path)


def delete_if_present(fs, path: str) -> None:
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass


class ImageWorker:
    """The callable class given to ``Dataset.map_batches`` (one instance per actor)."""

    def __init__(self, setup: dict, budget, exit_on: tuple[str, ...] = ()):
        """``setup``: see ``run.worker_setup``. ``exit_on``: relative input paths at which the actor's
        process exits once per run (a fault injected by tests: Ray restarts the actor and redoes
        its batch); a marker file under the run's state folder makes each fire once."""
        self.setup, self.budget, self.exit_on = setup, budget, set(exit_on)
        out = locate(setup["output"])
        self.fs, self.out_root = out.fs, out.path
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        if setup["mode"] == "models":
            self.engine = ModelEngine(setup["models"], setup["device"], setup["inversion_batch"], setup["threads"])
        else:
            self.engine = ServerEngine(setup["urls"], setup["timeout"], setup["max_attempts"])

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = [self.one(path, data) for path, data in zip(batch["path"].to_pylist(), batch["bytes"].to_pylist())]
        return pa.Table.from_pylist(rows, schema=tables.IMAGE_SCHEMA)

    def _inject_fault(self, rel: str) -> None:
        if rel not in self.exit_on:
            return
        marker = posixpath.join(self.out_root, self.setup["state"], "faults", tables.sha256_text(rel))
        if self.fs.get_file_info(marker).type == pafs.FileType.NotFound:
            write_atomic(self.fs, marker, rel.encode())
            os._exit(1)

    def one(self, path: str, data: bytes) -> dict:
        s = self.setup
        rel = relative(path, s["root"])
        out_rel, fmt = output_name(rel, s["format"])
        row = {name: None for name in tables.IMAGE_SCHEMA.names}
        row.update(
            path=path,
            rel=rel,
            params_sha256=s["params_sha256"],
            bundle_sha256=s["bundle_sha256"],
            run_id=s["run_id"],
            worker=self.worker,
            faces=[],
            requests=0,
        )
        stop = ray.get(self.budget.admit.remote())
        if stop is not None:
            row.update(status=tables.NOT_DONE, reason=stop)
            return row
        self._inject_fault(rel)
        t0 = time.perf_counter()
        row["input_sha256"] = sha256_hex(data)
        out_path = posixpath.join(self.out_root, out_rel)
        try:
            image, report, row["requests"] = self.engine.anonymize(data, {**s["request"], "format": fmt}, rel)
        except ImageFailed as exc:
            row.update(
                status=tables.FAILED,
                reason=str(exc),
                requests=exc.requests,
                key=tables.row_key(row["input_sha256"], s["params_sha256"], s["bundle_sha256"]),
            )
            self.budget.failed.remote()
            row["seconds"] = time.perf_counter() - t0
            return row
        report["input"], report["output"] = rel, out_rel if image else None
        hashes = tables.model_hashes(report)
        row.update(hashes, bundle_sha256=hashes["bundle_sha256"] or s["bundle_sha256"])
        row["key"] = tables.row_key(row["input_sha256"], s["params_sha256"], row["bundle_sha256"])
        row["status"], row["reason"] = tables.image_status(report, bool(image))
        row.update(verdict=str(report.get("verdict")), smoke=bool(report.get("smoke")), faces=tables.face_rows(report))
        if image:
            write_atomic(self.fs, out_path, image)
            row.update(output=out_rel, output_sha256=sha256_hex(image))
        else:  # withheld: an output an earlier run left (e.g. other options) must not stay
            delete_if_present(self.fs, out_path)
        write_atomic(self.fs, out_path + ".json", (json.dumps(report, indent=2) + "\n").encode())
        if row["status"] == tables.FAILED:  # withheld for want of a face (on_no_face=fail)
            self.budget.failed.remote()
        row["seconds"] = time.perf_counter() - t0
        return row
