"""Whole-run checkpoints over Orbax ``CheckpointManager``.

One :class:`Checkpointer` per run directory. Each step directory holds a few Orbax *items*::

    <directory>/<step>/
        state/       StandardSave: the train-state pytree (params or LoRA params, optimizer
                     state, step counter, PRNG key ...); every host writes its own shards.
        meta/        JSON (process 0): format version, step, process count, which leaves
                     are typed PRNG keys (saved as ``jax.random.key_data``) and their
                     implementation (for ``jax.random.wrap_key_data`` on restore).
        data/        Grain's own Orbax handler (``grain.checkpoint.CheckpointHandler``): one
                     ``process_<i>-of-<n>.json`` per host with its data-iterator state (hosts
                     read different shards, so their states differ).
        config/      JSON (process 0): the resolved run config.
        tokenizer/   JSON (process 0): ``{"files": {relative name: {"text": ...} | {"base64": ...}}}``,
                     every file of the tokenizer directory, written back by
                     :meth:`Checkpointer.restore_tokenizer`.
        metrics/     Orbax's own metrics item (only with ``keep_best``, only on steps saved with
                     ``metrics=``): e.g. ``{"loss": 0.61}``, the validation metrics of that step.

Saves are asynchronous: ``save`` returns once device arrays have been copied to host memory
(so the next step may donate its buffers) and the write and the atomic rename of
``<step>.orbax-checkpoint-tmp-*`` to ``<step>`` happen in a background thread. ``wait()``
blocks until pending saves are committed; ``close()`` waits and releases the manager.
A step directory that was never finalised (a crash mid-save) is not a checkpoint: it is
ignored by ``latest_step``/``restore`` and removed when a writable Checkpointer opens the
directory.

When to save is Orbax's decision (:meth:`Checkpointer.should_save` is
``CheckpointManager.should_save``): a ``FixedIntervalPolicy(save_every)``, Orbax's
``PreemptionCheckpointingPolicy`` (JAX's preemption sync point, multi-host) and, when a
:class:`~sage_jax.train.preemption.PreemptionGuard` is given, its SIGTERM hook (see there).
Every host must call ``save``/``restore`` with the same step (they are collectives); every
policy decides the same way on every host.

Which checkpoints survive is Orbax's preservation policy: ``LatestN(keep)`` and, with
``keep_best`` (the reference DPO recipe keeps its best checkpoint by validation loss), also
``BestN(n=1)`` over the steps saved with ``metrics=`` (Orbax's ``metrics`` item, committed with
the step), so the best one is kept however many newer ones follow. :meth:`Checkpointer.best`
reads those metrics back (it works on any directory, read-only too).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import grain.checkpoint as grain_ckpt
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

if TYPE_CHECKING:
    from sage_jax.train.preemption import PreemptionGuard

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
STATE, META, DATA, CONFIG, TOKENIZER = "state", "meta", "data", "config", "tokenizer"


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Restored:
    """What :meth:`Checkpointer.restore` gives back."""

    step: int
    state: Any
    data_restored: bool = False  # the data iterator given to restore() now continues from the checkpoint
    config: dict | None = None
    meta: dict | None = None


def _frozen_json(obj: Any, what: str) -> Any:
    """A deep copy through JSON: validates now (in the caller's thread, with a clear error) and
    decouples the saved value from later mutation (Orbax serialises JSON items in the
    background commit thread, after ``save`` has returned)."""
    try:
        return json.loads(json.dumps(obj))
    except (TypeError, ValueError) as e:
        raise TypeError(f"checkpoint {what} must be JSON-serialisable: {e}") from e


def _is_prng_key(x: Any) -> bool:
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        return False
    try:
        return jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
    except TypeError:
        return False


def _key_impl_name(key: jax.Array) -> str:
    impl = jax.random.key_impl(key)
    return impl if isinstance(impl, str) else getattr(impl, "name", str(impl))


def key_to_saveable(key: jax.Array) -> jax.Array:
    """A typed PRNG key as it is stored in a checkpoint: its ``jax.random.key_data`` (``uint32``)."""
    return jax.random.key_data(key)


def key_from_saved(data: jax.Array, impl_name: str | None) -> jax.Array:
    """Inverse of :func:`key_to_saveable`: ``jax.random.wrap_key_data`` with the implementation
    recorded at save time (``None``: JAX's default implementation)."""
    return jax.random.wrap_key_data(data, impl=impl_name) if impl_name else jax.random.wrap_key_data(data)


def _abstract_leaf(x: Any) -> Any:
    """``jax.Array`` -> ``ShapeDtypeStruct`` with its sharding; anything else unchanged."""
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return x


def _key_data_sharding(sharding: Any, data_ndim: int) -> Any:
    """Sharding for the ``uint32`` data of a typed key array with the given ``sharding``."""
    if sharding is None:
        return None
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = tuple(sharding.spec)
        spec = spec + (None,) * (data_ndim - len(spec))
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))
    if isinstance(sharding, jax.sharding.SingleDeviceSharding):
        return sharding
    # Anything else: restore the (tiny) key data replicated on the same devices, then place it.
    devices = np.array(sorted(sharding.device_set, key=lambda d: d.id))
    return jax.sharding.NamedSharding(jax.sharding.Mesh(devices, ("_keys",)), jax.sharding.PartitionSpec())


def read_dir_files(directory: str | os.PathLike) -> dict[str, dict[str, str]]:
    """Every regular file under ``directory`` as ``{relative posix path: {"text"|"base64": ...}}``."""
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"tokenizer directory {root} does not exist")
    files: dict[str, dict[str, str]] = {}
    for p in sorted(root.rglob("*")):
        if not p.is_file():
            continue
        raw = p.read_bytes()
        rel = p.relative_to(root).as_posix()
        try:
            files[rel] = {"text": raw.decode("utf-8")}
        except UnicodeDecodeError:
            files[rel] = {"base64": base64.b64encode(raw).decode("ascii")}
    return files


def write_dir_files(files: Mapping[str, Mapping[str, str]], out_dir: str | os.PathLike) -> Path:
    """Inverse of :func:`read_dir_files`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for rel, content in files.items():
        target = (out / rel).resolve()
        if out.resolve() not in target.parents:
            raise ValueError(f"refusing to write {rel!r} outside {out}")
        target.parent.mkdir(parents=True, exist_ok=True)
        if "text" in content:
            target.write_bytes(content["text"].encode("utf-8"))
        else:
            target.write_bytes(base64.b64decode(content["base64"]))
    return out


# --------------------------------------------------------------------------------------------
# the checkpointer
# --------------------------------------------------------------------------------------------


class Checkpointer:
    """Async, keep-N, save-every-N checkpoints of a whole training run.

    Args:
      directory: the run's checkpoint root (local path or anything ``etils.epath`` opens).
      save_every: :meth:`should_save` is true every ``save_every`` steps (``0``: only on
        preemption; save the end of the run with ``force=True``).
      keep: how many of the most recent checkpoints to keep (``None``: all).
      async_save: write in a background thread (``False``: ``save`` returns when committed).
      read_only: open an existing directory for restores only (tools such as export or chat on
        a directory a trainer may be writing to: never deletes anything).
      preemption: a :class:`~sage_jax.train.preemption.PreemptionGuard` whose SIGTERM hook
        feeds :meth:`should_save` (Orbax's own preemption policy only sees JAX's multi-host
        preemption sync point, never a plain SIGTERM to a single process).
      keep_best: also keep, beyond the ``keep`` latest, the step with the lowest ``best_metric``
        among the steps saved with ``metrics=`` (Orbax ``BestN(n=1)``; the metrics are written
        with the step, so the choice survives a restart).
      best_metric: the key of ``metrics`` that ranks checkpoints (lower is better).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        save_every: int,
        keep: int | None = 3,
        async_save: bool = True,
        read_only: bool = False,
        preemption: "PreemptionGuard | None" = None,
        keep_best: bool = False,
        best_metric: str = "loss",
    ):
        if save_every < 0:
            raise ValueError(f"save_every must be >= 0, got {save_every}")
        if keep is not None and keep < 1:
            raise ValueError(f"keep must be >= 1 or None, got {keep}")
        # Orbax (tensorstore/OCDBT) needs absolute paths; keep remote URLs (gs://...) as they are.
        self.directory = epath.Path(directory if "://" in str(directory) else os.path.abspath(directory))
        self.save_every = int(save_every)
        self.keep = keep
        self.async_save = bool(async_save)
        self.read_only = bool(read_only)
        self.keep_best = bool(keep_best)
        self.best_metric = str(best_metric)
        self._tokenizer_cache: tuple[Any, dict] | None = None
        self._closed = False
        cm = ocp.checkpoint_managers
        # The policies CheckpointManagerOptions(save_interval_steps=N) builds, minus its
        # InitialSavePolicy (a checkpoint after the first step of every fresh run), plus the
        # guard's SIGTERM hook: Orbax takes either save_interval_steps or a save_decision_policy,
        # and only the latter can carry the hook.
        policies: list[Any] = [cm.FixedIntervalPolicy(self.save_every)] if self.save_every else []
        policies.append(cm.PreemptionCheckpointingPolicy())
        if preemption is not None:
            policies.append(preemption.save_policy())
        preserve: Any = cm.LatestN(n=keep)
        best_fn = None
        if self.keep_best:
            metric = self.best_metric
            best_fn = lambda m: float(m[metric])  # noqa: E731
            # reverse=True sorts descending, so BestN's "last n" are the lowest values.
            preserve = cm.AnyPreservationPolicy([preserve, cm.BestN(
                get_metric_fn=best_fn, reverse=True, n=1, keep_checkpoints_without_metrics=False)])
            _quiet_missing_metrics_warning()
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=cm.AnySavePolicy(policies),
            preservation_policy=preserve,
            # Orbax writes a step's metrics item only when best_fn is set; ranking is the policy's.
            best_fn=best_fn,
            best_mode="min",
            enable_async_checkpointing=self.async_save,
            read_only=self.read_only,
            create=not self.read_only,
            # Leftovers of a save that crashed before its atomic rename; never touch them when
            # only reading (a live trainer may be writing one right now).
            cleanup_tmp_directories=not self.read_only,
        )
        self._mngr = ocp.CheckpointManager(self.directory, options=options)

    # ---- queries -------------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        """Finalised checkpoint steps, ascending."""
        if self.read_only:
            self._mngr.reload()
        return sorted(int(s) for s in self._mngr.all_steps())

    def latest_step(self) -> int | None:
        """The newest finalised checkpoint step, or ``None`` when there is none."""
        if self.read_only:
            self._mngr.reload()
        return self._mngr.latest_step()

    def best(self) -> tuple[int, float] | None:
        """``(step, value)`` of the finalised step with the lowest ``best_metric`` among those saved
        with ``metrics=`` (ties: the earlier step), or ``None`` when no step has it."""
        found = []
        for s in self.all_steps():
            m = self._mngr.metrics(s)
            if isinstance(m, Mapping) and self.best_metric in m:
                found.append((float(m[self.best_metric]), s))
        if not found:
            return None
        value, step = min(found)
        return step, value

    def should_save(self, step: int) -> bool:
        """Whether to save at ``step`` (> 0, newer than the latest checkpoint): Orbax's
        ``CheckpointManager.should_save`` with the policies above (every ``save_every`` steps, or
        a preemption). Every host agrees; with a multi-host preemption guard it is a collective."""
        if self.read_only or step <= 0:
            return False
        return self._mngr.should_save(int(step))

    def step_dir(self, step: int) -> epath.Path:
        return self.directory / str(int(step))

    # ---- save ----------------------------------------------------------------------------

    def _tokenizer_files(self, tokenizer_dir: str | os.PathLike) -> dict:
        root = Path(tokenizer_dir)
        stamp = (str(root.resolve()),
                 tuple((p.relative_to(root).as_posix(), p.stat().st_mtime_ns, p.stat().st_size)
                       for p in sorted(root.rglob("*")) if p.is_file()))
        if self._tokenizer_cache is None or self._tokenizer_cache[0] != stamp:
            self._tokenizer_cache = (stamp, {"files": read_dir_files(root)})
        return self._tokenizer_cache[1]

    def save(
        self,
        step: int,
        *,
        state: Any,
        data_iter: Any = None,
        config: Mapping[str, Any] | None = None,
        tokenizer_dir: str | os.PathLike | None = None,
        force: bool = False,
        metrics: Mapping[str, float] | None = None,
    ) -> bool:
        """Save ``step`` if the schedule says so (or ``force``); returns whether a save started.

        ``metrics`` (with ``keep_best``): this step's validation metrics, written with the step
        (Orbax's ``metrics`` item) and ranked by the preservation policy.

        Call on every host with the same arguments except ``data_iter`` (each host's own Grain
        iterator, ``grain.DatasetIterator`` or ``grain.DataLoaderIterator``: its state is taken
        now, by Grain's checkpoint handler, in the blocking part of the save).
        A step that is already saved is never overwritten (returns ``False``). With
        ``async_save`` this returns once arrays are on the host; call :meth:`wait` to block
        until the checkpoint is committed (before exiting, e.g. on preemption). Orbax first
        waits for the previous save to commit, so saving more often than a save takes blocks.
        """
        step = int(step)
        if self.read_only:
            raise RuntimeError(f"Checkpointer on {self.directory} is read-only")
        if not (force or self.should_save(step)):
            return False
        if step in self._mngr.all_steps():
            log.info("checkpoint for step %d already exists; not saving again", step)
            return False

        key_impls: dict[str, str] = {}

        def to_saveable(path, x):
            if _is_prng_key(x):
                key_impls[jax.tree_util.keystr(path)] = _key_impl_name(x)
                return key_to_saveable(x)
            return x

        saveable = jax.tree_util.tree_map_with_path(to_saveable, state)
        items: dict[str, Any] = {STATE: ocp.args.StandardSave(saveable)}
        meta = {
            "format": FORMAT_VERSION,
            "step": step,
            "process_count": jax.process_count(),
            "prng_keys": key_impls,
            "items": [STATE, META],
            "saved_at": time.time(),
        }
        if data_iter is not None:
            items[DATA] = grain_ckpt.CheckpointSave(data_iter)
            meta["items"].append(DATA)
        if config is not None:
            items[CONFIG] = ocp.args.JsonSave(_frozen_json(dict(config), "config"))
            meta["items"].append(CONFIG)
        if tokenizer_dir is not None:
            items[TOKENIZER] = ocp.args.JsonSave(self._tokenizer_files(tokenizer_dir))
            meta["items"].append(TOKENIZER)
        items[META] = ocp.args.JsonSave(meta)

        t0 = time.perf_counter()
        if metrics is not None:
            if not self.keep_best:
                raise ValueError("metrics= needs a Checkpointer with keep_best=True")
            metrics = {k: float(v) for k, v in metrics.items()}
            if self.best_metric not in metrics:
                raise ValueError(f"metrics must contain {self.best_metric!r}, got {sorted(metrics)}")
        saved = self._mngr.save(step, args=ocp.args.Composite(**items), force=True, metrics=metrics)
        log.info("checkpoint step %d %s in %.3fs (blocking part)", step,
                 "started" if self.async_save else "written", time.perf_counter() - t0)
        return bool(saved)

    def wait(self) -> None:
        """Block until every pending save is committed (and old steps are pruned)."""
        self._mngr.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release the manager (idempotent)."""
        if not self._closed:
            self._closed = True
            self._mngr.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- restore -------------------------------------------------------------------------

    def _resolve_step(self, step: int | None) -> int:
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no finalised checkpoint in {self.directory}")
        elif int(step) not in self.all_steps():
            raise FileNotFoundError(f"no finalised checkpoint for step {step} in {self.directory}")
        return int(step)

    def _has_item(self, step: int, item: str) -> bool:
        return (self.step_dir(step) / item).exists()

    def read_meta(self, step: int | None = None) -> dict:
        step = self._resolve_step(step)
        return dict(self._mngr.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META])

    def restore(
        self,
        abstract_state: Any,
        step: int | None = None,
        *,
        data_iter: Any = None,
        data: bool = True,
        config: bool = True,
    ) -> Restored:
        """Restore ``step`` (default: the latest) into the structure of ``abstract_state``.

        ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` with ``.sharding`` (concrete
        ``jax.Array`` leaves are also accepted and only their shape/dtype/sharding used); each
        array is read straight into its sharding, which may differ from the saved one (resharding
        on restore). Typed PRNG key leaves (``jax.random.key`` dtype) come back as typed keys
        (:func:`key_from_saved`). ``data_iter``: a fresh Grain iterator of the same pipeline, set
        in place by Grain's handler to this host's saved position (``data=False``: leave it
        alone, restarting the data pipeline). Call on every host.
        """
        step = self._resolve_step(step)
        abstract = jax.tree.map(_abstract_leaf, abstract_state)
        leaves, treedef = jax.tree_util.tree_flatten(abstract)
        key_info: dict[int, Any] = {}
        target_leaves = []
        for i, leaf in enumerate(leaves):
            if _is_prng_key(leaf):
                data_shape = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(leaf.shape, leaf.dtype))
                target_leaves.append(jax.ShapeDtypeStruct(
                    data_shape.shape, data_shape.dtype,
                    sharding=_key_data_sharding(getattr(leaf, "sharding", None), len(data_shape.shape))))
                key_info[i] = leaf
            else:
                target_leaves.append(leaf)
        target = treedef.unflatten(target_leaves)

        items: dict[str, Any] = {STATE: ocp.args.StandardRestore(target), META: ocp.args.JsonRestore()}
        want_data = data and data_iter is not None and self._has_item(step, DATA)
        want_config = config and self._has_item(step, CONFIG)
        if want_data:
            fname = f"process_{jax.process_index()}-of-{jax.process_count()}.json"  # Grain's name
            if not (self.step_dir(step) / DATA / fname).exists():
                found = sorted(p.name for p in (self.step_dir(step) / DATA).iterdir())
                raise FileNotFoundError(
                    f"checkpoint step {step} has no data-iterator state {fname} for this host "
                    f"(found {found}); the process count changed? Restore with data=False to "
                    f"restart the data pipeline instead.")
            items[DATA] = grain_ckpt.CheckpointRestore(data_iter)
        if want_config:
            items[CONFIG] = ocp.args.JsonRestore()
        out = self._mngr.restore(step, args=ocp.args.Composite(**items))

        meta = dict(out[META])
        impls = meta.get("prng_keys", {})
        restored_leaves = treedef.flatten_up_to(out[STATE])
        paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(abstract)[0]]
        for i, leaf in key_info.items():
            key = key_from_saved(restored_leaves[i], impls.get(paths[i]))
            want = getattr(leaf, "sharding", None)
            if want is not None and key.sharding != want:
                key = jax.device_put(key, want)
            restored_leaves[i] = key
        return Restored(
            step=step,
            state=treedef.unflatten(restored_leaves),
            data_restored=want_data,
            config=dict(out[CONFIG]) if want_config else None,
            meta=meta,
        )

    def restore_config(self, step: int | None = None) -> dict | None:
        """The run config saved with ``step`` (default latest), or ``None`` if none was saved."""
        step = self._resolve_step(step)
        if not self._has_item(step, CONFIG):
            return None
        return dict(self._mngr.restore(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))[CONFIG])

    def tokenizer_files(self, step: int | None = None) -> dict[str, dict[str, str]] | None:
        """The tokenizer files saved with ``step`` (see :func:`read_dir_files`), or ``None``."""
        step = self._resolve_step(step)
        if not self._has_item(step, TOKENIZER):
            return None
        out = self._mngr.restore(step, args=ocp.args.Composite(**{TOKENIZER: ocp.args.JsonRestore()}))
        return dict(out[TOKENIZER]["files"])

    def restore_tokenizer(self, step: int | None, out_dir: str | os.PathLike) -> Path:
        """Write the tokenizer files saved with ``step`` (``None``: latest) into ``out_dir``."""
        files = self.tokenizer_files(step)
        if files is None:
            raise FileNotFoundError(f"checkpoint step {step} in {self.directory} has no tokenizer")
        return write_dir_files(files, out_dir)


class _DropMissingMetrics(logging.Filter):
    """Orbax warns on every save without metrics once ``best_fn`` is set; here only eval steps
    carry metrics by design, so that warning is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "did not provide metrics" not in str(record.msg)


_FILTER = _DropMissingMetrics()


def _quiet_missing_metrics_warning() -> None:
    absl_logger = logging.getLogger("absl")
    if _FILTER not in absl_logger.filters:
        absl_logger.addFilter(_FILTER)


def abstract_like(tree: Any) -> Any:
    """A pytree of ``ShapeDtypeStruct`` (with shardings) mirroring ``tree``'s ``jax.Array`` leaves."""
    return jax.tree.map(_abstract_leaf, tree)
