"""Triton ``config.pbtxt`` generated from a ComponentSpec (and the BLS model's own config)."""

from __future__ import annotations

import json

from revpers.models.components import TRITON_DTYPES, ComponentSpec


def _tensor(t) -> str:
    dims = list(t.shape) or [1]
    text = f'  {{\n    name: "{t.name}"\n    data_type: {TRITON_DTYPES[t.dtype]}\n    dims: {dims}\n'
    if not t.shape:  # per-sample scalar: sent as (B, 1), presented to the model as (B,)
        text += "    reshape: { shape: [ ] }\n"
    return text + "  }"


def component_config(
    spec: ComponentSpec,
    backend: str,
    instances: int = 1,
    queue_delay_us: int = 2000,
    gpu: bool = False,
    parameters: dict[str, str] | None = None,
) -> str:
    """``backend``: "tensorrt" (an engine, Triton's TensorRT backend), "onnxruntime" or "pytorch" (the
    generic Python-backend component model; ``parameters`` become its config parameters)."""
    if backend == "tensorrt":
        head = f'name: "{spec.name}"\nplatform: "tensorrt_plan"\n'
    elif backend in ("onnxruntime", "pytorch"):
        head = f'name: "{spec.name}"\nbackend: "python"\n'
    else:
        raise ValueError(f"unknown backend {backend!r}; use tensorrt, onnxruntime or pytorch")
    preferred = ", ".join(str(b) for b in spec.preferred_batches if b <= spec.max_batch)
    text = head + f"max_batch_size: {spec.max_batch}\n"
    text += "input [\n" + ",\n".join(_tensor(t) for t in spec.inputs) + "\n]\n"
    text += "output [\n" + ",\n".join(_tensor(t) for t in spec.outputs) + "\n]\n"
    text += "dynamic_batching {\n"
    if preferred:
        text += f"  preferred_batch_size: [ {preferred} ]\n"
    text += f"  max_queue_delay_microseconds: {queue_delay_us}\n}}\n"
    kind = "KIND_GPU" if gpu or backend == "tensorrt" else "KIND_CPU"
    text += f"instance_group [ {{ count: {instances} kind: {kind} }} ]\n"
    if backend == "tensorrt":
        text += "optimization { cuda { graphs: true } }\n"
    for key, value in {"description": spec.description, **(parameters or {})}.items():
        text += f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}\n'
    return text


def bls_config(
    bundle_path: str,
    instances: int,
    inversion_batch: int,
    gpu: bool = False,
    threads: int = 8,
    queue_delay_us: int = 500,
    max_batch: dict[str, int] | None = None,
    limits: dict[str, str] | None = None,
) -> str:
    """The `revpers` BLS model. Its dynamic batcher hands each instance up to ``threads`` waiting
    requests per execute call, which it serves concurrently (see revpers.serving.bls). A request holds
    one image: IMAGE and PARAMS have shape [1, 1] (batch of one). ``max_batch``: each component's
    max batch, so the BLS splits its calls to what the served models accept. ``limits``: what one
    request may cost (``revpers.service.request.Limits.as_parameters()``), as config parameters."""
    kind = "KIND_GPU" if gpu else "KIND_CPU"
    extra = "".join(
        f'parameters {{ key: "{k}" value: {{ string_value: "{v}" }} }}\n' for k, v in (limits or {}).items()
    )
    batches = json.dumps(max_batch or {}).replace('"', '\\"')
    return (
        f'''name: "revpers"
backend: "python"
max_batch_size: {threads}
input [
  {{ name: "IMAGE" data_type: TYPE_STRING dims: [ 1 ] }},
  {{ name: "PARAMS" data_type: TYPE_STRING dims: [ 1 ] optional: true }}
]
output [
  {{ name: "IMAGE" data_type: TYPE_STRING dims: [ 1 ] }},
  {{ name: "REPORT" data_type: TYPE_STRING dims: [ 1 ] }}
]
dynamic_batching {{ max_queue_delay_microseconds: {queue_delay_us} }}
instance_group [ {{ count: {instances} kind: {kind} }} ]
parameters {{ key: "bundle" value: {{ string_value: "{bundle_path}" }} }}
parameters {{ key: "inversion_batch" value: {{ string_value: "{inversion_batch}" }} }}
parameters {{ key: "max_batch" value: {{ string_value: "{batches}" }} }}
parameters {{ key: "threads" value: {{ string_value: "{threads}" }} }}
parameters {{ key: "FORCE_CPU_ONLY_INPUT_TENSORS" value: {{ string_value: "{"no" if gpu else "yes"}" }} }}
'''
        + extra
    )
