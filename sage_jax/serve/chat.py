"""`sage-jax chat`: an interactive terminal chat with a model (HF dir, training run dir or smollm2).

Each turn is generated with :func:`sage_jax.rollout.steer.steer`; the whole reply is printed once
generated (no token-by-token streaming), followed (unless toggled off with ``/latents``) by the
inferred user state and the chosen assistant action. Commands:

    /latents              show/hide the latents of each turn
    /pin KEY=VALUE        pin a latent field for the next turn (e.g. a_motivation=humour,
                          a_topic=[exam, school]); several /pin lines accumulate
    /unpin                drop the pins
    /reset                start a new conversation
    /help                 this list
    /quit                 exit (so does end of input)

    sage-jax chat --model smollm2 temperature=0 < script.txt
    python -m sage_jax.serve.chat --model smollm2 < script.txt
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import TextIO

from sage_jax.rollout.sampling import SamplingParams
from sage_jax.rollout.steer import check_pins, steer

__all__ = ["ChatSession", "ChatConfig", "chat", "parse_pin", "run_chat", "main", "HELP"]

HELP = """commands: /latents (toggle latents), /pin KEY=VALUE (pin a field for the next turn),
/unpin, /reset, /help, /quit"""


def parse_pin(arg: str) -> dict:
    """``a_motivation=humour`` -> {"a_motivation": "humour"}; topics: ``a_topic=[x, y]`` or ``x,y``;
    ``null`` -> None. Raises ValueError on a bad key or missing ``=``."""
    if "=" not in arg:
        raise ValueError("usage: /pin KEY=VALUE (e.g. /pin a_motivation=humour)")
    key, value = (s.strip() for s in arg.split("=", 1))
    v: object = value
    if key.endswith("topic"):
        inner = value[1:-1] if value.startswith("[") and value.endswith("]") else value
        v = [t.strip() for t in inner.split(",") if t.strip()]
    elif value == "null":
        v = None
    return check_pins({key: v})


def _fmt_latent(lat) -> str:
    if lat is None:
        return "(missing)"
    topics = ", ".join(lat.topic)
    return f"motivation={lat.motivation}, emotion={lat.emotion}, topic=[{topics}]"


class ChatSession:
    """The conversation state of a chat: history, pins for the next turn, latent display."""

    def __init__(self, policy, sampling: SamplingParams, *, system: str | None = None, seed: int = 0):
        self.policy, self.sampling, self.system, self.seed = policy, sampling, system, seed
        self.show_latents = True
        self.pins: dict = {}
        self.history: list[dict] = []
        self.turns = 0

    def reset(self) -> None:
        self.history, self.pins = [], {}

    def messages(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history

    def turn(self, user_text: str):
        """Generate the assistant turn for ``user_text`` (consumes the pins); returns the Steered."""
        self.history.append({"role": "user", "content": user_text})
        pins, self.pins = self.pins, {}
        out = steer(self.policy, [self.messages()], [pins or None], self.sampling, seed=self.seed,
                    row_seeds=[self.seed + self.turns])[0]
        self.turns += 1
        # keep the raw text (latents included) in the history: the model conditions on its latents
        self.history.append({"role": "assistant", "content": out.content})
        return out


def run_chat(session: ChatSession, stdin: TextIO, stdout: TextIO) -> int:
    """The read-eval-print loop; returns the exit status."""
    interactive = hasattr(stdin, "isatty") and stdin.isatty()

    def say(s: str = "") -> None:
        stdout.write(s + "\n")
        stdout.flush()

    say(f"chatting with {session.policy.name or 'the model'}; /help for commands")
    while True:
        if interactive:
            stdout.write("you> ")
            stdout.flush()
        line = stdin.readline()
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            cmd, _, arg = line.partition(" ")
            if cmd in ("/quit", "/exit"):
                break
            if cmd == "/help":
                say(HELP)
            elif cmd == "/latents":
                session.show_latents = not session.show_latents
                say(f"[latents {'on' if session.show_latents else 'off'}]")
            elif cmd == "/pin":
                try:
                    session.pins.update(parse_pin(arg))
                except ValueError as e:
                    say(f"[error: {e}]")
                else:
                    say(f"[pinned for the next turn: {session.pins}]")
            elif cmd == "/unpin":
                session.pins = {}
                say("[pins cleared]")
            elif cmd == "/reset":
                session.reset()
                say("[new conversation]")
            else:
                say(f"[unknown command {cmd}; /help]")
            continue
        out = session.turn(line)
        if session.show_latents:
            say(f"  [user state] {_fmt_latent(out.state)}")
            say(f"  [action]     {_fmt_latent(out.action)}")
        reply = out.reply.strip() if (out.state is not None or out.action is not None) else out.content.strip()
        say(f"assistant> {reply}")
    say("[bye]")
    return 0


@dataclasses.dataclass(frozen=True)
class ChatConfig:
    """`sage-jax chat`: the model and the sampling of its replies."""

    model: str | None = None  # smollm2, an HF directory or a training run directory (required)
    max_new_tokens: int = 256  # per reply (latents included)
    temperature: float = 0.7  # 0 = greedy
    top_p: float = 0.9
    system: str | None = None  # optional system prompt
    seed: int = 0
    template: str | None = None  # chat template name (default: the tokenizer's)


def chat(cfg: ChatConfig) -> int:
    """Chat on stdin/stdout until /quit or end of input."""
    from sage_jax.rollout.policy import load_policy

    if not cfg.model:
        raise ValueError("chat: --model is required (model=smollm2, an HF directory or a run directory)")
    policy = load_policy(cfg.model, template=cfg.template)
    sp = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens)
    session = ChatSession(policy, sp, system=cfg.system, seed=cfg.seed)
    return run_chat(session, sys.stdin, sys.stdout)


def add_args(p: argparse.ArgumentParser) -> None:
    d = ChatConfig()
    p.add_argument("--model", required=True, help="smollm2, an HF directory or a training run directory")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="per reply (latents included)")
    p.add_argument("--temperature", type=float, default=d.temperature, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=d.top_p)
    p.add_argument("--system", default=d.system, help="optional system prompt")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--template", default=d.template, help="chat template name (default: the tokenizer's)")


def run_from_args(args: argparse.Namespace) -> int:
    return chat(ChatConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ChatConfig)
                              if hasattr(args, f.name)}))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sage-jax chat", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(p)
    return run_from_args(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
