"""Runtimes for the served component models (`unet`, `vae_encoder`, `vae_decoder`, `arcface`) when
Triton runs them as Python-backend models: the `onnxruntime` and `pytorch` repository targets.
(The `tensorrt` target serves engines with Triton's own TensorRT backend instead.)

``execute(pb_utils, requests, inputs, outputs, run)`` is the whole Triton side: requests merged by
the dynamic batcher are concatenated along the batch axis (tensors taken by DLPack, so GPU inputs
stay on the GPU), run in one call, and split back into one response per request.

``OnnxRuntimeRunner`` runs the exported ONNX file (CUDA execution provider on a GPU instance when
onnxruntime-gpu is installed, else CPU); it hands ONNX Runtime host arrays, so on a GPU its inputs
and outputs go through host memory (it is the CPU/CI target; on GPUs use tensorrt or pytorch).
``TorchRunner`` runs the bundle's own PyTorch module for
the component: fp16 UNet and fp32 VAE on CUDA (PyTorch SDPA attention), fp32 on the CPU, with
optional ``torch.compile``. It is how the GPU path is measured on a machine without TensorRT.
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch.utils.dlpack import from_dlpack

from revpers.models.bundle import load_bundle
from revpers.models.components import TensorSpec, module_dtype
from revpers.models.torch_models import build_module

LOG = logging.getLogger("revpers.serving")

Run = Callable[[list[torch.Tensor]], list[torch.Tensor]]


def execute(
    pb_utils, requests, inputs: Sequence[tuple[str, bool]], outputs: Sequence[str], run: Run, device: str = "cpu"
) -> list:
    """inputs: (name, is_per_sample_scalar) in the component's input order; ``device``: this
    instance's (where merged inputs that arrived on different devices are gathered)."""
    feeds, sizes = [], []
    for name, scalar in inputs:
        parts = [from_dlpack(pb_utils.get_input_tensor_by_name(r, name).to_dlpack()) for r in requests]
        parts = [p.reshape(p.shape[0]) if scalar else p for p in parts]
        if len({p.device for p in parts}) > 1:  # GPU inputs stay where their sender had them
            parts = [p.to(device) for p in parts]
        sizes = [p.shape[0] for p in parts]
        feeds.append(parts[0] if len(parts) == 1 else torch.cat(parts, dim=0))
    results = run(feeds)
    synchronize(results)
    responses, start = [], 0
    for n in sizes:
        tensors = [
            pb_utils.Tensor.from_dlpack(name, out[start : start + n].contiguous())
            for name, out in zip(outputs, results)
        ]
        responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        start += n
    return responses


def synchronize(tensors: Sequence[torch.Tensor]) -> None:
    """Wait for the kernels that write CUDA ``tensors`` before Triton reads their memory (it copies
    on its own stream, in another process for BLS results)."""
    for device in {t.device for t in tensors if t.is_cuda}:
        torch.cuda.current_stream(device).synchronize()


def instance_device(args: dict) -> str:
    """The torch device of a Triton model instance (``cuda:N`` for KIND_GPU where CUDA works), made
    this thread's current CUDA device. A GPU instance without CUDA in torch runs on the CPU and says so."""
    if args.get("model_instance_kind") == "GPU":
        if torch.cuda.is_available():
            device = f"cuda:{args.get('model_instance_device_id', 0)}"
            use_device(device)
            return device
        LOG.warning(
            "model %r instance is KIND_GPU but torch %s has no CUDA here: running on the CPU",
            args.get("model_name"),
            torch.__version__,
        )
    return "cpu"


def use_device(device: str) -> None:
    """Make ``device`` the calling thread's current CUDA device (kernels, allocations and the copies
    Triton makes then share its context); no-op for the CPU."""
    if str(device).startswith("cuda"):
        torch.cuda.set_device(torch.device(device))


def example_feeds(config: dict, batch: int) -> list[torch.Tensor]:
    """Random inputs of ``batch`` samples for the component a Triton config declares."""
    return [TensorSpec.from_triton(t).example(batch) for t in config["input"]]


class OnnxRuntimeRunner:
    def __init__(
        self, path: Path, input_names: Sequence[str], output_names: Sequence[str], device: str = "cpu", threads: int = 0
    ):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        # no busy-waiting between calls: the BLS, the detector and other component models share the CPU
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": torch.device(device).index or 0}))
        self.session = ort.InferenceSession(str(path), opts, providers=providers)
        self.input_names, self.output_names = list(input_names), list(output_names)

    def __call__(self, feeds: list[torch.Tensor]) -> list[torch.Tensor]:
        # Fresh copies in torch's own (64-byte aligned) host memory, never the request's buffer, as
        # TorchRunner does: a tensor Triton hands over sits in shared memory at whatever offset the
        # tensors before it left, and the in-process twin of this runner must see the same operands.
        arrays = {
            n: t.cpu().clone(memory_format=torch.contiguous_format).numpy() for n, t in zip(self.input_names, feeds)
        }
        return [torch.from_numpy(a) for a in self.session.run(self.output_names, arrays)]


class TorchRunner:
    """The bundle's PyTorch module for one component; forward takes the spec's inputs in order."""

    def __init__(self, bundle_path: str | Path, component: str, device: str = "cpu", compile: bool = False):

        self.module = build_module(load_bundle(bundle_path), component, device)
        gc.collect()
        dtype = module_dtype(component, device)
        self.device, self.dtype = device, dtype
        self.forward = torch.compile(self.module) if compile else self.module

    def warm_up(self, config: dict) -> list[int]:
        """Run the module once at each batch size the config's dynamic batcher prefers (else 1 and
        the max), so that first-call allocations and, with ``torch.compile``, compilation (a new
        batch size recompiles once with a dynamic batch axis) happen while the model loads, not in
        the first requests. Returns the batch sizes run."""
        batches = config.get("dynamic_batching", {}).get("preferred_batch_size") or [1, config["max_batch_size"]]
        for batch in batches:
            self(example_feeds(config, int(batch)))
        if self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)
        return [int(b) for b in batches]

    @torch.inference_mode()
    def __call__(self, feeds: list[torch.Tensor]) -> list[torch.Tensor]:
        # Always a fresh copy in torch's own (aligned) memory, never the request's buffer: on the CPU,
        # MKL and oneDNN pick their kernels by the alignment of the operands, and a tensor Triton hands
        # over sits in shared memory at whatever offset the tensors before it left. Served in place,
        # a batch-2 UNet call came out up to 1.2e-7 off the same call in process (an `identity` 4 or
        # 8 bytes off a 16-byte boundary, measured), which w = -10 guidance grows to 2 grey levels.
        # Copied, the served modules compute exactly what the in-process ones do (same inputs, same
        # torch, same thread count).
        args = [t.to(self.device, self.dtype if t.is_floating_point() else t.dtype, copy=True) for t in feeds]
        out = self.forward(*args)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return [o.float() for o in outs]
