"""A killed search resumes: every output file equals an uninterrupted run's, each seed once; records
written ahead of their tree are dropped on restart."""

import json
import os
import random
import signal
import subprocess
import sys
import time

from sage_jax.data.split import seed_id


def _ids(path):
    return [json.loads(x)["id"] for x in open(path)] if path.exists() else []


def _outputs(out):
    return {k: sorted(open(out / f"{k}.jsonl").read().splitlines()) for k in ("trees", "sft", "trajectories", "pairs")}


def test_killed_search_resumes_exactly_once_and_equals_an_uninterrupted_run(tmp_path, tiny_dir):
    """SIGKILL at several points (mid-dialogue, between a seed's output files, after a tree), rerun
    each time: every output file equals an uninterrupted run's, each id once; then a reordered,
    extended seed file in the same directory searches only the new seed."""
    seeds = [f"I lost my {x} and I am upset about it." for x in ("keys", "wallet", "phone", "dog", "bag")]
    (tmp_path / "seeds.txt").write_text("\n".join(seeds[:4]) + "\n")
    base = [sys.executable, "-m", "sage_jax.cli", "search", f"model={tiny_dir}", "turns=2", "k=2", "temperature=0.0",
            "max_new_tokens=8", "user_max_new_tokens=4", "batch_seeds=1", f"seeds={tmp_path / 'seeds.txt'}"]
    # The command's own persistent compilation cache (sage_jax.compile_cache, here under this test's
    # SAGE_JAX_CACHE) serves the six runs: each would otherwise compile the same programs.
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", JAX_ENABLE_COMPILATION_CACHE="true",
               SAGE_JAX_CACHE=str(tmp_path / "cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    subprocess.run(base + [f"output_dir={tmp_path / 'ref'}"], env=env, capture_output=True, check=True)
    ref = _outputs(tmp_path / "ref")
    out = tmp_path / "r"
    cmd = base + [f"output_dir={out}"]
    rng = random.Random(0)
    for kills in range(3):  # each run killed after a random number of newly written output lines
        before = sum(len(_ids(out / f"{k}.jsonl")) for k in ("trees", "sft", "trajectories", "pairs"))
        target = before + rng.randint(1, 4)
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        t0 = time.time()
        while sum(len(_ids(out / f"{k}.jsonl")) for k in ("trees", "sft", "trajectories", "pairs")) < target:
            if proc.poll() is not None:
                break  # finished before the kill point
            assert time.time() - t0 < 180, "search hung"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    summary = json.loads(done.stdout)
    assert summary["skipped_done"] + summary["searched"] == 4
    # programs came from the cache the earlier runs filled, which lives under SAGE_JAX_CACHE/xla
    assert summary["compiles"]["cached"] > 0 and summary["compiles"]["cached"] <= summary["compiles"]["count"]
    assert list((tmp_path / "cache" / "xla").glob("*-cache*")), sorted((tmp_path / "cache").rglob("*"))[:10]
    got = _outputs(out)
    for k in ("trees", "sft", "trajectories"):
        assert len(set(_ids(out / f"{k}.jsonl"))) == len(_ids(out / f"{k}.jsonl")) == 4, k  # each seed once
    assert got == ref  # the same records as one uninterrupted run, none repeated or missing

    # A reordered seed file with one new seed: only the new one is searched, ids follow the text.
    (tmp_path / "seeds.txt").write_text("\n".join([seeds[4]] + seeds[:4][::-1]) + "\n")
    summary = json.loads(subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout)
    assert (summary["skipped_done"], summary["searched"]) == (4, 1)
    assert sorted(_ids(out / "trees.jsonl")) == sorted(seed_id(x) for x in seeds)


def test_reconcile_drops_records_written_ahead_of_their_tree(tmp_path):
    from sage_jax.search import shards

    def write(name, ids, tail=""):
        (tmp_path / name).write_text("".join(json.dumps({"id": i}) + "\n" for i in ids) + tail)

    write("trees.jsonl", ["seed-a"])
    write("sft.jsonl", ["seed-a", "seed-b", "seed-a"])  # seed-b: killed before its tree; seed-a repeated
    write("pairs.jsonl", ["seed-a:t0:r1", "seed-b:t0:r0"], tail='{"id": "seed-b:t1')  # and a torn line
    write("trees.p1.jsonl", ["seed-c"])
    write("pairs.p1.jsonl", ["seed-c:t0:r0", "seed-d:t0:r0"])
    dropped = shards.reconcile(tmp_path)
    assert dropped == {"sft.jsonl": 2, "pairs.jsonl": 1, "pairs.p1.jsonl": 1}
    assert _ids(tmp_path / "sft.jsonl") == ["seed-a"]
    assert _ids(tmp_path / "pairs.jsonl") == ["seed-a:t0:r1"]
    assert _ids(tmp_path / "pairs.p1.jsonl") == ["seed-c:t0:r0"]
    assert shards.reconcile(tmp_path) == {}  # nothing left to drop
