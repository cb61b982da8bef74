"""Rollouts: the sampler (prefill + compiled decode loop, prefix sharing) and beam search.

    from sage_jax import model, rollout
    cfg, params = model.load_hf(hf_dir)
    gens = rollout.generate(cfg, params, [ids_a, ids_b], rollout.SamplingParams.paper(), seed=0)
    gens[0].tokens, gens[0].finish_reason          # "stop" | "length" | "cache_full"
    hyps = rollout.beam_search(cfg, params, [ids_a], num_beams=4, length_penalty=0.8)
    hyps[0][0].tokens, hyps[0][0].score            # n-best per prompt, best first
"""

from sage_jax.rollout.beam import BeamHypothesis, beam_search
from sage_jax.rollout.sampler import (
    Generation,
    SamplerState,
    append,
    bucket,
    decode,
    generate,
    generate_branches,
    prefill,
    repeat_cache,
)
from sage_jax.rollout.sampling import Processing, SamplingParams, apply_repetition_penalty, process_logits

__all__ = [
    "BeamHypothesis", "Generation", "Processing", "SamplerState", "SamplingParams", "append",
    "apply_repetition_penalty", "beam_search", "bucket", "decode", "generate", "generate_branches",
    "prefill", "process_logits", "repeat_cache",
]
