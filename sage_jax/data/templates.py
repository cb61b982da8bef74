"""Chat templates: the model's own (default) or a built-in one selected by name.

A built-in template is a jinja string plus the special tokens it writes and the token that closes
an assistant turn (the end-of-turn token, supervised by the SFT loss and used to stop generation).
`apply_template` installs one on any tokenizer (adding missing special tokens, so the model's
embedding and head must then grow to ``len(tokenizer)``). The literals (``<s>``, ``<|eot_id|>``...)
are written into the jinja instead of ``bos_token``/``eos_token`` so a template renders the same
whatever the tokenizer calls its bos/eos.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TEMPLATES", "ChatTemplate", "apply_template", "end_of_turn_token", "resolve_template"]


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    jinja: str
    special_tokens: tuple[str, ...]  # every control token the jinja writes
    end_of_turn: str  # closes an assistant turn; supervised, becomes the tokenizer's eos
    bos: str | None = None


# ChatML as SmolLM2/Qwen write it, without SmolLM2's injected default system prompt.
CHATML = ChatTemplate(
    name="chatml",
    jinja=(
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    special_tokens=("<|im_start|>", "<|im_end|>"),
    end_of_turn="<|im_end|>",
)

# Mistral-7B-Instruct-v0.1 / Mixtral-8x7B-Instruct-v0.1 ("[INST] user [/INST] assistant</s>"), the
# paper's reference. A system prompt is prepended to the first user message. The space before the
# reply matters for byte-level BPE: "[/INST]{" would merge "]{" into one token straddling the
# template and the reply; " {" keeps the template's last token ("]") whole, and the space rides on
# the first reply token exactly like SentencePiece's "▁" does for the real Mistral.
MISTRAL = ChatTemplate(
    name="mistral",
    jinja=(
        "{% if messages[0]['role'] == 'system' %}"
        "{% set system_message = messages[0]['content'] %}{% set loop_messages = messages[1:] %}"
        "{% else %}{% set loop_messages = messages %}{% endif %}"
        "{{ '<s>' }}"
        "{% for message in loop_messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('mistral template: after an optional system message, roles must alternate "
        "user/assistant/user/...') }}"
        "{% endif %}"
        "{% if message['role'] == 'user' %}"
        "{% if loop.first and system_message is defined %}"
        "{{ '[INST] ' + system_message + '\n\n' + message['content'] + ' [/INST]' }}"
        "{% else %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% endif %}"
        "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + '</s>' }}"
        "{% else %}{{ raise_exception('mistral template: only user/assistant roles after the system message') }}"
        "{% endif %}"
        "{% endfor %}"
    ),
    special_tokens=("<s>", "</s>"),
    end_of_turn="</s>",
    bos="<s>",
)

# Llama-3-Instruct, as Meta writes it (including `| trim` of every message's content).
LLAMA3 = ChatTemplate(
    name="llama3",
    jinja=(
        "{{ '<|begin_of_text|>' }}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
        " + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    special_tokens=("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    end_of_turn="<|eot_id|>",
    bos="<|begin_of_text|>",
)

TEMPLATES: dict[str, ChatTemplate] = {t.name: t for t in (CHATML, MISTRAL, LLAMA3)}


def _get(name: str) -> ChatTemplate:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown chat template {name!r}; built-in: {sorted(TEMPLATES)}") from None


def apply_template(tokenizer, name: str) -> int:
    """Install built-in template `name` on `tokenizer` (in place); return how many tokens were added.

    Missing control tokens are added as special tokens (never split, never normalised), the
    end-of-turn token becomes ``eos_token`` (and the template's bos, if any, ``bos_token``). Grow the
    model's vocabulary to ``len(tokenizer)`` when the return value is > 0.
    """
    from tokenizers import AddedToken

    spec = _get(name)
    vocab = tokenizer.get_vocab()
    missing = [t for t in spec.special_tokens if t not in vocab]
    added = tokenizer.add_tokens(
        [AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True
    )
    tokenizer.chat_template = spec.jinja
    tokenizer.eos_token = spec.end_of_turn
    if spec.bos is not None:
        tokenizer.bos_token = spec.bos
    return added


def resolve_template(tokenizer, template: str | None = None) -> tuple[str, str]:
    """Return ``(jinja, end_of_turn)`` for `template`: None = the tokenizer's own chat template,
    a built-in name, or a raw jinja string (then the end-of-turn token is the tokenizer's eos)."""
    if template is None or "{{" in template or "{%" in template:
        jinja = template if template is not None else tokenizer.chat_template
        if not jinja:
            raise ValueError("tokenizer has no chat_template; pass a built-in name or call apply_template")
        return jinja, end_of_turn_token(tokenizer, jinja)
    spec = _get(template)
    # Without its control tokens in the vocabulary, '</s>' etc. would be tokenized as plain text.
    vocab = tokenizer.get_vocab()
    missing = [t for t in spec.special_tokens if t not in vocab]
    if missing:
        raise ValueError(f"tokenizer lacks {missing} of template {template!r}; call apply_template first")
    return spec.jinja, spec.end_of_turn


def end_of_turn_token(tokenizer, jinja: str | None = None) -> str:
    """The token that closes an assistant turn under `jinja` (default: the tokenizer's template)."""
    jinja = jinja if jinja is not None else tokenizer.chat_template
    for spec in TEMPLATES.values():
        if jinja == spec.jinja:
            return spec.end_of_turn
    if tokenizer.eos_token is None:
        raise ValueError("cannot tell the end-of-turn token: tokenizer has no eos_token")
    return tokenizer.eos_token
