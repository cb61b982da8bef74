"""Sharded inference on 8 simulated CPU devices (conftest) equals one device: greedy generation,
shared-prefix branches, beam search, the per-dialogue KV-cache pool (its cache sharded), a greedy
K=4 3-turn tree search; and a 2-process jax.distributed search splits the seeds (each searched
once) and equals a one-process run."""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from sage_jax import model, parallel, rollout
from sage_jax.data.readers import read_seeds
from sage_jax.data.sample import sample_path
from sage_jax.data.split import seed_id

REPO = Path(__file__).resolve().parents[1]
MESHES = {
    "data4_tensor2": parallel.MeshConfig(data=4, fsdp=1, tensor=2),
    "data2_fsdp2_tensor2": parallel.MeshConfig(data=2, fsdp=2, tensor=2),
}


@pytest.fixture(scope="module")
def tiny():
    cfg = model.ModelConfig(family="llama", vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2,
                            num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, eos_token_id=5)
    params = model.init_params(cfg, jax.random.key(0), std=0.3)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(6, 128, size=n).tolist() for n in (5, 11, 3)]  # 3 rows: padded to the data axes
    return cfg, params, prompts


def _spec(x) -> tuple:
    spec = tuple(x.sharding.spec)
    while spec and spec[-1] is None:
        spec = spec[:-1]
    return spec


def _sharded(cfg, params, name):
    sharded = parallel.place_params(model.param_axes(cfg), params, MESHES[name])
    assert parallel.params_mesh(sharded) is not None and parallel.params_mesh(sharded).size == 8
    return sharded


def test_single_device_default_leaves_params_alone(tiny):
    cfg, params, _ = tiny
    assert parallel.inference_mesh(parallel.SINGLE_DEVICE) is None
    assert parallel.place_params(model.param_axes(cfg), params, parallel.SINGLE_DEVICE) is params
    assert parallel.params_mesh(params) is None
    x = np.ones((3, 4), np.float32)
    assert parallel.constrain(x, ("batch", "length")) is x  # no mesh in context: a no-op
    assert parallel.pad_rows(3) == 3


def test_first_trace_under_the_mesh(tiny):
    """The model's abstract module (cached) may first be built inside the mesh context."""
    cfg, _, prompts = tiny
    cfg = cfg.replace(num_layers=1)
    params = model.init_params(cfg, jax.random.key(1), std=0.3)
    sharded = parallel.place_params(model.param_axes(cfg), params, MESHES["data4_tensor2"])
    model.abstract_module.cache_clear()
    sp = rollout.SamplingParams(temperature=0.0, max_new_tokens=4)
    out = rollout.generate(cfg, sharded, prompts, sp)
    assert [g.tokens for g in out] == [g.tokens for g in rollout.generate(cfg, params, prompts, sp)]


@pytest.mark.parametrize("name", sorted(MESHES))
def test_greedy_generate_and_branches_equal_one_device(tiny, name):
    cfg, params, prompts = tiny
    sp = rollout.SamplingParams(temperature=0.0, max_new_tokens=12, repetition_penalty=1.1)
    ref, _ = rollout.generate(cfg, params, prompts, sp, return_state=True)
    ref_k = rollout.generate(cfg, params, prompts[:2], sp, num_continuations=3)
    ref_b = rollout.generate_branches(cfg, params, prompts[1], [[7, 8], [], [9]], sp)

    sharded = _sharded(cfg, params, name)
    out, state = rollout.generate(cfg, sharded, prompts, sp, return_state=True)
    assert [g.tokens for g in out] == [g.tokens for g in ref]
    assert [g.finish_reason for g in out] == [g.finish_reason for g in ref]
    assert [g.tokens for g in rollout.generate(cfg, sharded, prompts[:2], sp, num_continuations=3)] == [
        g.tokens for g in ref_k]
    assert [g.tokens for g in rollout.generate_branches(cfg, sharded, prompts[1], [[7, 8], [], [9]], sp)] == [
        g.tokens for g in ref_b]

    # Rows over the batch axes (3 prompts padded to 4 rows), the cache by its logical axes.
    batch_axes = ("data", "fsdp") if MESHES[name].fsdp > 1 else "data"
    assert state.tokens.shape[0] == 4
    assert _spec(state.cache["k"]) == (None, batch_axes, "tensor")
    assert _spec(state.cache["end"]) == (batch_axes,)
    assert _spec(state.tokens) == (batch_axes,)

    # The decode layout (per-layer weights, and per-layer cache buffers inside the decode loop):
    # the same tokens, and the cache comes back stacked with the same layout.
    out, state = rollout.generate(cfg, model.decode_layout(sharded), prompts, sp, return_state=True)
    assert [g.tokens for g in out] == [g.tokens for g in ref]
    assert _spec(state.cache["k"]) == (None, batch_axes, "tensor")
    # From 16 rows the decode loop stores each layer's keys transposed: the same tokens.
    many = (prompts * 6)[:16]
    out, state = rollout.generate(cfg, model.decode_layout(sharded), many, sp, return_state=True)
    assert [g.tokens for g in out] == [g.tokens for g in rollout.generate(cfg, params, many, sp)]
    assert _spec(state.cache["k"]) == (None, batch_axes, "tensor")


@pytest.mark.parametrize("name", sorted(MESHES))
def test_beam_search_equals_one_device(tiny, name):
    cfg, params, prompts = tiny
    kw = dict(num_beams=3, max_new_tokens=6, length_penalty=0.8, early_stopping=True)
    ref = rollout.beam_search(cfg, params, prompts, **kw)
    out = rollout.beam_search(cfg, _sharded(cfg, params, name), prompts, **kw)
    assert [[h.tokens for h in hs] for hs in out] == [[h.tokens for h in hs] for hs in ref]
    np.testing.assert_allclose([[h.score for h in hs] for hs in out], [[h.score for h in hs] for hs in ref],
                               rtol=1e-4)


def test_eval_chat_and_local_judge_on_mesh_equal_one_device(tiny_dir):
    from sage_jax.eval.generation import make_chat_backend
    from sage_jax.judge import make_judge
    from sage_jax.serve.cli import ServeConfig

    assert ServeConfig().mesh == parallel.SINGLE_DEVICE
    convs = [[{"role": "user", "content": "I lost my job today."}], [{"role": "user", "content": "Hi!"}]]
    one = make_chat_backend(str(tiny_dir)).chat(convs, max_tokens=8)
    chat = make_chat_backend(str(tiny_dir), mesh=MESHES["data4_tensor2"])
    assert parallel.params_mesh(chat.policy.params).shape["tensor"] == 2
    assert [c.text for c in chat.chat(convs, max_tokens=8)] == [c.text for c in one]
    judge = make_judge(f"local:{tiny_dir}", mesh=MESHES["data2_fsdp2_tensor2"])
    ref = make_judge(f"local:{tiny_dir}")
    prompts = ["Which reply is kinder, A or B?", "Rate this: 7"]
    assert parallel.params_mesh(judge.params).shape["fsdp"] == 2
    assert [c.text for c in judge.complete(prompts, temperature=0.0, max_tokens=6)] == [
        c.text for c in ref.complete(prompts, temperature=0.0, max_tokens=6)]


def _search_cfg(tiny_dir, out, **kw):
    from sage_jax.search.tree import SearchConfig

    base = dict(model=str(tiny_dir), judge="rules:", num_seeds=3, turns=3, k=4, temperature=0.0,
                max_new_tokens=10, user_max_new_tokens=6, batch_seeds=2, output_dir=str(out))
    return SearchConfig(**{**base, **kw})


def _files(out: Path) -> dict[str, str]:
    return {n: (out / f"{n}.jsonl").read_text() for n in ("trees", "sft", "trajectories", "pairs")}


@pytest.fixture(scope="module")
def one_device_search(tiny_dir, tmp_path_factory) -> dict[str, str]:
    """The greedy search's output files on one device: the reference every mesh is compared to."""
    from sage_jax.search.tree import run_search

    out = tmp_path_factory.mktemp("one_device_search")
    run_search(_search_cfg(tiny_dir, out))
    return _files(out)


def test_greedy_search_on_mesh_equals_one_device(tiny_dir, tmp_path, one_device_search):
    """The whole search on the mesh with all three axes (rows over data x fsdp, heads over tensor):
    one mesh, as the whole search is the suite's dearest sharded test (~60 s a mesh); the
    data-only row split of `data4_tensor2` is checked by the generation, beam and pool tests."""
    from sage_jax.search.tree import run_search

    run_search(_search_cfg(tiny_dir, tmp_path / "mesh", mesh=MESHES["data2_fsdp2_tensor2"]))
    one, mesh = one_device_search, _files(tmp_path / "mesh")
    trees = [json.loads(x) for x in one["trees"].splitlines()]
    assert [t["id"] for t in trees] == [seed_id(x) for x in read_seeds(sample_path("ed_test_seeds.txt"), limit=3)]
    assert all(len(n["candidates"]) == 4 for t in trees for n in t["nodes"])
    assert mesh == one


def _pool_turns(policy, turns: int = 3, k: int = 2, check=None):
    """Greedy latent-first turns through a DialoguePool (sync, fork, generate, commit each turn);
    `check(pool)` sees the pool with its children forked and again after the commit."""
    from sage_jax.rollout import dialogue_cache as DC

    pool = DC.DialoguePool(policy, 2)
    convs = {"a": [{"role": "user", "content": "I lost my job today."}], "b": [{"role": "user", "content": "Hi!"}]}
    sp = rollout.SamplingParams.greedy_params(6)
    log = []
    for t in range(turns):
        cands = DC.branch(policy, pool, convs, sp, DC.BranchConfig(mode="latent", k=k, latent_max_new_tokens=6),
                          seed=t)
        if check:
            check(pool)
        pool.commit({key: (t + i) % k for i, key in enumerate(convs)})
        if check:
            check(pool)
        for i, key in enumerate(convs):
            c = cands[key][(t + i) % k]
            log.append((t, key, c["tokens"], c["finish_reason"]))
            convs[key] = convs[key] + [{"role": "assistant", "content": c["content"]},
                                       {"role": "user", "content": f"Tell me more ({t})."}]
    return pool, log


@pytest.mark.parametrize("name", sorted(MESHES))
def test_dialogue_pool_cache_is_sharded_and_equals_one_device(tiny_dir, name):
    """The per-dialogue KV cache (rollout.dialogue_cache) of a sharded policy: rows padded to the
    mesh's row split, k/v [L, B, S, K, H] with rows over the batch axes and kv heads over `tensor`
    (before and after every fork/commit, and after the cache grows); greedy turns equal one device."""
    from sage_jax.rollout.policy import load_policy

    one = load_policy(str(tiny_dir))
    sharded = load_policy(str(tiny_dir), mesh=MESHES[name])
    assert parallel.params_mesh(sharded.params) is not None and sharded.cfg.num_kv_heads % 2 == 0
    batch_axes = ("data", "fsdp") if MESHES[name].fsdp > 1 else "data"
    seen = []

    def laid_out(rows):
        for c in (rows.cache["k"], rows.cache["v"]):
            assert isinstance(c.sharding, jax.sharding.NamedSharding)
            assert _spec(c) == (None, batch_axes, "tensor"), c.sharding
        assert _spec(rows.cache["segment_ids"]) == (batch_axes,) and _spec(rows.cache["end"]) == (batch_axes,)
        assert _spec(rows.logits) == (batch_axes,)

    def check(pool):
        if pool.children is not None:
            laid_out(pool.children)
            seen.append("children")
        else:
            laid_out(pool.cache)
            seen.append("parent")

    ref_pool, ref = _pool_turns(one)
    pool, got = _pool_turns(sharded, check=check)
    assert got == ref and any(toks for _, _, toks, _ in got)
    assert seen == ["children", "parent"] * 3
    assert ref_pool.rows == 2 and pool.rows == 4  # 2 dialogues: a power of two, then the 4-way row split
    assert pool.cache.rows == 4 and pool.children is None
    laid_out(pool.cache)
    # growing the cache keeps the layout
    before = pool.cache.capacity
    pool.cache.reserve(before + 1)
    assert pool.cache.capacity == 2 * before and pool.stats.grows == 1
    laid_out(pool.cache)


# --- two processes ----------------------------------------------------------------------------

WORKER = textwrap.dedent("""
    import json, sys
    import jax
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except Exception as e:
        print("NO_GLOO", e, flush=True)
        raise SystemExit(3)
    from sage_jax import parallel
    from sage_jax.config import apply_overrides
    from sage_jax.search.tree import SearchConfig, run_search

    cfg = apply_overrides(SearchConfig(), sys.argv[2:])
    summary = run_search(cfg)
    summary.update(process=jax.process_index(), processes=jax.process_count(),
                   local_devices=jax.local_device_count())
    with open(sys.argv[1], "w") as f:
        json.dump(summary, f)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_process_search_splits_seeds_and_equals_one_process(tiny_dir, tmp_path):
    from sage_jax.search.tree import run_search

    args = [f"model={tiny_dir}", "judge=rules:", "num_seeds=6", "turns=2", "k=2", "temperature=0",
            "max_new_tokens=8", "user_max_new_tokens=4", "batch_seeds=2"]
    ref = tmp_path / "one"
    from sage_jax.config import apply_overrides
    from sage_jax.search.tree import SearchConfig

    run_search(apply_overrides(SearchConfig(), args + [f"output_dir={ref}"]))

    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out, port, procs = tmp_path / "two", _free_port(), []
    for pid in range(2):
        env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
               "JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": "2",
               "JAX_PROCESS_ID": str(pid), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
        procs.append(subprocess.Popen(
            [sys.executable, str(script), str(tmp_path / f"sum{pid}.json"), *args, f"output_dir={out}",
             "mesh.data=2"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    outs, t0 = [], time.time()
    try:
        for p in procs:
            outs.append(p.communicate(timeout=max(10.0, 900 - (time.time() - t0)))[0].decode(errors="replace"))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if any(p.returncode == 3 and "NO_GLOO" in o for p, o in zip(procs, outs)):
        pytest.skip("this jaxlib has no gloo CPU collectives")
    for p, o in zip(procs, outs):
        assert p.returncode == 0, o[-4000:]
    sums = [json.loads((tmp_path / f"sum{i}.json").read_text()) for i in range(2)]
    assert [(s["process"], s["processes"], s["local_devices"]) for s in sums] == [(0, 2, 2), (1, 2, 2)]
    # 3 batches of 2 seeds dealt round-robin: process 0 searched 4 seeds, process 1 two.
    assert [s["searched"] for s in sums] == [4, 2]
    assert not list(out.glob("*.p*.jsonl")), "the shards were merged and removed"
    ids = [json.loads(x)["id"] for x in (out / "trees.jsonl").read_text().splitlines()]
    assert ids == [seed_id(x) for x in read_seeds(sample_path("ed_test_seeds.txt"), limit=6)]  # once each, in seed order
    assert _files(out) == _files(ref)


def test_shard_merge_resume_and_batch_split(tmp_path):
    from sage_jax.search import shards

    todo = [f"s{i}" for i in range(7)]
    got = [shards.my_batches(todo, 2, p, 3) for p in range(3)]
    assert got == [[(0, ["s0", "s1"]), (6, ["s6"])], [(2, ["s2", "s3"])], [(4, ["s4", "s5"])]]
    assert shards.my_batches(todo, 2, 0, 1) == [(b, todo[b:b + 2]) for b in (0, 2, 4, 6)]
    assert shards.file_name("trees", 1, 2) == "trees.p1.jsonl" and shards.file_name("trees", 0, 1) == "trees.jsonl"

    def write(name, ids):
        with open(tmp_path / name, "w") as f:
            f.writelines(json.dumps({"id": i}) + "\n" for i in ids)

    write("trees.jsonl", ["seed00000"])
    write("trees.p0.jsonl", ["seed00000", "seed00002"])  # seed00000: merged before a crash
    write("trees.p1.jsonl", ["seed00001"])
    write("pairs.p1.jsonl", ["seed00001:t0:r1", "seed00001:t1:r0"])
    write("pairs.p0.jsonl", ["seed00002:t0:r3"])
    with open(tmp_path / "trees.p1.jsonl", "a") as f:
        f.write('{"id": "seed00003", "nod')  # a torn line of a killed process: not finished
    assert shards.finished_ids(tmp_path) == {"seed00000", "seed00001", "seed00002"}
    shards.merge(tmp_path)
    read = lambda n: [json.loads(x)["id"] for x in (tmp_path / n).read_text().splitlines()]  # noqa: E731
    assert read("trees.jsonl") == ["seed00000", "seed00001", "seed00002"]
    assert read("pairs.jsonl") == ["seed00001:t0:r1", "seed00001:t1:r0", "seed00002:t0:r3"]
    assert not list(tmp_path.glob("*.p*.jsonl"))
