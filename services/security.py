"""TLS for the services: the certificates one process serves with, and the channels it dials peers on.

One rule for every role: ``cert``/``key`` is what a process serves (and, unless a separate
client pair is given, what it presents when it dials a peer); ``ca`` is what it verifies peers
against. On a worker a ``ca`` also makes client certificates mandatory on its listener, so
with every process given the same CA the router, the prefill and the decode workers speak
mutual TLS to each other. The router's public listener never asks clients for a certificate:
clients prove who they are with an API key (services/router/auth.py).

NIXL's data plane (the KV bytes themselves) does not go through gRPC and is not covered.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import grpc


class SecurityConfigError(ValueError):
    """A TLS or key file setting that cannot work; the message says which flag."""


@dataclass(frozen=True)
class ChannelSecurity:
    """How a process dials its peers: TLS credentials and the name their certificates must carry,
    and the worker key it presents (the credential of the internal services, docs/security.md)."""

    credentials: grpc.ChannelCredentials | None = None  # None: plaintext
    server_name: str | None = None  # checked instead of the host in the address (workers advertise pod IPs)
    key: str | None = None  # sent as authorization: Bearer KEY on every call

    def options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


@dataclass(frozen=True)
class TLSConfig:
    """Certificate files of one service, checked (readable, in pairs) when built."""

    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None
    client_cert: Path | None = None  # the router's pair for dialing workers (default: cert/key)
    client_key: Path | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        for a, b, flags in ((self.cert, self.key, "--tls-cert and --tls-key"), (self.client_cert, self.client_key, "--tls-client-cert and --tls-client-key")):
            if (a is None) != (b is None):
                raise SecurityConfigError(f"{flags} go together")
        for flag, path in (("--tls-cert", self.cert), ("--tls-key", self.key), ("--tls-ca", self.ca), ("--tls-client-cert", self.client_cert), ("--tls-client-key", self.client_key)):
            if path is not None and not Path(path).is_file():
                raise SecurityConfigError(f"{flag} {path}: no such file")

    @property
    def enabled(self) -> bool:
        return self.cert is not None or self.ca is not None

    def server_credentials(self, verify_clients: bool) -> grpc.ServerCredentials | None:
        """TLS for this process's listener (None: plaintext); ``verify_clients`` with a CA makes it mutual."""
        if self.cert is None:
            return None
        pair = [(_read(self.key), _read(self.cert))]
        if verify_clients and self.ca is not None:
            return grpc.ssl_server_credentials(pair, root_certificates=_read(self.ca), require_client_auth=True)
        return grpc.ssl_server_credentials(pair)

    def peer_channels(self) -> ChannelSecurity | None:
        """How to dial peers (None: plaintext). Roots: the CA, else the system's; a client pair when there is one."""
        cert, key = (self.client_cert, self.client_key) if self.client_cert is not None else (self.cert, self.key)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca) if self.ca else None,
            private_key=_read(key) if key else None,
            certificate_chain=_read(cert) if cert else None,
        )
        return ChannelSecurity(credentials, self.server_name)


def read_worker_key(path: Path | None) -> str | None:
    """The key a worker (or a router dialing workers) presents: the first one in its worker keys file."""
    if path is None:
        return None
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise SecurityConfigError(f"cannot read worker keys file {path}: {e.strerror}") from None
    key = next((line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")), None)
    if key is None:
        raise SecurityConfigError(f"worker keys file {path} holds no keys")
    return key


def router_tls(cert=None, key=None, ca=None, client_cert=None, client_key=None, server_name=None) -> TLSConfig | None:
    """The router's TLS files. cert/key: its public listeners; ca: TLS to the workers, mutual with a client pair."""
    tls = TLSConfig(_path(cert), _path(key), _path(ca), _path(client_cert), _path(client_key), server_name)
    if tls.client_cert is not None and tls.ca is None:
        raise SecurityConfigError("--tls-client-cert needs --tls-ca (the CA the workers' certificates are checked against)")
    return tls if tls.enabled else None


def worker_tls(cert=None, key=None, ca=None, server_name=None) -> TLSConfig | None:
    """A worker's TLS files: it serves with cert/key and, given a CA, requires client certificates signed by it."""
    tls = TLSConfig(_path(cert), _path(key), _path(ca), server_name=server_name)
    if tls.ca is not None and tls.cert is None:
        raise SecurityConfigError("--tls-ca on a worker needs --tls-cert and --tls-key (it serves and dials its peers over TLS)")
    return tls if tls.enabled else None


def router_to_workers(tls: TLSConfig | None, worker_key: str | None = None) -> ChannelSecurity | None:
    """The router dials workers over TLS only when it has a CA to check them with; with its worker key when it has one."""
    return with_key(tls.peer_channels() if tls is not None and tls.ca is not None else None, worker_key)


def worker_to_peers(tls: TLSConfig | None, worker_key: str | None = None) -> ChannelSecurity | None:
    """A worker with a certificate dials its peers (configured alike) over TLS, presenting it; its worker key, if any, too."""
    return with_key(tls.peer_channels() if tls is not None and tls.cert is not None else None, worker_key)


def with_key(security: ChannelSecurity | None, key: str | None) -> ChannelSecurity | None:
    if key is None:
        return security
    return dataclasses.replace(security, key=key) if security is not None else ChannelSecurity(key=key)


def dial(address: str, security: ChannelSecurity | None, options: list[tuple[str, object]] = (), interceptors=None) -> grpc.aio.Channel:
    """A grpc.aio channel to a peer, over TLS when ``security`` has credentials, presenting its key when it has one."""
    interceptors = list(interceptors or ())
    if security is not None and security.key is not None:
        interceptors += bearer_key(security.key)
    if security is None or security.credentials is None:
        return grpc.aio.insecure_channel(address, options=list(options), interceptors=interceptors or None)
    return grpc.aio.secure_channel(
        address, security.credentials, options=[*options, *security.options()], interceptors=interceptors or None
    )


class _BearerKey:
    def __init__(self, key: str) -> None:
        self._header = ("authorization", f"Bearer {key}")

    def _with_key(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        return details._replace(metadata=grpc.aio.Metadata(*(tuple(details.metadata or ())), self._header))


class _UnaryUnaryKey(_BearerKey, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(self._with_key(client_call_details), request)


class _UnaryStreamKey(_BearerKey, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(self._with_key(client_call_details), request)


class _StreamUnaryKey(_BearerKey, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return await continuation(self._with_key(client_call_details), request_iterator)


class _StreamStreamKey(_BearerKey, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return await continuation(self._with_key(client_call_details), request_iterator)


def bearer_key(key: str) -> list[grpc.aio.ClientInterceptor]:
    """Interceptors adding ``authorization: Bearer KEY`` to every call on a channel, of every kind
    (grpc.aio files an interceptor under the first kind it implements only, so one per kind)."""
    return [kind(key) for kind in (_UnaryUnaryKey, _UnaryStreamKey, _StreamUnaryKey, _StreamStreamKey)]


def _path(value) -> Path | None:
    return None if value in (None, "") else Path(value)


def _read(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise SecurityConfigError(f"cannot read {path}: {e.strerror}") from None
