"""TLS, mutual TLS between router and workers, and API keys, on real processes.

One cluster for the module, with everything on: the router serves gRPC and HTTP over TLS
with a certificate this test makes (its own CA), dials the workers over mutual TLS, the
decode worker reaches the prefill worker the same way, the workers register with the
router's embedded store over TLS with a worker key (no client key opens it), and both APIs
require API keys.
"""
from __future__ import annotations

import datetime
import ipaddress
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from splitserve.client import Client
from splitserve.testing.cluster import Cluster, wait_until
from splitserve.v1 import controlplane_pb2, controlplane_pb2_grpc
from splitserve.v1 import worker_pb2 as worker_pb
from splitserve.v1 import worker_pb2_grpc

pytestmark = [pytest.mark.slow]

KEY, OTHER_KEY, WORKER_KEY, ROTATED_KEY = "sk-test-alpha-1c6f", "sk-test-beta-90ad", "sk-test-worker-77e2", "sk-test-rotated-5b31"
OTHER_CLIENT_KEY = "sk-test-gamma-4e02"  # a second valid client key
PROMPT = "A prompt long enough to fill a couple of KV blocks on the prefill worker, " * 2


@dataclass
class Pem:
    cert: Path
    key: Path

    def pair(self) -> tuple[bytes, bytes]:
        return self.key.read_bytes(), self.cert.read_bytes()


@dataclass
class Pki:
    ca: Path
    server: Pem  # router and workers: serves, and is presented as a client certificate
    client: Pem  # a client certificate the CA signed
    rogue_ca: Path
    rogue_client: Pem  # signed by a CA nobody trusts


def _write(dir_: Path, name: str, key, cert: x509.Certificate) -> Pem:
    pem = Pem(dir_ / f"{name}.crt", dir_ / f"{name}.key")
    pem.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return pem


def _certificate(subject: str, key, issuer: x509.Name | None, issuer_key, *, ca: bool, sans=()) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
    else:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _make_ca(dir_: Path, name: str) -> tuple[Path, object, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _certificate(name, key, None, key, ca=True)
    return _write(dir_, name, key, cert).cert, key, cert


def _issue(dir_: Path, name: str, ca_key, ca_cert: x509.Certificate, sans=()) -> Pem:
    key = ec.generate_private_key(ec.SECP256R1())
    return _write(dir_, name, key, _certificate(name, key, ca_cert.subject, ca_key, ca=False, sans=sans))


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca, ca_key, ca_cert = _make_ca(d, "splitserve-test-ca")
    loopback = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
    rogue_ca, rogue_key, rogue_cert = _make_ca(d, "rogue-ca")
    return Pki(
        ca=ca,
        server=_issue(d, "splitserve", ca_key, ca_cert, loopback),
        client=_issue(d, "client", ca_key, ca_cert),
        rogue_ca=rogue_ca,
        rogue_client=_issue(d, "rogue-client", rogue_key, rogue_cert),
    )


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("auth") / "keys"
    path.write_text(f"# API keys, one per line\n{KEY}\n\n{OTHER_CLIENT_KEY}\n")
    return path


@pytest.fixture(scope="module")
def cluster(e2e_model_dir, pki: Pki, keys_file: Path) -> Iterator[Cluster]:
    worker_keys = keys_file.parent / "worker-keys"
    worker_keys.write_text(f"{WORKER_KEY}\n")
    tls = ["--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key), "--tls-ca", str(pki.ca)]
    client_creds = grpc.ssl_channel_credentials(pki.ca.read_bytes(), *pki.client.pair())
    cluster = Cluster(
        e2e_model_dir,
        [*tls, "--api-keys-file", str(keys_file), "--worker-keys-file", str(worker_keys)],
        [*tls, "--worker-keys-file", str(worker_keys), "--num-blocks", "128"],
        router_tls=True,
        worker_credentials=client_creds,
        worker_key=WORKER_KEY,
    )
    try:
        cluster.add_workers(("prefill", "prefill-tls"), ("decode", "decode-tls"))
        yield cluster
    finally:
        cluster.stop()


def _worker_counters(cluster: Cluster) -> list[tuple[int, ...]]:
    """What moves when a request reaches a worker."""
    out = []
    for w in cluster.workers:
        s = w.stats()
        out.append((s.num_requests_finished, s.num_prompt_tokens_computed, s.num_running, s.num_waiting, s.num_local_prefills))
    return out


def _unauthenticated_count(cluster: Cluster) -> float:
    text = httpx.get(f"http://127.0.0.1:{cluster.router.metrics_port}/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "splitserve_errors_total" and sample.labels.get("kind") == "unauthenticated":
                return sample.value
    return 0.0


def _ssl_context(ca: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca))


def test_grpc_over_tls_with_a_key_serves_and_kv_moves_over_mutual_tls(cluster, pki):
    result = Client(cluster.address, root_certificates=pki.ca, api_key=KEY).complete(PROMPT, max_tokens=8, ignore_eos=True, timeout=120)
    assert result.completion_tokens == len(result.token_ids) == 8
    decode = next(w for w in cluster.workers if w.role == "decode").stats()
    # The decode worker fetched the prefill worker's transfer metadata over mutual TLS, then pulled the KV.
    assert decode.num_kv_transfers >= 1 and decode.num_local_prefills == 0


def test_a_grpc_client_that_does_not_trust_the_certificate_is_refused(cluster, pki):
    for client in (Client(cluster.address, root_certificates=pki.rogue_ca, api_key=KEY), Client(cluster.address, api_key=KEY)):
        with pytest.raises(grpc.RpcError) as e:
            client.complete("hi", max_tokens=2, timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        client.close()


def test_http_over_tls(cluster, pki):
    url = cluster.router.http_url
    assert url.startswith("https://")
    auth = {"authorization": f"Bearer {KEY}"}
    with httpx.Client(verify=_ssl_context(pki.ca), timeout=60) as http:
        assert http.get(f"{url}/models", headers=auth).status_code == 200
    with pytest.raises(httpx.ConnectError), httpx.Client(verify=_ssl_context(pki.rogue_ca)) as http:
        http.get(f"{url}/models", headers=auth)
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url.replace('https://', 'http://')}/models", headers=auth, timeout=10)
    client = openai.OpenAI(base_url=url, api_key=KEY, http_client=httpx.Client(verify=_ssl_context(pki.ca)), max_retries=0)
    out = client.chat.completions.create(model=cluster.model_dir.name, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                         temperature=0, extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 3


def test_grpc_refuses_missing_and_wrong_keys_before_any_worker_sees_them(cluster, pki):
    before, refused = _worker_counters(cluster), _unauthenticated_count(cluster)
    for api_key in (None, OTHER_KEY, KEY + "x", KEY[:-1]):
        client = Client(cluster.address, root_certificates=pki.ca, api_key=api_key)
        with pytest.raises(grpc.RpcError) as e:
            client.complete(PROMPT, max_tokens=4, timeout=30)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert ("missing API key" if api_key is None else "invalid API key") in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            client.model_info()
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        client.close()
    creds = grpc.ssl_channel_credentials(pki.ca.read_bytes())
    with grpc.secure_channel(cluster.address, creds) as channel:
        # The embedded control plane is guarded too: nobody registers a worker without a key.
        with pytest.raises(grpc.RpcError) as e:
            controlplane_pb2_grpc.ControlPlaneStub(channel).LiveWorkers(controlplane_pb2.LiveWorkersRequest(), timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # Probes and tooling need no key.
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="splitserve.v1.Generation"), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        answer = next(reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
        assert "splitserve.v1.Generation" in {s.name for s in answer.list_services_response.service}
    assert _worker_counters(cluster) == before
    assert _unauthenticated_count(cluster) == refused + 9
    assert Client(cluster.address, root_certificates=pki.ca, api_key=KEY).model_info().vocab_size > 0


def test_http_refuses_missing_and_wrong_keys_before_any_worker_sees_them(cluster, pki):
    url = cluster.router.http_url
    before, refused = _worker_counters(cluster), _unauthenticated_count(cluster)
    body = {"prompt": PROMPT, "max_tokens": 4}
    with httpx.Client(verify=_ssl_context(pki.ca), timeout=60) as http:
        for headers in ({}, {"authorization": f"Bearer {OTHER_KEY}"}, {"authorization": f"Basic {KEY}"}, {"authorization": KEY}):
            r = http.post(f"{url}/completions", json=body, headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            assert r.json()["error"]["code"] == "invalid_api_key" and KEY not in r.text
        assert http.get(f"{url}/models").status_code == 401
        assert http.post(f"{url}/chat/completions", content=b"{not json").status_code == 401  # the key first, then the body
        assert _worker_counters(cluster) == before
        assert _unauthenticated_count(cluster) == refused + 6
        assert http.get(url.removesuffix("/v1") + "/health").status_code == 200  # probes need no key
        r = http.post(f"{url}/completions", json=body, headers={"authorization": f"Bearer {KEY}"})
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] > 0


def test_workers_require_a_client_certificate_their_ca_signed(cluster, pki):
    prefill = next(w for w in cluster.workers if w.role == "prefill")
    ca = pki.ca.read_bytes()
    refused = [grpc.ssl_channel_credentials(ca), grpc.ssl_channel_credentials(ca, *pki.rogue_client.pair())]
    for creds in refused:
        with grpc.secure_channel(prefill.address, creds) as channel:
            with pytest.raises(grpc.RpcError) as e:
                worker_pb2_grpc.PrefillWorkerStub(channel).GetStats(worker_pb.StatsRequest(), timeout=10)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    with grpc.insecure_channel(prefill.address) as channel:
        with pytest.raises(grpc.RpcError):
            worker_pb2_grpc.PrefillWorkerStub(channel).GetStats(worker_pb.StatsRequest(), timeout=10)
    with grpc.secure_channel(prefill.address, grpc.ssl_channel_credentials(ca, *pki.client.pair())) as channel:
        stub = worker_pb2_grpc.PrefillWorkerStub(channel)
        # A certificate the CA signed gets through TLS; the call still needs the worker key, never a client's.
        for key in (None, KEY):
            with pytest.raises(grpc.RpcError) as e:
                stub.GetStats(worker_pb.StatsRequest(), timeout=10, metadata=_auth(key))
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert stub.GetStats(worker_pb.StatsRequest(), timeout=10, metadata=_auth(WORKER_KEY)).worker_id == "prefill-tls"


def _auth(key: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),) if key else ()


def test_a_client_key_is_refused_on_the_control_plane_over_tls(cluster, pki):
    info = controlplane_pb2.WorkerInfo(worker_id="fake-prefill", role="prefill", address="127.0.0.1:1", block_size=16, tp_size=1)
    calls = {
        "Register": controlplane_pb2.RegisterRequest(info=info, ttl_seconds=30),
        "Deregister": controlplane_pb2.DeregisterRequest(worker_id="decode-tls"),
        "LiveWorkers": controlplane_pb2.LiveWorkersRequest(),
    }
    with grpc.secure_channel(cluster.address, grpc.ssl_channel_credentials(pki.ca.read_bytes())) as channel:
        stub = controlplane_pb2_grpc.ControlPlaneStub(channel)
        for name, request in calls.items():
            for key in (KEY, OTHER_CLIENT_KEY):
                with pytest.raises(grpc.RpcError) as e:
                    getattr(stub, name)(request, metadata=_auth(key), timeout=10)
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED and "worker key" in e.value.details(), name
        live = stub.LiveWorkers(controlplane_pb2.LiveWorkersRequest(), metadata=_auth(WORKER_KEY), timeout=10)
        assert sorted(w.info.worker_id for w in live.workers) == ["decode-tls", "prefill-tls"]
    # Nothing was deregistered: requests are still served.
    assert Client(cluster.address, root_certificates=pki.ca, api_key=KEY).complete(PROMPT, max_tokens=2, timeout=120).completion_tokens == 2


def test_a_rotated_keys_file_takes_effect_without_a_restart(cluster, pki, keys_file):
    client = Client(cluster.address, root_certificates=pki.ca, api_key=ROTATED_KEY)
    with pytest.raises(grpc.RpcError):
        client.model_info()
    keys_file.write_text(keys_file.read_text() + f"{ROTATED_KEY}\n")

    def accepted() -> bool:
        try:
            return client.model_info().vocab_size > 0
        except grpc.RpcError:
            return False

    assert wait_until(accepted, timeout=10)


def test_no_key_reaches_the_logs(cluster):
    logs = "".join(s.output() for s in [cluster.router, *cluster.workers])
    for key in (KEY, OTHER_KEY, WORKER_KEY, ROTATED_KEY):
        assert key not in logs
