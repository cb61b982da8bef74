"""`sage-jax serve` (OpenAI-compatible HTTP server) and `sage-jax chat` (terminal chat)."""

from __future__ import annotations

import argparse


def _serve(args: argparse.Namespace) -> int:
    import signal
    import threading

    from sage_jax.rollout.policy import load_policy
    from sage_jax.serve.server import make_server

    policy = load_policy(args.model, template=args.template)
    srv = make_server(policy, args.host, args.port, max_batch=args.max_batch, max_queue=args.max_queue,
                      default_max_tokens=args.max_tokens, verbose=args.verbose)
    stop = threading.Event()

    def on_signal(signum, frame):  # noqa: ARG001
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    srv.start()
    print(f"serving {srv.model_name} at {srv.url} (max_batch={args.max_batch}, max_queue={args.max_queue})",
          flush=True)
    stop.wait()
    print("shutting down", flush=True)
    srv.close()
    return 0


def _chat(args: argparse.Namespace) -> int:
    from sage_jax.serve.chat import run_from_args

    return run_from_args(args)


def register(sub) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server over a model (batched, latent pinning)",
                       description="POST /v1/chat/completions, GET /v1/models; the `sage` extension field "
                                   "{pin: {...}, return_latents: true} steers and returns latents.")
    p.add_argument("--model", required=True, help="smollm2, an HF directory or a training run directory")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=8, help="requests per batched generation")
    p.add_argument("--max-queue", type=int, default=64, help="queued requests before answering 503")
    p.add_argument("--max-tokens", type=int, default=256, help="default max_tokens of a request")
    p.add_argument("--template", default=None, help="chat template name (default: the tokenizer's)")
    p.add_argument("--verbose", action="store_true", help="log every HTTP request")
    p.set_defaults(func=_serve)

    from sage_jax.serve.chat import add_args

    c = sub.add_parser("chat", help="interactive terminal chat showing the latents; /pin, /latents, /reset, /quit")
    add_args(c)
    c.set_defaults(func=_chat)
