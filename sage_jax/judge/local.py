"""The ``local:`` judge backend: a model of ours (``smollm2``, an HF directory or a training run
directory, loaded by :mod:`sage_jax.model.loader`) generating with :func:`sage_jax.rollout.generate`.

Imported by :func:`sage_jax.judge.make_judge` only for a ``local:`` spec, so the other backends
never load JAX.
"""

from __future__ import annotations

import json
import logging
import os

from sage_jax import parallel, rollout
from sage_jax.judge.base import CachingJudge, Completion
from sage_jax.model import loader, param_axes

log = logging.getLogger("sage_jax.judge")


def _identity(path: str, loaded_name: str) -> str:
    """The cache identity of a local model: the loader's name (a run directory's checkpoint step)
    and the sizes and modification times of the directory's files (an overwritten model is new)."""
    files = []
    if os.path.isdir(path):
        files = sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(path) if e.is_file())
    return json.dumps({"name": loaded_name, "files": files})


class LocalJudge(CachingJudge):
    """``local:PATH``: each prompt becomes one user message through the tokenizer's chat template
    (with the generation prompt); sampling uses the call's temperature / max_tokens / seed (seed
    None = 0). A failed generation batch is recorded as an error on each of its prompts.
    """

    backend = "local"

    def __init__(self, path: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None, batch_size: int = 16,
                 mesh=None):
        super().__init__(cache_dir)
        expanded = os.path.expanduser(str(path))
        if expanded != "smollm2" and not os.path.isdir(expanded):
            raise FileNotFoundError(f"local judge: {expanded} is not a model directory")
        self.model = expanded if expanded == "smollm2" else os.path.realpath(expanded)
        self.name = f"local:{path}"
        self.batch_size = int(batch_size)
        self.cfg, self.params, self.tokenizer, loaded_name = loader.load(expanded)
        self.identity = _identity(expanded, loaded_name)
        # mesh (parallel.MeshConfig): lay the judge model out on this process's devices (None: as is)
        self.params = parallel.place_params(param_axes(self.cfg), self.params, mesh)

    def _ids(self, prompt: str) -> list[int]:
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                  add_generation_prompt=True)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _generate(self, prompts, params, done):
        sp = rollout.SamplingParams(temperature=params["temperature"], max_new_tokens=params["max_tokens"])
        out: list[Completion] = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = prompts[start:start + self.batch_size]
            self.stats.add(requests=1)
            try:
                gens = rollout.generate(self.cfg, self.params, [self._ids(p) for p in chunk], sp,
                                        seed=params["seed"] or 0, tokenizer=self.tokenizer)
                comps = [Completion(g.text if g.text is not None
                                    else self.tokenizer.decode(g.tokens, skip_special_tokens=True)) for g in gens]
            except Exception as e:  # noqa: BLE001 - a failed batch is recorded, never raised
                log.warning("%s: generation failed: %s", self.name, e)
                comps = [Completion(None, error=f"generation failed: {type(e).__name__}: {e}") for _ in chunk]
            for j, c in enumerate(comps):
                done(start + j, c)
            out += comps
        return out
