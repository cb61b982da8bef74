"""The paper's self-play game (SAGE.md §4): an assistant and a user simulator take turns.

- The assistant sees a persona exchange ("Who are you?" / a caring, humorous companion, with its
  own latent prefix), then the dialogue: user turns as text, its own turns with their latents.
- The user simulator is the same (or another) model with the roles flipped. Its context starts
  with the reference's preamble: the bot asks "Who are you?", the simulator answers with an
  all-null latent prefix and the persona "I am a real human and I know you are an AI. I say
  things very briefly.", the bot says "How's it going?" (`user_persona="system"`: the persona as
  a system message instead, the earlier behaviour). It never sees the assistant's latents; the
  user state the assistant inferred is injected as the simulator's own latent on the seed turn;
  its reply is trimmed as the reference does (`trim_user_reply`) and it sees its own turns as
  trimmed (with its latent prefix when it wrote one).
- Reply budgets do not count a latent prefix: a simulated user that writes one and runs out of
  tokens gets up to `rollout.budget.DEFAULT_ALLOWANCE` more, then is cut to the prefix + its budget.

Every step is batched across all live dialogues (one `rollout.generate` call per side per turn).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

from sage_jax.rollout.budget import DEFAULT_ALLOWANCE, cut_reply, needs_allowance
from sage_jax.rollout.endpoint import EndpointPolicy
from sage_jax.rollout.policy import Policy
from sage_jax.rollout.sampling import SamplingParams
from sage_jax.sac import DEFAULT_SCHEMA, Latent, Schema, Turn, parse_assistant_lenient, render_assistant, strip_latents

WHO_ARE_YOU = "Who are you?"
COMPANION = ("I'm your AI companion: caring, a little funny, and always happy to chat about whatever is on "
             "your mind.")
USER_PERSONA = "I am a real human and I know you are an AI. I say things very briefly."
USER_OPENER = "How's it going?"  # the bot's line after the persona exchange, before the seed

# The reference's marks: a question mark or one of these emoticons ends what a simulated user says.
_MARK = re.compile(r"\?|:-?\)|;-?\)|<3|:D|:P")
_SENTENCE_END = re.compile(r"[.!] ")


def trim_user_reply(text: str) -> str:
    """The reference's two-step trim (SAGE.md §4): (1) if the reply has a question mark or an
    emoticon, cut at the last sentence end (". " or "! ") before the first such mark, so the
    statements before a question stay and the question goes; (2) if what is left ends with a mark,
    cut right after the first one. A result of just "." keeps the untrimmed reply."""
    original = text.strip()
    out = original
    first = _MARK.search(out)
    if first:
        ends = [m.start() + 1 for m in _SENTENCE_END.finditer(out, 0, first.start())]
        if ends:
            out = out[: ends[-1]].strip()
    marks = list(_MARK.finditer(out))
    if marks and marks[-1].end() == len(out.rstrip()):
        out = out[: marks[0].end()].strip()
    return original if out == "." else out


def persona_messages(schema: Schema = DEFAULT_SCHEMA, special_tokens: bool = False) -> list[dict]:
    intro = render_assistant(Latent("curiosity", "neutral", ("identity",)),
                             Latent("introduce myself", "friendly", ("companionship",)), COMPANION, schema,
                             special_tokens=special_tokens)
    return [{"role": "user", "content": WHO_ARE_YOU}, {"role": "assistant", "content": intro}]


@dataclasses.dataclass
class Episode:
    """One dialogue in progress: SAC turns plus what each side has seen."""

    id: str
    seed: str
    turns: list[Turn]
    assistant_view: list[dict]  # chat messages as the assistant sees them (its raw latents kept)
    user_view: list[dict]  # chat messages as the simulator sees them (roles flipped, no latents)
    done: bool = False
    note: str = ""
    key: str = ""  # its rows in the KV-cache pools (default: id; a beam of a tree search: id#bN)

    def __post_init__(self):
        self.key = self.key or self.id

    def fork(self, key: str) -> "Episode":
        """An independent copy under another pool key (a beam or a lookahead future)."""
        return dataclasses.replace(self, turns=list(self.turns), assistant_view=[dict(m) for m in self.assistant_view],
                                   user_view=[dict(m) for m in self.user_view], key=key)

    @classmethod
    def start(cls, id: str, seed: str, schema: Schema = DEFAULT_SCHEMA, special_tokens: bool = False,
              user_persona: str = "turn") -> "Episode":
        """user_persona: "turn" (the reference: the persona is the simulator's answer to "Who are
        you?", with an all-null latent prefix) or "system" (a system message)."""
        if user_persona == "turn":
            persona = [{"role": "user", "content": WHO_ARE_YOU},
                       {"role": "assistant", "content": render_assistant(Latent(), Latent(), USER_PERSONA, schema,
                                                                         special_tokens=special_tokens)}]
        elif user_persona == "system":
            persona = [{"role": "system", "content": USER_PERSONA}]
        else:
            raise ValueError(f"user_persona: expected 'turn' or 'system', got {user_persona!r}")
        return cls(id, seed, [Turn("user", seed)], persona_messages(schema, special_tokens) +
                   [{"role": "user", "content": seed}],
                   persona + [{"role": "user", "content": USER_OPENER}, {"role": "assistant", "content": seed}])

    def add_assistant(self, content: str, schema: Schema = DEFAULT_SCHEMA) -> tuple[Latent | None, Latent | None, str]:
        """Append the assistant's generated message: latents go to the SAC turns (the inferred
        state onto the user turn it answers), the raw content to its own view, the stripped reply
        to the simulator's view. Returns (state, action, reply)."""
        parsed = parse_assistant_lenient(content, schema)
        state, action, reply = parsed.state, parsed.action, parsed.reply.strip()
        if state is None or action is None:  # a half-parsed prefix: keep neither (SAC needs both)
            state = action = None
            reply = strip_latents(content, schema).strip()
        self.turns[-1] = dataclasses.replace(self.turns[-1], state=state)
        self.turns.append(Turn("assistant", reply, action=action))
        self.assistant_view.append({"role": "assistant", "content": content})
        self.user_view.append({"role": "user", "content": reply})
        if len(self.turns) == 2 and state is not None:
            # Seed-state injection: the simulator's own seed turn carries the inferred user state.
            seed_msg = render_assistant(Latent(), state, self.seed, schema)
            i = next(i for i, m in enumerate(self.user_view) if m["role"] == "assistant" and m["content"] == self.seed)
            self.user_view[i] = {"role": "assistant", "content": seed_msg}
        return state, action, reply

    def add_user(self, raw: str, schema: Schema = DEFAULT_SCHEMA) -> str:
        """Append the simulator's reply, trimmed; the simulator sees it as trimmed too (after its
        own latent prefix when it wrote a whole one)."""
        parsed = parse_assistant_lenient(raw, schema)
        text = trim_user_reply(strip_latents(raw, schema))
        if not text:
            self.done, self.note = True, "the user simulator produced an empty reply"
            return ""
        self.turns.append(Turn("user", text))
        self.assistant_view.append({"role": "user", "content": text})
        own = (render_assistant(parsed.state, parsed.action, text, schema)
               if parsed.state is not None and parsed.action is not None else text)
        self.user_view.append({"role": "assistant", "content": own})
        return text


def user_turns(sim: Policy | EndpointPolicy, episodes: Sequence[Episode], sampling: SamplingParams, seed: int,
               pool=None) -> None:
    """One simulated user reply for every live episode, batched. With a `DialoguePool`
    (rollout.dialogue_cache) each episode keeps its simulator cache across turns and only the new
    tokens are prefilled; an episode whose history no longer fits it ends (note "cache full").
    An `EndpointPolicy` simulator (no cache here: pool must be None): one `chat` call, n=1 each."""
    live = [e for e in episodes if not e.done]
    if not live:
        return
    if isinstance(sim, EndpointPolicy):
        if pool is not None:
            raise ValueError("user_turns: an endpoint simulator keeps no KV cache here (pass pool=None)")
        got = sim.chat([e.user_view for e in live], sampling, n=1, seed=seed)
        for e, (c,) in zip(live, got):
            e.add_user(c.content)
        return
    if pool is not None:
        full = set(pool.sync({e.key: sim.encode_chat(e.user_view) for e in live}))
        for e in live:
            if e.key in full:
                e.done, e.note = True, "cache full: the user simulator's history does not fit max_cache_len"
        live = [e for e in live if not e.done]
        got = pool.generate({e.key: sampling for e in live}, seed=seed)
        toks = {e.key: got[e.key][0] for e in live}
        # a latent prefix does not count in the budget: continue the rows that ran out in or after one
        more = [e for e in live if needs_allowance(sim.decode, toks[e.key], got[e.key][1])]
        if more:
            pool.sync({e.key: sim.encode_chat(e.user_view) + toks[e.key] for e in more})
            extra = pool.generate({e.key: sampling.replace(max_new_tokens=DEFAULT_ALLOWANCE) for e in more},
                                  seed=seed + 1)
            for e in more:
                toks[e.key] = cut_reply(sim.decode, toks[e.key] + extra[e.key][0], sampling.max_new_tokens)[0]
        for e in live:
            e.add_user(sim.decode(toks[e.key]))
        return
    from sage_jax import rollout

    prompts = [sim.encode_chat(e.user_view) for e in live]
    gens = rollout.generate(sim.cfg, sim.params, prompts, sampling, seed=seed, tokenizer=sim.tokenizer)
    toks = [g.tokens for g in gens]
    more = [i for i, g in enumerate(gens) if needs_allowance(sim.decode, g.tokens, g.finish_reason)]
    if more:
        again = rollout.generate(sim.cfg, sim.params, [prompts[i] for i in more],
                                 sampling.replace(max_new_tokens=sampling.max_new_tokens + DEFAULT_ALLOWANCE),
                                 seed=seed, tokenizer=sim.tokenizer)
        for i, g in zip(more, again):
            toks[i] = cut_reply(sim.decode, g.tokens, sampling.max_new_tokens)[0]
    for e, t in zip(live, toks):
        e.add_user(sim.decode(t))

