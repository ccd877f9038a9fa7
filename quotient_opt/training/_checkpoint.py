"""Checkpoints of :func:`~quotient_opt.train_population`: save, resume, recover damaged files.

A checkpoint directory holds ``meta.json`` (the run's arguments: a rerun with
other ones is refused), one ``chunk_NNNNNN.npz`` per finished chunk and
``current.npz``, the latest save inside the running chunk. Every file is
written atomically (a temporary file, then ``os.replace``). A file that
cannot be read back whole, or whose arrays do not fit the run, is renamed
``<name>.damaged`` with a warning and its work is redone; the other files are
kept. Arrays are stored as ``numpy`` arrays, PRNG keys as their key data,
one pytree per prefix (``p0, p1, ...`` for the params).
"""

from __future__ import annotations

import functools
import json
import os
import warnings
import zipfile
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any

#: the version written into ``meta.json`` (a change refuses older directories)
VERSION = 1


def to_host(tree: PyTree) -> list[np.ndarray]:
    """The leaves of ``tree`` as ``numpy`` arrays (PRNG keys as their key data)."""
    out = []
    for leaf in jax.tree.leaves(tree):
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        out.append(np.asarray(leaf))
    return out


def host_shapes(tree: PyTree) -> PyTree:
    """``tree`` with PRNG keys as their key data (what :func:`to_host` writes), for shapes."""
    return jax.tree.map(
        lambda x: jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x,
        tree,
    )


def from_host(arrays: list[np.ndarray], like: PyTree) -> PyTree:
    """Inverse of :func:`to_host`: ``arrays`` in the structure of ``like`` (keys re-wrapped)."""
    leaves, treedef = jax.tree.flatten(like)
    if len(arrays) != len(leaves):
        raise ValueError("checkpoint: wrong number of arrays")
    out = []
    for a, leaf in zip(arrays, leaves):
        if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            a = jax.random.wrap_key_data(a, impl=jax.random.key_impl(leaf))
        out.append(a)
    return treedef.unflatten(out)


def pack(prefix: str, arrays: list[np.ndarray]) -> dict[str, np.ndarray]:
    """``{prefix0: arrays[0], prefix1: ...}``."""
    return {f"{prefix}{i}": a for i, a in enumerate(arrays)}


def unpack(data: Mapping[str, np.ndarray], prefix: str) -> list[np.ndarray]:
    """Inverse of :func:`pack`."""
    n = sum(1 for k in data if k.startswith(prefix) and k[len(prefix) :].isdigit())
    return [data[f"{prefix}{i}"] for i in range(n)]


def expect(data: Mapping[str, np.ndarray], prefix: str, shapes: list[tuple[int, ...]]) -> None:
    """Raises ``ValueError`` unless ``data`` holds arrays ``prefix0..`` of exactly these shapes."""
    got = [a.shape for a in unpack(data, prefix)]
    if got != [tuple(x) for x in shapes]:
        raise ValueError(f"arrays {prefix}*: shapes {got}, expected {list(shapes)}")


def atomic_savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez(path, **arrays)`` through a temporary file and ``os.replace``."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(
    path: Path, check: Callable[[dict[str, np.ndarray]], None]
) -> dict[str, np.ndarray] | None:
    """Every array of the ``.npz`` file ``path``, or ``None`` (with a warning) if it is damaged.

    A file that cannot be read whole (truncated, corrupted: ``zipfile``,
    ``zlib`` or ``numpy`` errors) or that ``check`` rejects (``ValueError``:
    missing arrays, wrong shapes) is renamed to ``<name>.damaged``, so that
    the work it held is redone and the file stays available for a look.
    """
    try:
        with np.load(path) as d:
            data = {k: d[k] for k in d.files}
        check(data)
        return data
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, KeyError) as e:
        damaged = path.with_name(path.name + ".damaged")
        os.replace(path, damaged)
        warnings.warn(
            f"train_population: checkpoint file {path} is damaged ({type(e).__name__}: {e}); "
            f"moved it to {damaged.name} and redoing its work",
            stacklevel=4,
        )
        return None


def fingerprint(*, nets: int, steps: int, chunk: int, segment_steps: int, history_every: int,
                track_best: bool, key: jax.Array, params: list[Any], state: PyTree,
                shared: tuple[bool, ...], loss0: float,
                stacked: PyTree | None) -> dict[str, Any]:
    """What ``meta.json`` records of a run: its arguments, the shapes of one network's
    ``params`` leaves and of a chunk's optimizer ``state``, the loss at the first init
    (``loss0``) and, for ``stacked`` initial params, the sum of their magnitudes."""
    out = {
        "version": VERSION,
        "nets": nets,
        "steps": steps,
        "chunk_size": chunk,
        "segment_steps": segment_steps,
        "history_every": history_every,
        "track_best": bool(track_best),
        "key": np.asarray(jax.random.key_data(key)).tolist(),
        "params": [[list(x.shape), str(x.dtype)] for x in params],
        "state": [[list(x.shape), str(x.dtype)] for x in jax.tree.leaves(state)],
        "state_tree": str(jax.tree.structure(state)),
        "shared_state": list(shared),
        "loss_at_first_init": repr(loss0),
    }
    if stacked is not None:
        out["stacked_init_sum"] = repr(
            float(sum(np.sum(np.abs(a), dtype=np.float64) for a in jax.tree.leaves(stacked)))
        )
    return out


class Checkpoint:
    """The checkpoint directory of one :func:`~quotient_opt.train_population` run.

    Args:
      directory: the directory (created if missing).
      fingerprint: the run's arguments, JSON-serializable; a directory whose
        ``meta.json`` differs is refused.
      steps: steps per network.
      history_every: steps between recorded losses.
      chunk: networks per chunk.
      params: one network's parameter leaves (shapes).
      state: a chunk's optimizer state (shapes).
      track_best: whether the best parameters are kept too.

    Raises:
      ValueError: if ``meta.json`` is unreadable or was written by a run with
        other arguments (the message names the arguments that differ).
    """

    def __init__(self, directory: str | os.PathLike, fingerprint: dict[str, Any], *,
                 steps: int, history_every: int, chunk: int, params: list[Any],
                 state: PyTree, track_best: bool) -> None:
        self.directory = Path(directory)
        self.current = self.directory / "current.npz"
        self.steps, self.history_every, self.chunk = steps, history_every, chunk
        self.params, self.track_best = params, track_best
        self.n_hist = -(-steps // history_every)
        self.state_shapes = [x.shape for x in jax.tree.leaves(jax.eval_shape(host_shapes, state))]
        self._open(fingerprint)

    def _open(self, fingerprint: dict[str, Any]) -> None:
        meta = self.directory / "meta.json"
        if not meta.exists():
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp = meta.with_name("meta.json.tmp")
            tmp.write_text(json.dumps(fingerprint))
            os.replace(tmp, meta)
            return
        try:
            old = json.loads(meta.read_text())
        except (ValueError, OSError) as e:
            raise ValueError(
                f"checkpoint: {meta} is damaged ({type(e).__name__}: {e}); it says which "
                "run wrote the directory, so delete the directory or pass another"
            ) from e
        diff = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
        if diff:
            raise ValueError(
                f"checkpoint: {self.directory} was written by a run with other arguments "
                f"(differs in: {', '.join(diff)}); delete it or pass another directory"
            )

    def done_file(self, c: int) -> Path:
        """The file of finished chunk ``c``."""
        return self.directory / f"chunk_{c:06d}.npz"

    # ---- what a file must hold (else it is damaged and its work is redone)

    def _check_current(self, d: Mapping[str, np.ndarray]) -> None:
        step = int(d["step"])
        if not (0 < step < self.steps and step % self.history_every == 0
                and int(d["chunk"]) >= 0):
            raise ValueError(f"step {step}")
        if d["history"].shape != (step // self.history_every, self.chunk):
            raise ValueError(f"history shape {d['history'].shape}")
        chunked = [(self.chunk, *x.shape) for x in self.params]
        expect(d, "p", chunked)
        expect(d, "s", self.state_shapes)
        if self.track_best:
            expect(d, "b", chunked)
            if d["best_losses"].shape != (self.chunk,):
                raise ValueError(f"best_losses shape {d['best_losses'].shape}")

    def _check_done(self, real: int, d: Mapping[str, np.ndarray]) -> None:
        if d["losses"].shape != (real,) or d["history"].shape != (real, self.n_hist):
            raise ValueError(f"losses {d['losses'].shape}, history {d['history'].shape}")
        expect(d, "p", [(real, *x.shape) for x in self.params])
        if self.track_best:
            expect(d, "b", [(real, *x.shape) for x in self.params])
            if d["best_losses"].shape != (real,):
                raise ValueError(f"best_losses shape {d['best_losses'].shape}")

    # ---- reading and writing

    def load_done(self, c: int, real: int) -> dict[str, np.ndarray] | None:
        """Finished chunk ``c`` (of ``real`` networks), or ``None`` if absent or damaged."""
        path = self.done_file(c)
        if not path.exists():
            return None
        return load(path, functools.partial(self._check_done, real))

    def load_current(self, c: int) -> dict[str, np.ndarray] | None:
        """The save inside running chunk ``c``, or ``None`` (absent, damaged, another chunk's)."""
        if not self.current.exists():
            return None
        d = load(self.current, self._check_current)
        return d if d is not None and int(d["chunk"]) == c else None

    def save_current(self, c: int, step: int, history: np.ndarray, params: PyTree,
                     state: PyTree, best: tuple[jax.Array, PyTree] | None) -> None:
        """Saves running chunk ``c`` at ``step`` (``best``: the best losses and params)."""
        arrays = {"chunk": np.asarray(c), "step": np.asarray(step), "history": history}
        arrays.update(pack("p", to_host(params)))
        arrays.update(pack("s", to_host(state)))
        if best is not None:
            arrays["best_losses"] = np.asarray(best[0])
            arrays.update(pack("b", to_host(best[1])))
        atomic_savez(self.current, arrays)

    def save_done(self, c: int, arrays: dict[str, np.ndarray]) -> None:
        """Saves finished chunk ``c``."""
        atomic_savez(self.done_file(c), arrays)
