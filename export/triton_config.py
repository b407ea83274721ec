"""Triton ``config.pbtxt`` generated from a ComponentSpec (and the BLS model's own config)."""

from __future__ import annotations

from .components import TRITON_DTYPES, ComponentSpec


def _tensor(t, kind: str) -> str:
    dims = list(t.shape) or [1]
    text = f'  {{\n    name: "{t.name}"\n    data_type: {TRITON_DTYPES[t.dtype]}\n    dims: {dims}\n'
    if not t.shape:  # per-sample scalar: sent as (B, 1), presented to the model as (B,)
        text += "    reshape: { shape: [ ] }\n"
    return text + "  }"


def component_config(spec: ComponentSpec, backend: str, instances: int = 1, queue_delay_us: int = 2000,
                     gpu: bool = False) -> str:
    if backend == "tensorrt":
        head = f'name: "{spec.name}"\nplatform: "tensorrt_plan"\n'
    elif backend == "onnxruntime":
        head = f'name: "{spec.name}"\nbackend: "python"\n'
    else:
        raise ValueError(f"unknown backend {backend!r}; use tensorrt or onnxruntime")
    preferred = ", ".join(str(b) for b in spec.preferred_batches if b <= spec.max_batch)
    text = head + f"max_batch_size: {spec.max_batch}\n"
    text += "input [\n" + ",\n".join(_tensor(t, "input") for t in spec.inputs) + "\n]\n"
    text += "output [\n" + ",\n".join(_tensor(t, "output") for t in spec.outputs) + "\n]\n"
    text += "dynamic_batching {\n"
    if preferred:
        text += f"  preferred_batch_size: [ {preferred} ]\n"
    text += f"  max_queue_delay_microseconds: {queue_delay_us}\n}}\n"
    kind = "KIND_GPU" if gpu or backend == "tensorrt" else "KIND_CPU"
    text += f"instance_group [ {{ count: {instances} kind: {kind} }} ]\n"
    if backend == "tensorrt":
        text += "optimization { cuda { graphs: true } }\n"
    text += f'parameters {{ key: "description" value: {{ string_value: "{spec.description}" }} }}\n'
    return text


def bls_config(bundle_path: str, instances: int, inversion_batch: int, gpu: bool = False) -> str:
    kind = "KIND_GPU" if gpu else "KIND_CPU"
    return f'''name: "revpers"
backend: "python"
max_batch_size: 0
input [
  {{ name: "IMAGE" data_type: TYPE_STRING dims: [ 1 ] }},
  {{ name: "PARAMS" data_type: TYPE_STRING dims: [ 1 ] optional: true }}
]
output [
  {{ name: "IMAGE" data_type: TYPE_STRING dims: [ 1 ] }},
  {{ name: "REPORT" data_type: TYPE_STRING dims: [ 1 ] }}
]
instance_group [ {{ count: {instances} kind: {kind} }} ]
parameters {{ key: "bundle" value: {{ string_value: "{bundle_path}" }} }}
parameters {{ key: "inversion_batch" value: {{ string_value: "{inversion_batch}" }} }}
parameters {{ key: "FORCE_CPU_ONLY_INPUT_TENSORS" value: {{ string_value: "{"no" if gpu else "yes"}" }} }}
'''
