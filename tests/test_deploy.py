"""deploy/: the Kubernetes manifests are valid, and every flag and variable they (and the
images) give the two processes exists and parses.

The manifests are validated strictly (unknown fields are errors) against the Kubernetes version
the Makefile's ``lint`` uses; the container arguments go through the real CLI parsers, so a
renamed flag, a bad choice or a value the settings reject fails here, not at a rollout.
Dockerfiles are linted with hadolint (``make lint`` runs both tools too).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from glmserve.settings import Cli
from http_bridge.settings import CLI as BRIDGE_CLI
from model_server.settings import CLI as SERVER_CLI

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
DOCKER = ROOT / "deploy" / "docker"
MANIFESTS = sorted(K8S.rglob("*.yaml"))
DOCKERFILES = sorted(DOCKER.glob("*.Dockerfile"))
CLIS: dict[str, Cli] = {"model-server": SERVER_CLI, "http-bridge": BRIDGE_CLI}
K8S_VERSION = re.search(r"^K8S_VERSION\s*:=\s*(\S+)", (ROOT / "Makefile").read_text(), re.M).group(
    1
)  # type: ignore[union-attr]


def documents() -> list[tuple[Path, dict[str, Any]]]:
    return [(p, d) for p in MANIFESTS for d in yaml.safe_load_all(p.read_text()) if d]


def containers() -> list[tuple[str, dict[str, Any]]]:
    """(manifest and name, container) for every container running one of our processes."""
    out = []
    for path, doc in documents():
        spec = doc.get("spec", {}).get("template", {}).get("spec", {})
        for c in spec.get("containers", []):
            if c["name"] in CLIS:
                out.append((f"{path.relative_to(ROOT)}:{c['name']}", c))
    return out


def test_manifests_exist_for_both_variants() -> None:
    kinds = {(d["kind"], d["metadata"]["name"]) for _, d in documents()}
    for kind in ("Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"):
        assert (kind, "model-server") in kinds and (kind, "http-bridge") in kinds, kind
    assert ("NetworkPolicy", "model-server") in kinds
    variants = {p.parent.name for p, d in documents() if d["kind"] == "Deployment"}
    assert {"gpu", "cpu", "common"} <= variants
    assert sorted(c["name"] for _, c in containers()) == ["http-bridge", *["model-server"] * 2]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(K8S)))
def test_manifest_is_valid_kubernetes(path: Path) -> None:
    for doc in yaml.safe_load_all(path.read_text()):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_strict_validation_rejects_unknown_fields() -> None:
    """The check above can fail: a misspelt field is an error, not ignored."""
    (deployment,) = [
        d for p, d in documents() if p.parent.name == "gpu" and d["kind"] == "Deployment"
    ]
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_gpu_model_server_shape() -> None:
    """What the GPU deployment promises: a GPU, gRPC probes, a drain that fits the grace."""
    (deployment,) = [
        d for p, d in documents() if p.parent.name == "gpu" and d["kind"] == "Deployment"
    ]
    pod = deployment["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert "grpc" in c[probe], probe
    settings = SERVER_CLI.parse(c["args"], env={})
    assert {c[p]["grpc"]["port"] for p in ("startupProbe", "readinessProbe")} == {
        settings.health_port
    }
    pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > pre_stop + settings.drain_seconds
    assert settings.max_connection_age and settings.tls_client_ca
    (service,) = [
        d
        for _, d in documents()
        if d["kind"] == "Service" and d["metadata"]["name"] == "model-server"
    ]
    assert service["spec"]["clusterIP"] == "None"
    (hpa,) = [
        d
        for _, d in documents()
        if d["kind"] == "HorizontalPodAutoscaler" and d["metadata"]["name"] == "model-server"
    ]
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "glmserve_requests_waiting"


@pytest.mark.parametrize(
    ("where", "container"), containers(), ids=lambda x: x if isinstance(x, str) else ""
)
def test_container_flags_and_variables_exist(where: str, container: dict[str, Any]) -> None:
    cli = CLIS[container["name"]]
    envs = {d.option.env for d in cli.declared}
    names = [e["name"] for e in container.get("env", [])]
    assert set(names) <= envs, set(names) - envs
    flags = {d.option.flag for d in cli.declared}
    flags |= {f"--no-{d.option.flag[2:]}" for d in cli.declared if d.kind == "bool"}
    given = {a for a in container["args"] if a.startswith("--")}
    assert given <= flags, given - flags
    # The real parser: types, choices and the settings' own checks (values from Secrets are
    # unknown here; the literal ones are parsed too).
    literal = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    cli.parse(container["args"], env=literal)


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_variables_and_entrypoint(path: Path) -> None:
    text = path.read_text()
    (entry,) = re.findall(r'^ENTRYPOINT \["([^"]+)"\]', text, re.M)
    cli = CLIS[entry]
    final_stage = text[text.rindex("\nFROM ") :]
    env = dict(re.findall(r"\b(GLMSERVE_[A-Z_]+)=(\S+)", final_stage))
    assert env and set(env) <= {d.option.env for d in cli.declared}, env
    cli.parse([], env=env)  # each value parses
    assert "\nUSER " in final_stage and "USER root" not in final_stage
    if entry == "http-bridge":  # the bridge extra only: no torch
        assert '"./[bridge]"' in text and "torch==" not in text
    else:
        assert '"./[server]"' in text and "torch==" in text


def test_hadolint_is_clean() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    done = subprocess.run(
        [str(hadolint), *map(str, DOCKERFILES)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
