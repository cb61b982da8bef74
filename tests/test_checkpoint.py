"""Orbax checkpointing of a whole run (sharded state, optimizer, typed key, data state, config,
tokenizer), keep-N and the save schedule, crash leftovers, and SIGTERM preemption for real."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sage_jax.train.checkpoint import Checkpointer, abstract_like, key_from_saved, key_to_saveable
from sage_jax.train.preemption import PreemptionGuard, any_process

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mesh():
    assert jax.device_count() == 8, "conftest sets 8 simulated CPU devices"
    return jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def make_state(mesh, seed=0):
    rng = np.random.default_rng(seed)
    params = {
        "w": jax.device_put(rng.normal(size=(8, 16)).astype(np.float32), NamedSharding(mesh, P("data", "fsdp"))),
        "b": jax.device_put(rng.normal(size=(16,)).astype(np.float32), NamedSharding(mesh, P("fsdp"))),
        "emb": jax.device_put(rng.normal(size=(4, 8)).astype(np.float32), NamedSharding(mesh, P())),
    }
    opt = optax.adamw(1e-2)
    opt_state = opt.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, opt_state = opt.update(grads, opt_state, params)  # non-trivial moments and count
    params = optax.apply_updates(params, updates)
    # As a sharded trainer does: every leaf lives on the mesh (the adam count replicated).
    replicated = NamedSharding(mesh, P())
    opt_state = jax.tree.map(
        lambda x: x if isinstance(x.sharding, NamedSharding) else jax.device_put(x, replicated), opt_state)
    key = jax.device_put(jax.random.key(seed + 42), NamedSharding(mesh, P()))
    return opt, {"params": params, "opt_state": opt_state, "step": 7, "rng": key}


def fake_tokenizer(tmp_path):
    d = tmp_path / "tok"
    (d / "sub").mkdir(parents=True)
    (d / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"a": 0, "é": 1}}}), encoding="utf-8")
    (d / "tokenizer_config.json").write_text('{"eos_token": "<|im_end|>"}')
    (d / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    (d / "special_tokens_map.json").write_text("{}")
    (d / "sub" / "tokenizer.model").write_bytes(bytes(range(256)))  # binary (sentencepiece-like)
    return d


def assert_trees_equal(a, b):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            assert jax.dtypes.issubdtype(y.dtype, jax.dtypes.prng_key)
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def make_data_iter(start=0):
    """A Grain iterator (shuffled, batched) advanced by ``start`` batches."""
    it = iter(grain.MapDataset.range(100).shuffle(seed=3).batch(4).to_iter_dataset())
    for _ in range(start):
        next(it)
    return it


def test_roundtrip_sharded_state_data_config_tokenizer(mesh, tmp_path):
    opt, state = make_state(mesh)
    data_iter = make_data_iter(5)
    expected_batches = [next(make_data_iter(5)).tolist() for _ in range(1)]
    config = {"model": {"name": "tiny"}, "lr": 1e-2, "mesh": [2, 4]}
    tok = fake_tokenizer(tmp_path)

    with Checkpointer(tmp_path / "ckpt", save_every=10) as ckpt:
        assert ckpt.latest_step() is None
        assert ckpt.save(7, state=state, data_iter=data_iter, config=config, tokenizer_dir=tok, force=True)
        next(data_iter)  # advancing the iterator after save must not change what is saved
        config["lr"] = 5.0  # nor mutating the config
        ckpt.wait()
    config["lr"] = 1e-2

    # A fresh Checkpointer (a restarted process) restores into requested shardings, one of them
    # different from the saved one (resharding on restore).
    abstract = abstract_like(state)
    abstract["params"]["w"] = jax.ShapeDtypeStruct((8, 16), jnp.float32, sharding=NamedSharding(mesh, P("fsdp", None)))
    fresh_iter = make_data_iter()
    with Checkpointer(tmp_path / "ckpt", save_every=10) as ckpt:
        assert ckpt.latest_step() == 7
        r = ckpt.restore(abstract, data_iter=fresh_iter)
        out = tmp_path / "tok_restored"
        ckpt.restore_tokenizer(None, out)
        assert ckpt.restore_config() == config

    assert r.step == 7
    assert r.data_restored and [next(fresh_iter).tolist()] == expected_batches  # Grain's handler set it
    assert (tmp_path / "ckpt" / "7" / "data" / "process_0-of-1.json").exists()
    assert r.config == config
    assert r.state["step"] == 7
    assert_trees_equal(r.state, state)
    for got, want in zip(jax.tree.leaves(r.state), jax.tree.leaves(abstract)):
        if isinstance(want, jax.ShapeDtypeStruct):
            assert got.sharding == want.sharding, (got.sharding, want.sharding)
    assert r.state["params"]["w"].sharding.spec == P("fsdp", None)
    assert r.state["rng"].dtype == state["rng"].dtype  # a typed key again
    assert r.meta["prng_keys"] == {"['rng']": "threefry2x32"}
    for f in sorted(p for p in tok.rglob("*") if p.is_file()):
        assert (out / f.relative_to(tok)).read_bytes() == f.read_bytes()

    # Resume is exact: the next optimizer step from the restored state equals the original's.
    def step_fn(s):
        g = jax.tree.map(lambda p: jnp.cos(p), s["params"])
        u, o = opt.update(g, s["opt_state"], s["params"])
        return optax.apply_updates(s["params"], u), o, jax.random.normal(s["rng"], (3,))

    assert_trees_equal(step_fn(r.state), step_fn(state))


def test_keep_n_schedule_force_and_latest(mesh, tmp_path):
    _, state = make_state(mesh)
    with Checkpointer(tmp_path / "ckpt", save_every=2, keep=2) as ckpt:
        saved = [s for s in range(1, 10) if ckpt.save(s, state={**state, "step": s})]
        assert saved == [2, 4, 6, 8]
        assert ckpt.should_save(10) and not ckpt.should_save(8) and not ckpt.should_save(9)
        assert ckpt.save(9, state={**state, "step": 9}, force=True)  # the end of the run
        assert not ckpt.save(9, state=state, force=True)  # never overwrites a step
        ckpt.wait()
        assert ckpt.all_steps() == [8, 9]
        assert ckpt.latest_step() == 9
    assert sorted(int(p.name) for p in (tmp_path / "ckpt").iterdir() if p.name.isdigit()) == [8, 9]
    with Checkpointer(tmp_path / "ckpt", save_every=2, keep=2, read_only=True) as ro:
        assert ro.latest_step() == 9
        assert ro.restore(abstract_like(state), step=8).state["step"] == 8
        assert not ro.restore(abstract_like(state), data_iter=make_data_iter()).data_restored  # saved without one
        with pytest.raises(FileNotFoundError):
            ro.restore(abstract_like(state), step=4)  # pruned by keep=2


def test_async_save_survives_donation_then_wait(mesh, tmp_path):
    _, state = make_state(mesh, seed=1)
    expected = jax.tree.map(lambda x: np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(
        x.dtype, jax.dtypes.prng_key) else x) if isinstance(x, jax.Array) else x, state)
    abstract = abstract_like(state)
    ckpt = Checkpointer(tmp_path / "ckpt", save_every=1, async_save=True)
    assert ckpt.save(1, state=state)
    # As a training step with donated buffers would: the device arrays are gone right after save.
    for x in jax.tree.leaves(state):
        if isinstance(x, jax.Array):
            x.delete()
    ckpt.wait()
    assert ckpt.latest_step() == 1
    r = ckpt.restore(abstract)
    ckpt.close()
    ckpt.close()  # idempotent
    got = jax.tree.map(lambda x: np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(
        x.dtype, jax.dtypes.prng_key) else x) if isinstance(x, jax.Array) else x, r.state)
    assert_trees_equal(got, expected)


def test_grain_iterator_position_resumes(tmp_path):
    it = make_data_iter(3)
    with Checkpointer(tmp_path / "ckpt", save_every=1) as ckpt:
        ckpt.save(3, state={"step": 3}, data_iter=it)
    expected = [next(it).tolist() for _ in range(2)]
    it2 = make_data_iter()
    with Checkpointer(tmp_path / "ckpt", save_every=1, read_only=True) as ckpt:
        assert not ckpt.restore({"step": 0}, data_iter=it2, data=False).data_restored
        assert next(make_data_iter()).tolist() == next(it2).tolist()  # data=False: left at the start
        it2 = make_data_iter()
        assert ckpt.restore({"step": 0}, data_iter=it2).data_restored
    assert [next(it2).tolist() for _ in range(2)] == expected
    # Grain's own handler wrote it: its file, its JSON, readable by Grain without us.
    raw = json.loads((tmp_path / "ckpt" / "3" / "data" / "process_0-of-1.json").read_text())
    it3 = make_data_iter()
    it3.set_state(raw)
    assert next(it3).tolist() == expected[0]


def test_rng_keys_are_stored_as_key_data_and_rewrapped(tmp_path):
    keys = {"threefry": jax.random.key(7), "rbg": jax.random.key(7, impl="rbg"),
            "batch": jax.random.split(jax.random.key(3), 4)}
    for k in keys.values():
        back = key_from_saved(key_to_saveable(k), str(jax.random.key_impl(k)))
        assert back.dtype == k.dtype and back.shape == k.shape
        np.testing.assert_array_equal(jax.random.key_data(back), jax.random.key_data(k))
    with Checkpointer(tmp_path / "ckpt", save_every=1) as ckpt:
        ckpt.save(1, state=keys)
        ckpt.wait()
        meta = ckpt.read_meta()
        r = ckpt.restore(jax.tree.map(lambda k: jax.ShapeDtypeStruct(k.shape, k.dtype), keys))
    assert meta["prng_keys"] == {"['batch']": "threefry2x32", "['rbg']": "rbg", "['threefry']": "threefry2x32"}
    # On disk: plain uint32 key data, readable without knowing about keys.
    with ocp.CheckpointManager(os.path.abspath(tmp_path / "ckpt"),
                               options=ocp.CheckpointManagerOptions(read_only=True)) as raw:
        stored = raw.restore(1, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    for name, k in keys.items():
        assert stored[name].dtype == np.uint32
        np.testing.assert_array_equal(np.asarray(stored[name]), np.asarray(jax.random.key_data(k)))
        assert r.state[name].dtype == k.dtype  # a typed key of the same implementation again
        np.testing.assert_array_equal(jax.random.key_data(r.state[name]), jax.random.key_data(k))
        if name != "batch":  # the same stream of random numbers
            np.testing.assert_array_equal(jax.random.uniform(r.state[name], (3,)), jax.random.uniform(k, (3,)))


def test_unfinalized_step_is_ignored(mesh, tmp_path):
    _, state = make_state(mesh)
    root = tmp_path / "ckpt"
    with Checkpointer(root, save_every=1) as ckpt:
        ckpt.save(2, state=state)
    # A save that crashed before Orbax's atomic rename leaves a tmp directory behind.
    crashed = root / "5.orbax-checkpoint-tmp-1700000000000000"
    (crashed / "state").mkdir(parents=True)
    (crashed / "state" / "junk").write_bytes(b"\0" * 10)
    with Checkpointer(root, save_every=1, read_only=True) as ro:  # readers never delete
        assert ro.latest_step() == 2
        assert ro.restore(abstract_like(state)).step == 2
    assert crashed.exists()
    with Checkpointer(root, save_every=1) as ckpt:  # a resuming trainer cleans it up
        assert ckpt.latest_step() == 2
        ckpt.save(3, state=state)
    assert not crashed.exists()
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith("_")) == ["2", "3"]


def test_sigterm_hook_feeds_orbax_should_save(tmp_path):
    guard = PreemptionGuard()
    with Checkpointer(tmp_path / "ckpt", save_every=0, keep=None, preemption=guard) as ckpt:
        with guard:
            assert not ckpt.should_save(3) and not ckpt.save(3, state={"step": 3})
            os.kill(os.getpid(), signal.SIGTERM)
            deadline = time.time() + 5
            while not guard.requested and time.time() < deadline:
                time.sleep(0.01)
            assert ckpt.should_save(4) and ckpt.save(4, state={"step": 4})  # Orbax's save decided
            ckpt.wait()
            assert ckpt.all_steps() == [4] and not ckpt.should_save(4)  # never the same step twice
    with Checkpointer(tmp_path / "ckpt2", save_every=5) as ckpt:  # the interval alone: Orbax's policy
        assert [s for s in range(1, 12) if ckpt.should_save(s)] == [5, 10]


def test_preemption_guard_flag_and_handler_restore():
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionGuard() as guard:
        assert guard.mode == "local" and not guard.requested and not guard.should_stop(1)
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.time() + 5
        while not guard.requested and time.time() < deadline:
            time.sleep(0.01)
        assert guard.requested and guard.signum == signal.SIGTERM
        assert guard.should_stop(2)
    assert signal.getsignal(signal.SIGTERM) == before
    assert any_process(True) and not any_process(False)


TRAIN_SCRIPT = textwrap.dedent("""
    import os, sys, time
    import grain, jax, jax.numpy as jnp, optax
    from sage_jax.train.checkpoint import Checkpointer, abstract_like
    from sage_jax.train.preemption import PreemptionGuard

    ckdir, report = sys.argv[1], sys.argv[2]
    opt = optax.sgd(0.1)

    @jax.jit
    def train_step(state):
        loss, g = jax.value_and_grad(lambda p: jnp.sum((p["w"] - 1.0) ** 2))(state["params"])
        upd, opt_state = opt.update(g, state["opt_state"], state["params"])
        return {"params": optax.apply_updates(state["params"], upd), "opt_state": opt_state}, loss

    def write(name, value):
        tmp = report + "." + name + ".tmp"
        with open(tmp, "w") as f:
            f.write(str(value))
        os.replace(tmp, report + "." + name)

    params = {"w": jnp.zeros(4, jnp.float32)}
    state = {"params": params, "opt_state": opt.init(params)}
    data = iter(grain.MapDataset.range(10**6).to_iter_dataset())  # element n is consumed by step n + 1
    guard = PreemptionGuard()
    ckpt = Checkpointer(ckdir, save_every=1000, keep=2, preemption=guard)
    step = 0
    if ckpt.latest_step() is not None:
        r = ckpt.restore(abstract_like(state), data_iter=data)
        state, step = r.state, r.step
        assert r.data_restored
    write("start", step)
    with guard:
        while True:
            assert next(data) == step  # the data iterator resumed exactly where it was saved
            state, loss = train_step(state)
            step += 1
            write("step", step)
            saved = ckpt.save(step, state=state, data_iter=data)  # Orbax's decision, fed by SIGTERM
            if guard.should_stop(step):
                assert saved
                ckpt.wait()
                write("saved", step)
                break
            assert not saved  # save_every=1000: no save before the signal
            time.sleep(0.02)
    ckpt.close()
""")


def _run_until_sigterm(script, ckdir, report, min_step):
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    proc = subprocess.Popen([sys.executable, str(script), str(ckdir), str(report)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    step_file = Path(f"{report}.step")
    try:
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None:
            if step_file.exists() and int(step_file.read_text()) >= min_step:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out.decode()[-3000:]
    start = int(Path(f"{report}.start").read_text())
    last = int(step_file.read_text())
    assert int(Path(f"{report}.saved").read_text()) == last
    return start, last


def test_sigterm_saves_at_last_step_and_resumes(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT)
    ckdir, report = tmp_path / "ckpt", tmp_path / "report"

    start1, last1 = _run_until_sigterm(script, ckdir, report, min_step=3)
    assert start1 == 0 and last1 >= 3
    with Checkpointer(ckdir, save_every=1000, read_only=True) as ro:
        assert ro.latest_step() == last1

    start2, last2 = _run_until_sigterm(script, ckdir, report, min_step=last1 + 2)
    assert start2 == last1 and last2 >= last1 + 2

    params = {"w": jnp.zeros(4, jnp.float32)}
    abstract = {"params": params, "opt_state": optax.sgd(0.1).init(params)}
    with Checkpointer(ckdir, save_every=1000, read_only=True) as ro:
        assert ro.all_steps() == [last1, last2]
        r = ro.restore(abstract)
    assert r.step == last2
    # w_n = 1 - 0.8**n for sgd(0.1) on (w - 1)^2: the resumed run continued exactly.
    np.testing.assert_allclose(np.asarray(r.state["params"]["w"]), 1 - 0.8 ** last2, rtol=1e-5)


MULTIPROCESS_SCRIPT = textwrap.dedent("""
    import json, os, signal, sys, time
    pid, port, ckdir, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    import jax, numpy as np
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except Exception:
        pass
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)
    from jax.sharding import NamedSharding, PartitionSpec as P
    import grain
    from sage_jax.train.checkpoint import Checkpointer, abstract_like
    from sage_jax.train.preemption import PreemptionGuard, any_process

    def data_iter(advance):  # host pid reads its own shard, at its own position
        it = iter(grain.MapDataset.range(100)[pid::2].to_iter_dataset())
        for _ in range(advance):
            next(it)
        return it

    mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    w = jax.make_array_from_callback((8,), NamedSharding(mesh, P("data")),
                                     lambda idx: np.arange(8.0, dtype=np.float32)[idx])
    state = {"w": w, "step": 5}
    res = {}
    with Checkpointer(ckdir, save_every=1) as ck:
        ck.save(5, state=state, data_iter=data_iter(pid + 3), config={"n": 2}, force=True)
        ck.wait()
        it = data_iter(0)
        r = ck.restore(abstract_like(state), data_iter=it)
        res["data"], res["config"] = [r.data_restored, int(next(it))], r.config
        res["w_ok"] = all(np.array_equal(np.asarray(s.data), np.arange(8.0)[s.index])
                          for s in r.state["w"].addressable_shards)
    res["any"] = [any_process(False), any_process(pid == 1)]

    def preempt_loop(guard):
        for step in range(1, 500):
            if pid == 1 and step == 5:
                os.kill(os.getpid(), signal.SIGTERM)  # only host 1 is preempted
            if guard.should_stop(step):
                return step
            time.sleep(0.02)

    with PreemptionGuard() as g:  # JAX's preemption sync manager (started by distributed.initialize)
        res["jax"] = [g.mode, preempt_loop(g)]
    with PreemptionGuard(use_jax_sync=False) as g:  # our handler + all-gather of the flags
        res["allgather"] = [g.mode, preempt_loop(g), g.requested]
    with open(out, "w") as f:
        json.dump(res, f)
""")


def test_two_processes_per_host_data_state_and_same_stop_step(tmp_path):
    """Two local JAX processes (2 CPU devices each): one checkpoint with each host's own data
    state, and a SIGTERM to host 1 only makes both hosts stop at the same step."""
    import socket

    script = tmp_path / "mp.py"
    script.write_text(MULTIPROCESS_SCRIPT)
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    procs = [subprocess.Popen([sys.executable, str(script), str(i), str(port), str(tmp_path / "ckpt"),
                               str(tmp_path / f"out{i}.json")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=120)[0].decode())
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    res = [json.loads((tmp_path / f"out{i}.json").read_text()) for i in range(2)]
    for i, r in enumerate(res):
        assert r["data"] == [True, i + 2 * (i + 3)] and r["config"] == {"n": 2} and r["w_ok"]
        assert r["any"] == [False, True]
    assert sorted(p.name for p in (tmp_path / "ckpt" / "5" / "data").glob("process_*")) == [
        "process_0-of-2.json", "process_1-of-2.json"]
    assert res[0]["jax"][0] == "jax" and res[0]["jax"][1] == res[1]["jax"][1] >= 5
    assert res[0]["allgather"][:2] == res[1]["allgather"][:2] == ["allgather", 5]
    assert [r["allgather"][2] for r in res] == [False, True]  # only host 1 got the signal
