"""Every manifest in deploy/k8s checked offline against Kubernetes' OpenAPI schemas (kubernetes-validate ships
them, strict: unknown fields are errors) and KEDA's ScaledObject against its CRD schema, vendored in
tests/schemas with its source."""

from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

K8S_VERSION = "1.30"  # the oldest release still supported upstream when this was written
MANIFESTS = sorted(Path("deploy/k8s").glob("*.yaml"))
DOCS = [(path.name, n, doc) for path in MANIFESTS for n, doc in enumerate(yaml.safe_load_all(path.read_text())) if doc]


def closed(schema):
    """The schema with every object that names its properties refusing others (KEDA's CRD leaves them open)."""
    if isinstance(schema, dict):
        schema = {k: closed(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema and schema["properties"]:
            schema["additionalProperties"] = False
        return schema
    return [closed(item) for item in schema] if isinstance(schema, list) else schema


KEDA_SCHEMA = Path("tests/schemas/keda-scaledobject-v1alpha1.yaml")
KEDA = jsonschema.Draft7Validator(closed(yaml.safe_load(KEDA_SCHEMA.read_text())))


def validate(doc):
    if doc["apiVersion"] == "keda.sh/v1alpha1" and doc["kind"] == "ScaledObject":
        KEDA.validate(doc)
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize(("name", "n", "doc"), DOCS, ids=[f"{name}#{n}-{doc['kind']}" for name, n, doc in DOCS])
def test_manifest_matches_its_schema(name, n, doc):
    validate(doc)


def test_every_kind_is_checked():
    kinds = {doc["kind"] for _, _, doc in DOCS}
    assert {"ConfigMap", "Deployment", "Service", "PodDisruptionBudget", "ScaledObject"} <= kinds


@pytest.mark.parametrize(
    ("kind", "change"),
    [
        ("Deployment", lambda d: d["spec"].update(replicas="two")),
        ("Deployment", lambda d: d["spec"]["template"]["spec"]["containers"][0].update(livenessProbes={})),
        ("PodDisruptionBudget", lambda d: d["spec"].update(minAvailible=1)),
        ("ScaledObject", lambda d: d["spec"].update(maxReplicas=3)),
        ("ScaledObject", lambda d: d["spec"]["triggers"][0].pop("metadata")),
    ],
)
def test_the_check_catches_a_wrong_manifest(kind, change):
    doc = yaml.safe_load(yaml.safe_dump(next(d for _, _, d in DOCS if d["kind"] == kind)))
    change(doc)
    with pytest.raises((kubernetes_validate.ValidationError, jsonschema.ValidationError)):
        validate(doc)
