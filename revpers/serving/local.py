"""The `onnxruntime` repository target's computation in one process, without Triton.

``OnnxRuntimeComponents`` runs the exported ONNX files with the runner the served component models
use (``OnnxRuntimeRunner``: same session options, same intra-op thread count, inputs copied into
aligned memory), sliced to the same max batches and fed exactly as the BLS feeds the served models
(``SlicedComponents``). ``onnxruntime_anonymizer`` assembles it as the BLS does (ArcFace embeddings
from the `arcface` component, detection and the gate in process), so for one request at a time its
images are the server's, bit for bit, on any machine: the reference the server tests compare with.
"""

from __future__ import annotations

from pathlib import Path

import torch

from revpers.models.artifacts import load_artifacts
from revpers.models.bundle import Bundle, load_bundle
from revpers.models.components import ComponentSpec
from revpers.service.anonymizer import Anonymizer
from revpers.serving.bls import SlicedComponents, anonymizer_over
from revpers.serving.components import OnnxRuntimeRunner


class OnnxRuntimeComponents(SlicedComponents):
    def __init__(self, artifacts: str | Path, bundle: Bundle, threads: int = 0):
        """``artifacts``: what `revpers export` wrote; ``threads``: ONNX Runtime intra-op threads per
        session (the served models read REVPERS_ORT_THREADS; 0 is ONNX Runtime's default)."""
        root = Path(artifacts).resolve()
        record = load_artifacts(root)
        specs = {name: ComponentSpec.from_dict(c["spec"]) for name, c in record["components"].items()}
        self.inversion_batch = int(record["inversion_batch"])
        super().__init__(bundle, {n: s.max_batch for n, s in specs.items()}, "cpu", self.inversion_batch)
        # per model: (input name, is a per-sample scalar) in the served config's order, as execute() reads them
        self.inputs = {n: [(t.name, not t.shape) for t in s.inputs] for n, s in specs.items()}
        self.outputs = {n: [t.name for t in s.outputs] for n, s in specs.items()}
        self.runners = {
            n: OnnxRuntimeRunner(
                root / record["components"][n]["onnx"],
                [i for i, _ in self.inputs[n]],
                self.outputs[n],
                "cpu",
                threads=threads,
            )
            for n in specs
        }
        self.device = "onnxruntime (in process)"

    def call(self, model: str, inputs: dict[str, torch.Tensor], output: str) -> torch.Tensor:
        # what components.execute hands the runner for one request: scalars [B, 1] -> (B,)
        feeds = [
            inputs[name].reshape(inputs[name].shape[0]) if scalar else inputs[name]
            for name, scalar in self.inputs[model]
        ]
        return self.runners[model](feeds)[self.outputs[model].index(output)]


def onnxruntime_anonymizer(artifacts: str | Path, bundle: Bundle | str | Path, threads: int = 0) -> Anonymizer:
    """An Anonymizer that computes what the `onnxruntime` target serves, in this process."""
    bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    components = OnnxRuntimeComponents(artifacts, bundle, threads)
    return anonymizer_over(bundle, components, components.inversion_batch)
