"""Keys for the router's gRPC and HTTP APIs (clients) and for the internal services (workers).

Keys come from a file, one per line (a Kubernetes Secret mounted as a file); the file is
re-read when it changes, so a rotated Secret takes effect without a restart. Only SHA-256
digests of the keys are held, and a presented key is compared against every one of them
with ``hmac.compare_digest``: the time taken says nothing about how close a guess was. No
key, good or bad, ever reaches a log line or an error message.
"""
from __future__ import annotations

import hashlib
import hmac
import inspect
import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import grpc

from splitserve.services.security import SecurityConfigError

log = logging.getLogger(__name__)

MISSING_KEY = "missing API key: send the header `authorization: Bearer <key>`"
WRONG_KEY = "invalid API key"


def read_keys(path: Path) -> list[str]:
    """The keys in ``path``: one per line, blank lines and ``#`` comments skipped."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise SecurityConfigError(f"cannot read API keys file {path}: {e.strerror}") from None
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def bearer(value: str | None) -> str | None:
    """The key in an ``authorization`` value of the form ``Bearer KEY`` (None when absent)."""
    if not value:
        return None
    scheme, _, key = value.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return key.strip() or None


class ApiKeys:
    """The accepted keys. ``check(key)`` is safe to call on every request."""

    def __init__(self, path: Path, reload_interval_seconds: float = 1.0, what: str = "API keys file") -> None:
        self.path = Path(path)
        self.reload_interval_seconds = reload_interval_seconds
        self._digests = self._load()
        if not self._digests:
            raise SecurityConfigError(f"{what} {self.path} holds no keys")
        self._version = self._stat()
        self._checked_at = time.monotonic()

    def check(self, key: str | None) -> bool:
        self._reload_if_changed()
        if key is None:
            return False
        digest = hashlib.sha256(key.encode()).digest()
        matched = False
        for known in self._digests:  # no early exit: every key is compared every time
            matched |= hmac.compare_digest(known, digest)
        return matched

    def _load(self) -> tuple[bytes, ...]:
        return tuple(hashlib.sha256(k.encode()).digest() for k in read_keys(self.path))

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)  # follows the ..data symlink a Secret volume swaps on update
        except OSError:
            return None
        return st.st_mtime_ns, st.st_ino, st.st_size

    def _reload_if_changed(self) -> None:
        now = time.monotonic()
        if now - self._checked_at < self.reload_interval_seconds:
            return
        self._checked_at = now
        version = self._stat()
        if version is None or version == self._version:
            return
        try:
            self._digests = self._load()
        except SecurityConfigError as e:
            log.warning("%s; keeping the keys read before", e)
            return
        self._version = version
        log.info("API keys reloaded from %s (%d keys)", self.path, len(self._digests))


class Malformed:
    """What a request that does not parse becomes, so the handler can refuse it by name."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _lenient(deserialize: Callable[[bytes], object] | None) -> Callable[[bytes], object] | None:
    # grpcio answers a deserializer's exception with UNKNOWN, the exception's class name and a
    # traceback in the log for every such request; bad bytes are the caller's fault.
    if deserialize is None:
        return None

    def parse(data: bytes) -> object:
        try:
            return deserialize(data)
        except Exception as e:  # noqa: BLE001 -- DecodeError, invalid UTF-8 in a string field
            return Malformed(e)

    return parse


class ServiceEdge:
    """Adds servicers to a grpc.aio server behind the checks every call must pass first.

    It stands in for the server in ``add_*Servicer_to_server(servicer, ServiceEdge(...))`` and
    wraps each method handler: with ``keys``, the caller's key is checked before the servicer
    runs, so a rejected call does no work and reaches no worker; and a request that does not
    parse (malformed protobuf, invalid UTF-8) is INVALID_ARGUMENT, with nothing logged.
    ``credential`` names what the keys are in error messages ("API key", "worker key").
    Services added to the server directly (health checking and reflection) stay open, so
    probes need no key.
    """

    def __init__(
        self, server: grpc.aio.Server, keys: ApiKeys | None = None, on_reject: Callable[[], None] = lambda: None, credential: str = "API key"
    ) -> None:
        self._server = server
        self._keys = keys
        self._on_reject = on_reject
        self._missing, self._wrong = (MISSING_KEY, WRONG_KEY) if credential == "API key" else (
            f"missing {credential}: send the header `authorization: Bearer <key>`", f"invalid {credential}")

    def add_generic_rpc_handlers(self, handlers: Iterable[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers([_GuardedGenericHandler(h, self._guard) for h in handlers])

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self._server.add_registered_method_handlers(service, {name: self._guard(h) for name, h in handlers.items()})

    async def _admit(self, request, context: grpc.aio.ServicerContext) -> None:
        if self._keys is not None:
            value = next((v for k, v in context.invocation_metadata() or () if k == "authorization"), None)
            key = bearer(value)
            if not self._keys.check(key):
                self._on_reject()
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, self._missing if key is None else self._wrong)
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the request does not parse: {request.error}")

    def _guard(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            behavior = getattr(handler, kind)
            if behavior is not None:
                guarded = {kind: self._guard_behavior(behavior)}
                if not handler.request_streaming:
                    guarded["request_deserializer"] = _lenient(handler.request_deserializer)
                return handler._replace(**guarded)
        return handler

    def _guard_behavior(self, behavior):
        if inspect.isasyncgenfunction(behavior):

            async def guarded_stream(request, context):
                await self._admit(request, context)
                async for response in behavior(request, context):
                    yield response

            return guarded_stream

        async def guarded(request, context):
            await self._admit(request, context)
            return await behavior(request, context)

        return guarded


class _GuardedGenericHandler(grpc.GenericRpcHandler):
    def __init__(self, inner: grpc.GenericRpcHandler, guard: Callable[[grpc.RpcMethodHandler], grpc.RpcMethodHandler]) -> None:
        self._inner = inner
        self._wrap = guard

    def service(self, handler_call_details):
        handler = self._inner.service(handler_call_details)
        return None if handler is None else self._wrap(handler)
