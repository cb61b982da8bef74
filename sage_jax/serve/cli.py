"""`sage-jax serve` (OpenAI-compatible HTTP server) and `sage-jax chat` (terminal chat)."""

from __future__ import annotations

import dataclasses

from sage_jax import parallel
from sage_jax.rollout.policy import Layout
from sage_jax.serve.server import API_KEY_ENV, ServerLimits

__all__ = ["register", "ServeConfig", "serve"]


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """`sage-jax serve`: an OpenAI-compatible HTTP server over a model."""

    model: str | None = None  # smollm2, an HF directory or a training run directory (required)
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 8  # cache slots: rows decoding at once (continuous batching)
    max_queue: int = 64  # queued requests before answering 503
    max_tokens: int = 256  # default max_tokens of a request
    max_tokens_limit: int = 2048  # a request's max_tokens is clamped to this
    max_model_len: int | None = None  # tokens per slot, prompt + reply (default: min(model's, 2048))
    decode_steps: int = 4  # decode steps between admissions and stream flushes
    # Parameter layout for generation (see rollout.load_policy): per_layer decodes faster on CPU,
    # compiles slower: a server compiles a few programs once.
    layout: Layout = "per_layer"
    # Bearer key every /v1 route needs (401 otherwise); default: the SAGE_JAX_API_KEY environment
    # variable (preferred: a key on the command line shows in the process list).
    api_key: str | None = None
    limits: ServerLimits = ServerLimits()  # body size, header/body/request timeouts, connections
    template: str | None = None  # chat template name (default: the tokenizer's)
    verbose: bool = False  # log every HTTP request
    # Layout on this process's devices (default one device); e.g. mesh.data=4 mesh.tensor=2: batched
    # requests' rows over data, params by the rule table.
    mesh: parallel.MeshConfig = parallel.SINGLE_DEVICE


def serve(cfg: ServeConfig) -> int:
    import logging

    from sage_jax.rollout.policy import load_policy
    from sage_jax.serve.server import make_server

    if not cfg.model:
        raise ValueError("serve: --model is required (model=smollm2, an HF directory or a run directory)")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    policy = load_policy(cfg.model, template=cfg.template, mesh=cfg.mesh, layout=cfg.layout)
    srv = make_server(policy, cfg.host, cfg.port, max_batch=cfg.max_batch, max_queue=cfg.max_queue,
                      default_max_tokens=cfg.max_tokens, max_tokens_limit=cfg.max_tokens_limit,
                      max_model_len=cfg.max_model_len, decode_steps=cfg.decode_steps, limits=cfg.limits,
                      api_key=cfg.api_key, verbose=cfg.verbose)
    auth = "API key required" if srv.api_key else f"no API key (--api-key or {API_KEY_ENV})"
    print(f"serving {srv.model_name} at {srv.url} (max_batch={cfg.max_batch}, max_queue={cfg.max_queue}, {auth})",
          flush=True)
    # Until SIGINT/SIGTERM: uvicorn stops accepting, gives running requests up to 5 s, then
    # re-raises the signal (the exit status says which).
    srv.serve_forever()
    return 0


def register(sub) -> None:
    from sage_jax.config import add_config_command

    add_config_command(sub, "serve", "sage_jax.serve.cli:ServeConfig:serve",
                       help="an OpenAI-compatible HTTP server over a model (continuous batching, latent pinning)",
                       description="POST /v1/chat/completions, GET /v1/models, GET /health, GET /v1/stats; the "
                                   "`sage` extension field {pin: {...}, return_latents: true} steers and returns "
                                   "latents.",
                       example="--model smollm2 --port 8000 max_batch=16",
                       flags={"--model": "model MODEL", "--host": "host HOST", "--port": "port PORT",
                              "--max-batch": "max_batch N", "--max-queue": "max_queue N",
                              "--max-tokens": "max_tokens N", "--template": "template NAME",
                              "--max-model-len": "max_model_len N", "--api-key": "api_key KEY",
                              "--layout": "layout NAME",
                              "--verbose": "+verbose"})
    add_config_command(sub, "chat", "sage_jax.serve.chat:ChatConfig:chat",
                       help="interactive terminal chat showing the latents; /pin, /latents, /reset, /quit",
                       description="A terminal chat: prints the inferred user state and chosen action of every "
                                   "turn; /latents toggles them, /pin a_motivation=humour pins an action field "
                                   "for the next turn, /unpin, /reset, /quit.",
                       example="--model smollm2 temperature=0 max_new_tokens=128",
                       flags={"--model": "model MODEL", "--max-new-tokens": "max_new_tokens N",
                              "--temperature": "temperature T", "--top-p": "top_p P", "--system": "system TEXT",
                              "--seed": "seed S", "--template": "template NAME"})
