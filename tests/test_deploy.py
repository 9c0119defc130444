"""deploy/: the Kubernetes manifests are valid, and every flag and variable they (and the
images) give the two processes exists and parses.

The manifests are validated strictly (unknown fields are errors) against the Kubernetes version
the Makefile's ``lint`` uses; the container arguments go through the real CLI parsers, so a
renamed flag, a bad choice or a value the settings reject fails here, not at a rollout.
Dockerfiles are linted with hadolint (``make lint`` runs both tools too). A container with a
read-only root filesystem must find every directory it writes to (HF_HOME, the embedded model's
conversion cache) on a writable volume.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate
import pytest
import yaml

from glmserve.settings import Cli
from http_bridge.settings import CLI as BRIDGE_CLI
from model_server.models import DEFAULT_MODEL
from model_server.models.gguf import cache_root
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


# Variables naming a directory the process writes to (the model servers' Hugging Face cache).
WRITABLE_VARS = ("HF_HOME",)
# Volume kinds a container can write to, unless mounted (or claimed) read-only.
WRITABLE_VOLUMES = ("emptyDir", "ephemeral", "persistentVolumeClaim", "hostPath")
# The embedded model's conversion: ~517 MiB of fp32 safetensors, rounded up.
CONVERTED_BYTES = 600 * 2**20


def read_only_root_containers() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(manifest and name, pod spec, container) for every container whose root is read-only."""
    out = []
    for path, doc in documents():
        pod = doc.get("spec", {}).get("template", {}).get("spec", {})
        for c in pod.get("containers", []):
            if c.get("securityContext", {}).get("readOnlyRootFilesystem"):
                out.append((f"{path.relative_to(ROOT)}:{c['name']}", pod, c))
    return out


def image_env(image: str) -> dict[str, str]:
    """The environment the Dockerfile that builds ``image`` (its ``docker build ... -t IMAGE``
    comment) gives its final stage: its ENV, and HOME as docker sets it for the USER, the home
    directory useradd made; empty for an image built elsewhere."""
    for path in DOCKERFILES:
        text = path.read_text()
        if re.search(rf"-t {re.escape(image)}\s", text):
            break
    else:
        return {}
    final = text[text.rindex("\nFROM ") :].replace("\\\n", " ")
    env: dict[str, str] = {}
    for line in final.splitlines():
        if line.startswith("ENV "):
            env.update(re.findall(r"([A-Za-z_]\w*)=(\S+)", line))
    home = re.search(r"--home-dir (\S+)", final)
    env.setdefault("HOME", home.group(1) if home else "/root")
    return env


def container_env(container: dict[str, Any]) -> dict[str, str]:
    """The image's environment with the manifest's literal variables over it (values from
    Secrets are unknown here)."""
    literal = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    return {**image_env(container["image"]), **literal}


def writable_mounts(pod: dict[str, Any], container: dict[str, Any]) -> list[PurePosixPath]:
    """Where ``container`` can write on a read-only root: its writable volumes' mount paths."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    out = []
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        kinds = [k for k in WRITABLE_VOLUMES if k in volume]
        claim_read_only = volume.get("persistentVolumeClaim", {}).get("readOnly", False)
        if kinds and not mount.get("readOnly") and not claim_read_only:
            out.append(PurePosixPath(mount["mountPath"]))
    return out


def writable_paths(
    container: dict[str, Any], env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> dict[str, str]:
    """What the process will write to, by the setting that names it: ``WRITABLE_VARS`` that
    are set and, for a model server on the embedded model, the cache its conversion goes to
    (``--cache-dir``, else the default ``cache_root`` derives from XDG_CACHE_HOME or HOME)."""
    paths = {name: env[name] for name in WRITABLE_VARS if name in env}
    if container["name"] == "model-server":
        settings = SERVER_CLI.parse(container.get("args", []), env=env)
        if settings.model == DEFAULT_MODEL:
            with monkeypatch.context() as m:  # the container's HOME and XDG, not ours
                m.setenv("HOME", env["HOME"])
                if "XDG_CACHE_HOME" in env:
                    m.setenv("XDG_CACHE_HOME", env["XDG_CACHE_HOME"])
                else:
                    m.delenv("XDG_CACHE_HOME", raising=False)
                paths["--cache-dir"] = str(cache_root(settings.cache_dir))
    return paths


READ_ONLY_ROOT = read_only_root_containers()


@pytest.mark.parametrize(
    ("where", "pod", "container"), READ_ONLY_ROOT, ids=[where for where, _, _ in READ_ONLY_ROOT]
)
def test_read_only_root_writes_only_to_volumes(
    where: str, pod: dict[str, Any], container: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With readOnlyRootFilesystem every directory the image or the manifest has the process
    write to lies on a writable volume: else the first write (the embedded model's conversion
    at the first start) fails and the pod crash-loops."""
    mounts = writable_mounts(pod, container)
    for what, path in writable_paths(container, container_env(container), monkeypatch).items():
        target = PurePosixPath(path)
        covered = [m for m in mounts if m == target or m in target.parents]
        assert covered, f"{where}: {what}={path} is on the read-only root (writable: {mounts})"


def quantity_bytes(quantity: str) -> int:
    """A Kubernetes quantity of bytes (``2Gi``, ``500M``, ``1024``)."""
    units = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    match = re.fullmatch(r"(\d+)([A-Za-z]*)", str(quantity))
    assert match and match[2] in units, quantity
    return int(match[1]) * units[match[2]]


def test_cpu_model_server_cache_volume_has_room(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU pod converts the embedded model into an emptyDir at each start: the volume's
    limit holds it twice (a start killed mid-conversion leaves a partial copy) and the pod
    asks the scheduler for a node with room for one."""
    (deployment,) = [
        d for p, d in documents() if p.parent.name == "cpu" and d["kind"] == "Deployment"
    ]
    pod = deployment["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    cache = PurePosixPath(writable_paths(c, container_env(c), monkeypatch)["--cache-dir"])
    (mount,) = [m for m in c["volumeMounts"] if PurePosixPath(m["mountPath"]) in cache.parents]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert quantity_bytes(volume["emptyDir"]["sizeLimit"]) >= 2 * CONVERTED_BYTES
    assert quantity_bytes(c["resources"]["requests"]["ephemeral-storage"]) >= CONVERTED_BYTES
