"""Client library for the public gRPC API, sync and async."""
from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from splitserve.v1 import generation_pb2 as gen_pb
from splitserve.v1 import generation_pb2_grpc

FINISH_NAMES = {gen_pb.FINISH_REASON_STOP: "stop", gen_pb.FINISH_REASON_LENGTH: "length", gen_pb.FINISH_REASON_ABORT: "abort"}


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int


def build_request(prompt: str | list[int], *, max_tokens: int = 0, temperature: float = 0.0, **fields) -> gen_pb.GenerateRequest:
    """``fields``: any other GenerateRequest field (stop, ignore_eos, logprobs, request_id, ...)
    or SamplingParams field (top_p, top_k, seed, ...)."""
    sampling_names = set(gen_pb.SamplingParams.DESCRIPTOR.fields_by_name)
    sampling = gen_pb.SamplingParams(temperature=temperature, **{k: v for k, v in fields.items() if k in sampling_names})
    rest = {k: v for k, v in fields.items() if k not in sampling_names}
    request = gen_pb.GenerateRequest(sampling=sampling, max_tokens=max_tokens, **rest)
    if isinstance(prompt, str):
        request.text = prompt
    else:
        request.token_ids.ids.extend(prompt)
    return request


def collect(responses) -> Completion:
    text, ids, final = [], [], None
    for r in responses:
        if r.HasField("delta"):
            text.append(r.delta.text)
            ids.extend(r.delta.token_ids)
        else:
            final = r.final
    if final is None:
        raise RuntimeError("stream ended without a final message")
    return Completion(
        "".join(text), ids, FINISH_NAMES.get(final.finish_reason, "unspecified"),
        final.usage.prompt_tokens, final.usage.completion_tokens, final.usage.cached_prompt_tokens,
    )


def _credentials(credentials, root_certificates) -> grpc.ChannelCredentials | None:
    """``root_certificates``: PEM bytes or a file path; the CA to trust (TLS with the system's roots: pass b"")."""
    if root_certificates is None:
        return credentials
    if credentials is not None:
        raise ValueError("pass credentials or root_certificates, not both")
    if isinstance(root_certificates, (str, Path)):
        root_certificates = Path(root_certificates).read_bytes()
    return grpc.ssl_channel_credentials(root_certificates=root_certificates or None)


def _metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


class Client:
    """Blocking client: ``Client("host:port").complete("Hello", max_tokens=16)``.

    ``api_key``: sent as ``authorization: Bearer KEY``; ``root_certificates``: connect over
    TLS trusting this CA (PEM bytes or a path); ``credentials``: any other channel credentials.
    """

    def __init__(self, target: str, credentials: grpc.ChannelCredentials | None = None, *, api_key: str | None = None,
                 root_certificates: bytes | str | Path | None = None) -> None:
        credentials = _credentials(credentials, root_certificates)
        self.channel = grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)
        self.stub = generation_pb2_grpc.GenerationStub(self.channel)
        self.metadata = _metadata(api_key)

    def stream(self, prompt: str | list[int], timeout: float | None = None, **kwargs) -> Iterator[gen_pb.GenerateResponse]:
        return self.stub.Generate(build_request(prompt, **kwargs), timeout=timeout, metadata=self.metadata)

    def complete(self, prompt: str | list[int], timeout: float | None = None, **kwargs) -> Completion:
        return collect(self.stream(prompt, timeout=timeout, **kwargs))

    def model_info(self) -> gen_pb.ModelInfo:
        return self.stub.GetModelInfo(gen_pb.ModelInfoRequest(), metadata=self.metadata)

    def close(self) -> None:
        self.channel.close()


class AsyncClient:
    """asyncio client: ``await AsyncClient(target).complete(...)`` or ``async for r in client.stream(...)``.

    Takes ``api_key`` and ``root_certificates`` as Client does.
    """

    def __init__(self, target: str, credentials: grpc.ChannelCredentials | None = None, *, api_key: str | None = None,
                 root_certificates: bytes | str | Path | None = None) -> None:
        credentials = _credentials(credentials, root_certificates)
        self.channel = grpc.aio.secure_channel(target, credentials) if credentials else grpc.aio.insecure_channel(target)
        self.stub = generation_pb2_grpc.GenerationStub(self.channel)
        self.metadata = _metadata(api_key)

    def stream(self, prompt: str | list[int], timeout: float | None = None, **kwargs) -> AsyncIterator[gen_pb.GenerateResponse]:
        return self.stub.Generate(build_request(prompt, **kwargs), timeout=timeout, metadata=self.metadata)

    async def complete(self, prompt: str | list[int], timeout: float | None = None, **kwargs) -> Completion:
        return collect([r async for r in self.stream(prompt, timeout=timeout, **kwargs)])

    async def close(self) -> None:
        await self.channel.close()


def stream_to_terminal(args) -> int:
    client = Client(args.target)
    final = None
    try:
        for r in client.stream(args.prompt, max_tokens=args.max_tokens, temperature=args.temperature, ignore_eos=args.ignore_eos):
            if r.HasField("delta"):
                sys.stdout.write(r.delta.text)
                sys.stdout.flush()
            else:
                final = r.final
    except grpc.RpcError as e:
        print(flush=True)  # the text so far ends its line, on stdout like the text
        print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    print(flush=True)  # a shell prompt or a file's last line after the text, not on it
    u = final.usage
    print(f"[{FINISH_NAMES.get(final.finish_reason)}; {u.prompt_tokens} prompt + {u.completion_tokens} completion tokens]", file=sys.stderr)
    return 0
