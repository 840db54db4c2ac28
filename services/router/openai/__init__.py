"""The router's OpenAI-compatible HTTP API (completions, chat completions, models), over the gRPC request path."""

from splitserve.services.router.openai.app import build_app
from splitserve.services.router.openai.server import HttpServer

__all__ = ["HttpServer", "build_app"]
