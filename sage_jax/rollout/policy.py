"""A chat policy: model + tokenizer + chat template, loaded from an HF dir, `smollm2` or a run dir
(or, for `openai:MODEL@URL`, a model behind an OpenAI-compatible endpoint: rollout.endpoint)."""

from __future__ import annotations

import dataclasses
import typing
from typing import TYPE_CHECKING, Any, Literal, Sequence

from sage_jax import parallel
from sage_jax.model import decode_layout, loader, param_axes
from sage_jax.model.config import ModelConfig

if TYPE_CHECKING:
    from sage_jax.rollout.endpoint import EndpointPolicy


@dataclasses.dataclass
class Policy:
    cfg: ModelConfig
    params: Any
    tokenizer: Any
    template: str | None = None  # None: the tokenizer's own chat template
    name: str = ""

    def encode_chat(self, messages: Sequence[dict], *, prefill: str = "") -> list[int]:
        """Token ids of `messages` + the assistant generation prompt (+ `prefill`, text the
        assistant message starts with: pinned latent fields)."""
        from sage_jax.data.templates import resolve_template

        jinja, _ = resolve_template(self.tokenizer, self.template)
        text = self.tokenizer.apply_chat_template(list(messages), chat_template=jinja, tokenize=False,
                                                  add_generation_prompt=True)
        return list(self.tokenizer(text + prefill, add_special_tokens=False)["input_ids"])

    def decode(self, tokens: Sequence[int]) -> str:
        """Text of generated ids without the end-of-turn/eos token; other special tokens (the
        latent delimiters, when used) are kept."""
        eos = self.cfg.eos_token_id
        ends = set(eos) if isinstance(eos, tuple) else {eos}
        ends |= {self.tokenizer.eos_token_id, self.tokenizer.pad_token_id}
        return self.tokenizer.decode([t for t in tokens if t not in ends], skip_special_tokens=False)


Layout = Literal["stacked", "per_layer"]  # parameter layouts for generation (load_policy)
LAYOUTS = typing.get_args(Layout)


def load_policy(path: str, *, template: str | None = None, dtype: str | None = None,
                mesh=None, layout: Layout = "stacked") -> Policy | EndpointPolicy:
    """`smollm2`, an HF directory, or a training run directory (its best checkpoint when it recorded
    one, else its latest; RUN@best|@latest|@STEP; LoRA merged): see :func:`sage_jax.model.loader.load`. `openai:MODEL@URL`: an `EndpointPolicy` (vLLM, SGLang,
    `sage-jax serve`; template, dtype and mesh are the server's business and ignored here).

    mesh: a `parallel.MeshConfig` (or a Mesh) to lay the parameters out on this process's devices
    by the rule table; the sampler and beam search then run sharded (None / one device: as is).
    layout: "stacked" (one scan over the layers: quick to compile) or "per_layer"
    (`model.decode_layout`: faster decode steps on CPU, above all at small batch, but each program
    compiles ~4x longer: for long-running generation such as `serve` and `search`).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"load_policy: layout must be one of {LAYOUTS}, got {layout!r}")
    if isinstance(path, str) and path.startswith("openai:"):
        from sage_jax.rollout.endpoint import parse_endpoint_spec  # lazy: endpoint imports this module

        return parse_endpoint_spec(path)
    cfg, params, tokenizer, name = loader.load(path, dtype=dtype)
    params = parallel.place_params(param_axes(cfg), params, mesh)
    if layout == "per_layer":
        params = decode_layout(params)  # slices keep the placement (the layer axis is not split)
    return Policy(cfg, params, tokenizer, template, name)
