"""Serving: an OpenAI-compatible HTTP server (`sage-jax serve`) and a terminal chat (`sage-jax chat`).

    from sage_jax.serve import make_server
    srv = make_server(policy, "127.0.0.1", 0, max_batch=8, max_queue=64).start()
    srv.url   # http://127.0.0.1:PORT/v1 -> openai.OpenAI(base_url=srv.url, api_key="x")
"""

from sage_jax.serve.engine import EngineConfig, SlotEngine
from sage_jax.serve.protocol import ApiError, ChatRequest, Overloaded
from sage_jax.serve.server import SageServer, ServerLimits, make_server

__all__ = ["ApiError", "ChatRequest", "EngineConfig", "Overloaded", "SageServer", "ServerLimits", "SlotEngine",
           "make_server"]
