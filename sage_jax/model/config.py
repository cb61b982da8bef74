"""ModelConfig: one typed, hashable config for every supported decoder family.

It is passed to `jax.jit` as a static argument, so it is frozen and holds only hashable
values. `from_hf` / `to_hf` translate to and from Hugging Face `config.json` (transformers v5
writes `rope_parameters`; older files write `rope_theta` + `rope_scaling`: both are read).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Mapping

Family = Literal["llama", "mistral", "qwen2", "qwen3", "mixtral"]
FAMILIES: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3", "mixtral")
# How attention is computed (sage_jax.model.attention); not part of the HF config.json.
ATTENTION_IMPLS: tuple[str, ...] = ("auto", "xla", "cudnn", "splash", "splash_interpret", "jax_xla")

_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
}


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding: theta plus optional frequency scaling (HF `rope_parameters`)."""

    theta: float = 10000.0
    type: Literal["default", "linear", "llama3"] = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    family: Family = "llama"
    vocab_size: int = 32000  # the tokenizer's vocabulary (what HF export writes)
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 (and Llama with attention_bias)
    o_bias: bool = False  # Llama with attention_bias
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k, before RoPE
    sliding_window: int | None = None  # Mistral / Qwen: attend to the last `sliding_window` keys
    # Per-layer attention kind ("full_attention" | "sliding_attention"); None = every layer
    # uses `sliding_window` if set.
    layer_types: tuple[str, ...] | None = None
    num_experts: int = 0  # Mixtral: > 0 turns the MLP into a top-k MoE
    num_experts_per_tok: int = 2
    # How the MoE MLP is computed (sage_jax.model.moe): "auto" (grouped matmul on TPU/GPU, padded
    # expert blocks on CPU; "expert_parallel" under a mesh with expert > 1), "dense" (every expert on
    # every token), "ragged", "blocks", "expert_parallel" (all_to_all over the `expert` mesh axis).
    moe_dispatch: str = "auto"
    # How attention runs (sage_jax.model.attention): "auto" (splash on TPU, cuDNN on GPU for bf16
    # without a KV cache, else XLA), "xla", "cudnn", "splash", "splash_interpret", "jax_xla"; exact.
    attention_impl: str = "auto"
    # Rows of the embedding / head actually allocated: >= vocab_size, padded so the vocab
    # axis divides the mesh. The padding never reaches logits or exported files.
    padded_vocab_size: int | None = None
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype (bfloat16 on TPU/GPU)
    # Rematerialise each layer in the backward pass: "none", "full" or "dots" (keep matmuls).
    remat: Literal["none", "full", "dots"] = "none"
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"ModelConfig.family: {self.family!r} is not one of {FAMILIES}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig: num_heads={self.num_heads} is not a multiple of "
                f"num_kv_heads={self.num_kv_heads}"
            )
        if self.padded_vocab_size is not None and self.padded_vocab_size < self.vocab_size:
            raise ValueError("ModelConfig.padded_vocab_size must be >= vocab_size")
        if self.moe_dispatch not in ("auto", "dense", "ragged", "blocks", "expert_parallel"):
            raise ValueError("ModelConfig.moe_dispatch must be auto, dense, ragged, blocks or expert_parallel, "
                             f"got {self.moe_dispatch!r}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"ModelConfig.attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}")
        if self.layer_types is not None and len(self.layer_types) != self.num_layers:
            raise ValueError("ModelConfig.layer_types must have one entry per layer")

    @property
    def embed_rows(self) -> int:
        return self.padded_vocab_size or self.vocab_size

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def layer_windows(self) -> tuple[int, ...]:
        """Sliding window per layer; 0 = full attention."""
        win = self.sliding_window or 0
        if self.layer_types is None:
            return (win,) * self.num_layers
        return tuple(win if t == "sliding_attention" else 0 for t in self.layer_types)

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    # ---- Hugging Face config.json ------------------------------------------------------

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], *, source: str = "config.json", **overrides) -> "ModelConfig":
        family = hf.get("model_type")
        if family not in FAMILIES:
            raise ValueError(f"{source}: model_type={family!r} is not supported (one of {FAMILIES})")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: hidden_act={hf['hidden_act']!r}; only 'silu' is supported")
        if hf.get("mlp_bias"):
            raise ValueError(f"{source}: mlp_bias=true is not supported")
        heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
        rp = dict(hf.get("rope_parameters") or {})
        if not rp:  # transformers < 5
            rp = dict(hf.get("rope_scaling") or {})
            rp.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
        rtype = rp.get("rope_type", rp.get("type", "default"))
        if rtype not in ("default", "linear", "llama3"):
            raise ValueError(f"{source}: rope type {rtype!r} is not supported (default, linear, llama3)")
        rope = RopeConfig(
            theta=float(rp.get("rope_theta", 10000.0)),
            type=rtype,
            factor=float(rp.get("factor", 1.0)),
            low_freq_factor=float(rp.get("low_freq_factor", 1.0)),
            high_freq_factor=float(rp.get("high_freq_factor", 4.0)),
            original_max_position_embeddings=int(
                rp.get("original_max_position_embeddings", hf.get("max_position_embeddings", 8192))
            ),
        )
        attention_bias = bool(hf.get("attention_bias", False))
        sliding = hf.get("sliding_window")
        layer_types = hf.get("layer_types")
        if family in ("qwen2", "qwen3"):
            # Qwen writes a sliding_window but only uses it where layer_types says so.
            if not hf.get("use_sliding_window", False):
                sliding, layer_types = None, None
        if layer_types is not None and "sliding_attention" not in layer_types:
            layer_types = None
        eos = hf.get("eos_token_id")
        fields = dict(
            family=family,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope=rope,
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=family == "qwen2" or attention_bias,
            o_bias=attention_bias and family != "qwen2",
            qk_norm=family == "qwen3",
            sliding_window=sliding,
            layer_types=tuple(layer_types) if layer_types else None,
            num_experts=hf.get("num_local_experts", 0) if family == "mixtral" else 0,
            num_experts_per_tok=hf.get("num_experts_per_tok", 2),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            pad_token_id=hf.get("pad_token_id"),
            param_dtype=str(hf.get("dtype") or hf.get("torch_dtype") or "float32"),
        )
        fields.update(overrides)
        return cls(**fields)

    def to_hf(self) -> dict[str, Any]:
        """The config.json transformers needs to rebuild this model with no custom code."""
        rope: dict[str, Any] = {"rope_type": self.rope.type, "rope_theta": self.rope.theta}
        if self.rope.type in ("linear", "llama3"):
            rope["factor"] = self.rope.factor
        if self.rope.type == "llama3":
            rope.update(
                low_freq_factor=self.rope.low_freq_factor,
                high_freq_factor=self.rope.high_freq_factor,
                original_max_position_embeddings=self.rope.original_max_position_embeddings,
            )
        hf: dict[str, Any] = {
            "architectures": [_ARCHITECTURES[self.family]],
            "model_type": self.family,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": rope,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "dtype": self.param_dtype,
        }
        if self.family == "llama":
            hf["attention_bias"] = self.qkv_bias
        if self.family in ("mistral", "mixtral"):
            hf["sliding_window"] = self.sliding_window
        if self.family in ("qwen2", "qwen3"):
            hf["use_sliding_window"] = self.sliding_window is not None
            hf["sliding_window"] = self.sliding_window
            hf["layer_types"] = list(self.layer_types or (
                ("sliding_attention" if self.sliding_window else "full_attention",) * self.num_layers))
            if self.family == "qwen3":
                hf["attention_bias"] = self.qkv_bias
        if self.family == "mixtral":
            hf["num_local_experts"] = self.num_experts
            hf["num_experts_per_tok"] = self.num_experts_per_tok
        return hf
