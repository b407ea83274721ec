"""The files of exported components: ONNX graphs with their weights in one external-data file
beside them, and the artifact record (``components.json``) that ``revpers export`` writes and the
repository builder reads. Shared by export and serving, so neither imports the other."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from revpers.models.components import ComponentSpec, arcface_spec

ARTIFACTS_MANIFEST = "components.json"
EXTERNAL_DATA_SUFFIX = ".data"  # model.onnx -> model.onnx.data beside it


def external_data_files(path: Path) -> list[Path]:
    """The external-data files an ONNX file references (paths beside it), in first-use order."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    model = onnx.load(str(path), load_external_data=False)
    seen: dict[str, None] = {}
    for tensor in _get_all_tensors(model):
        if uses_external_data(tensor):
            seen.setdefault(ExternalDataInfo(tensor).location, None)
    return [Path(path).parent / loc for loc in seen]


def store_weights_externally(path: Path) -> Path:
    """Move every weight of the ONNX file at ``path`` into one file ``<name>.data`` beside it.

    An SDXL UNet is 10 GB in fp32, past protobuf's 2 GB limit: the exporter then writes one file per
    tensor (hundreds, named after the tensors), which Triton's model folders and copies handle badly.
    Every exported component is written the same way whatever its size (graph in ``model.onnx``,
    weights in ``model.onnx.data``), so the small models of the tests take the path large ones need.
    Returns the data file.
    """
    import onnx

    path = Path(path)
    scattered = external_data_files(path)
    model = onnx.load(str(path))  # with its weights, wherever they are
    data = path.with_name(path.name + EXTERNAL_DATA_SUFFIX)
    data.unlink(missing_ok=True)  # onnx appends to an existing data file
    onnx.save_model(
        model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name, size_threshold=0
    )
    for f in scattered:
        if f != data:
            f.unlink(missing_ok=True)
    return data


def onnx_files(path: Path) -> list[Path]:
    """An ONNX file and the external-data files it needs: what must travel together."""
    return [Path(path), *external_data_files(path)]


def onnx_session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def copy_recognizer(bundle, dst: Path) -> ComponentSpec:
    """The bundle's ArcFace ONNX file as the `arcface` component (spec's input/output names)."""
    spec = arcface_spec(bundle.embedding_dim)
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(bundle.path(bundle.faces["recognizer"]), dst)
    rename_io(dst, spec)
    return spec


def rename_io(path: Path, spec: ComponentSpec) -> None:
    """Give an ONNX file the spec's input/output names (ArcFace files use arbitrary ones)."""
    import onnx

    model = onnx.load(str(path))
    renames = {}
    for vi, t in zip(model.graph.input, spec.inputs):
        renames[vi.name] = t.name
    for vi, t in zip(model.graph.output, spec.outputs):
        renames[vi.name] = t.name
    if all(k == v for k, v in renames.items()):
        return
    for node in model.graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]
    for vi in list(model.graph.input) + list(model.graph.output):
        vi.name = renames.get(vi.name, vi.name)
    onnx.save(model, str(path))


def load_artifacts(path: Path) -> dict:
    path = Path(path)
    f = path / ARTIFACTS_MANIFEST
    if not f.is_file():
        raise FileNotFoundError(
            f"{path} holds no exported components ({ARTIFACTS_MANIFEST} missing); "
            "run `revpers export --models BUNDLE --out DIR` first"
        )
    return json.loads(f.read_text())
