"""Reply budgets that do not count the latent prefix (rollout.budget; issue: a SAC model's reply
keeps its full budget after the prefix)."""

import functools
from pathlib import Path

import pytest

from sage_jax.eval.generation import ModelChat
from sage_jax.rollout.budget import cut_reply, prefix_length
from sage_jax.rollout.sampler import Generation

EQ_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "eq_bench"
SAC = ("{u_motivation: venting, u_emotion: sad, u_topic: [exam]} {a_motivation: sympathizing, a_emotion: caring, "
       "a_topic: [exam]} Oh no, that sounds really hard. What happened in the exam, do you know?")


@functools.lru_cache(maxsize=None)
def _tok(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def test_prefix_length_and_cut_on_the_real_tokenizer(smollm2_dir):
    tok = _tok(str(smollm2_dir))
    dec = tok.decode
    ids = tok(SAC, add_special_tokens=False)["input_ids"]
    n = prefix_length(dec, ids)
    assert dec(ids[:n]).endswith("a_topic: [exam]}") and dec(ids[n:]).startswith(" Oh no")
    kept, cut = cut_reply(dec, ids, 5)
    assert cut and kept == ids[:n + 5]
    assert cut_reply(dec, ids, 500) == (ids, False)
    plain = tok("Oh no, that sounds hard.", add_special_tokens=False)["input_ids"]
    assert prefix_length(dec, plain) == 0 and cut_reply(dec, plain, 3) == (plain[:3], True)
    assert prefix_length(dec, ids[: n - 1]) == 0  # an unclosed action block is no prefix


class _Scripted:
    """A stand-in policy that writes a fixed message token by token (what a SAC model would)."""

    name = "scripted"

    def __init__(self, tok, text):
        self.tok, self.ids = tok, tok(text, add_special_tokens=False)["input_ids"]

    def encode_chat(self, conv):
        return [1, 2, 3]

    def decode(self, tokens):
        return self.tok.decode(tokens)


class _ScriptedChat(ModelChat):
    def generate_ids(self, prompts, temps, max_tokens, seed, row_seeds):
        out = self.policy.ids[:max_tokens]
        return [Generation(list(out), "length" if len(out) < len(self.policy.ids) else "stop") for _ in prompts]


def test_sac_reply_keeps_its_full_budget_after_the_prefix(smollm2_dir):
    tok = _tok(str(smollm2_dir))
    policy = _Scripted(tok, SAC)
    reply_ids = tok(" Oh no, that sounds really", add_special_tokens=False)["input_ids"]
    budget = len(reply_ids)
    got = _ScriptedChat(policy).chat([[{"role": "user", "content": "hi"}]], max_tokens=budget)[0]
    assert got.text == "Oh no, that sounds really" and got.finish_reason == "length"
    # counted in the budget (latent_allowance=0) the prefix leaves no reply at all
    bare = _ScriptedChat(policy, latent_allowance=0).chat([[{"role": "user", "content": "hi"}]], max_tokens=budget)[0]
    assert bare.text == ""
    # a plain model is not regenerated and keeps max_tokens
    plain = _ScriptedChat(_Scripted(tok, "Oh no, that sounds really hard. What happened?"))
    assert plain.chat([[{"role": "user", "content": "hi"}]], max_tokens=budget)[0].text == "Oh no, that sounds really"


class _PerPrompt(_Scripted):
    """Writes a latent prefix and then the reference answer of the EQ-Bench question it is asked."""

    def __init__(self, tok, answers: dict[str, str]):
        self.tok, self.texts = tok, list(answers.items())

    def encode_chat(self, conv):
        return [next(i for i, (p, _) in enumerate(self.texts) if p == conv[-1]["content"])]


class _PerPromptChat(ModelChat):
    def generate_ids(self, prompts, temps, max_tokens, seed, row_seeds):
        out = []
        for p in prompts:
            ids = self.policy.tok(self.policy.texts[p[0]][1], add_special_tokens=False)["input_ids"]
            out.append(Generation(ids[:max_tokens], "length" if len(ids) > max_tokens else "stop"))
        return out


def test_eq_bench_parses_a_sac_models_answer_after_its_latent_prefix(smollm2_dir, tmp_path):
    from sage_jax.eval import eq_bench as eq

    if not (EQ_DIR / eq.QUESTIONS_FILE).exists():
        pytest.skip(f"EQ-Bench data not found at {EQ_DIR} (the project's shared/data folder is absent)")
    qs = eq.load_questions(EQ_DIR / eq.QUESTIONS_FILE)
    sub = {k: qs[k] for k in list(qs)[:3]}
    prefix = SAC.split("} Oh")[0] + "}"
    answers = {eq.build_prompt(q.prompt): prefix + " " + "\n".join(f"{e}: {int(s)}" for e, s in q.reference)
               for q in sub.values()}
    tok = _tok(str(smollm2_dir))
    assert all(len(tok(a)["input_ids"]) > eq.EQBenchConfig().max_tokens for a in answers.values())
    res = eq.run_eq_bench(_PerPromptChat(_PerPrompt(tok, answers)), tmp_path / "eq.jsonl",
                          eq.EQBenchConfig(progress=False), questions=sub)
    assert res.benchmark.score == 100.0 and res.benchmark.parseable == 3
    # the prefix counted in the 60 tokens: the answer is cut and does not parse
    res = eq.run_eq_bench(_PerPromptChat(_PerPrompt(tok, answers), latent_allowance=0), tmp_path / "eq0.jsonl",
                          eq.EQBenchConfig(progress=False, max_attempts=1), questions=sub)
    assert res.benchmark.parseable < 3
