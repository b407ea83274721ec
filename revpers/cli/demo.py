"""`make demo`: smoke bundle -> ONNX export -> Triton repository (onnxruntime) -> tritonserver ->
gRPC requests with real photos that ship in installed packages -> output images + JSON reports.

Smoke weights are tiny random models: the demo proves the whole served path runs end to end, it
does not make believable faces. Point ``--bundle`` at a real bundle for real results.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from revpers.cli.logs import quiet_libraries
from revpers.export.onnx_export import export_bundle
from revpers.faces.samples import demo_photos
from revpers.models.bundle import MANIFEST, load_bundle
from revpers.models.smoke import write_smoke_bundle
from revpers.serving.launcher import TritonServer, free_ports
from revpers.serving.repository import build_repository
from revpers_client import RevpersClient


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m revpers.cli.demo", description=__doc__)
    parser.add_argument("--bundle", type=Path, default=Path("build/demo-bundle"))
    parser.add_argument("--out", type=Path, default=Path("demo-out"))
    parser.add_argument("--steps", type=int, default=100)
    args = parser.parse_args(argv)

    quiet_libraries()

    work = args.bundle.parent
    if not (args.bundle / MANIFEST).is_file():
        t0 = time.perf_counter()
        write_smoke_bundle(args.bundle, seed=0, overwrite=True)
        print(f"[1/5] built smoke bundle {args.bundle} in {time.perf_counter() - t0:.1f} s")
    else:
        print(f"[1/5] using bundle {args.bundle}")
    bundle = load_bundle(args.bundle)
    artifacts, repo = work / "demo-artifacts", work / "demo-repository"
    t0 = time.perf_counter()
    export_bundle(bundle, artifacts, log=lambda *_: None)
    print(
        f"[2/5] exported UNet (FaceID), VAE encoder/decoder, ArcFace to ONNX in {artifacts} "
        f"({time.perf_counter() - t0:.1f} s)"
    )
    build_repository(artifacts, repo, "onnxruntime", bundle=args.bundle, force=True)
    print(f"[3/5] Triton model repository (onnxruntime target) in {repo}")
    grpc, http, metrics = free_ports(3)
    args.out.mkdir(parents=True, exist_ok=True)
    with TritonServer(repo, grpc_port=grpc, http_port=http, metrics_port=metrics) as server:
        print(
            f"[4/5] tritonserver ready in {server.startup_seconds:.1f} s: gRPC {server.urls.grpc}, "
            f"HTTP {server.urls.http}, metrics {server.urls.metrics}"
        )
        client = RevpersClient(server.urls.grpc)
        for photo in demo_photos():
            t0 = time.perf_counter()
            image, report = client.anonymize(photo.read_bytes(), steps=args.steps)
            out = args.out / (photo.stem + ".png")
            out.unlink(missing_ok=True)  # never leave an earlier run's image beside this run's report
            out.with_name(out.name + ".json").write_text(json.dumps(report, indent=2) + "\n")
            faces = report["faces"]
            if report.get("verdict") == "rejected":  # the gate released no image (image == b"")
                print(
                    f"[5/5] {photo.name}: REJECTED by the identity gate ({report.get('rejected_reason')}); "
                    f"no image written, report -> {out.name}.json"
                )
                continue
            out.write_bytes(image)
            done = sum(f["action"] == "anonymized" for f in faces)
            print(
                f"[5/5] {photo.name}: {len(faces)} face(s), {done} anonymized in one batch, "
                f"{time.perf_counter() - t0:.1f} s over gRPC -> {out} (+ .json report)"
            )
        client.close()
    print("server stopped.")
    if bundle.smoke:
        print(
            "NOTE: smoke weights (tiny random models) make noise, not faces; "
            "use a real bundle (README 'Model bundle') for real anonymization."
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
