"""`sage-jax serve` (OpenAI-compatible HTTP server) and `sage-jax chat` (terminal chat)."""

from __future__ import annotations

import dataclasses

from sage_jax import parallel

__all__ = ["register", "ServeConfig", "serve"]


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    """`sage-jax serve`: an OpenAI-compatible HTTP server over a model."""

    model: str | None = None  # smollm2, an HF directory or a training run directory (required)
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 8  # requests per batched generation
    max_queue: int = 64  # queued requests before answering 503
    max_tokens: int = 256  # default max_tokens of a request
    template: str | None = None  # chat template name (default: the tokenizer's)
    verbose: bool = False  # log every HTTP request
    # Layout on this process's devices (default one device); e.g. mesh.data=4 mesh.tensor=2: batched
    # requests' rows over data, params by the rule table.
    mesh: parallel.MeshConfig = parallel.SINGLE_DEVICE


def serve(cfg: ServeConfig) -> int:
    import signal
    import threading

    from sage_jax.rollout.policy import load_policy
    from sage_jax.serve.server import make_server

    if not cfg.model:
        raise ValueError("serve: --model is required (model=smollm2, an HF directory or a run directory)")
    policy = load_policy(cfg.model, template=cfg.template, mesh=cfg.mesh)
    srv = make_server(policy, cfg.host, cfg.port, max_batch=cfg.max_batch, max_queue=cfg.max_queue,
                      default_max_tokens=cfg.max_tokens, verbose=cfg.verbose)
    stop = threading.Event()

    def on_signal(signum, frame):  # noqa: ARG001
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    srv.start()
    print(f"serving {srv.model_name} at {srv.url} (max_batch={cfg.max_batch}, max_queue={cfg.max_queue})",
          flush=True)
    stop.wait()
    print("shutting down", flush=True)
    srv.close()
    return 0


def register(sub) -> None:
    from sage_jax.config import add_config_command

    add_config_command(sub, "serve", "sage_jax.serve.cli:ServeConfig:serve",
                       help="an OpenAI-compatible HTTP server over a model (batched, latent pinning)",
                       description="POST /v1/chat/completions, GET /v1/models; the `sage` extension field "
                                   "{pin: {...}, return_latents: true} steers and returns latents.",
                       example="--model smollm2 --port 8000 max_batch=16",
                       flags={"--model": "model MODEL", "--host": "host HOST", "--port": "port PORT",
                              "--max-batch": "max_batch N", "--max-queue": "max_queue N",
                              "--max-tokens": "max_tokens N", "--template": "template NAME",
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
