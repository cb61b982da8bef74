"""The one progress bar of sage-jax: a tqdm bar with rate and ETA, usable from every layer.

    with progress(len(items), "annotate", unit="dlg", show=flag) as bar:
        for chunk in chunks:
            ...
            bar.update(len(chunk), postfix={"loss": 0.42})

``show``: ``True`` always, ``False`` never, ``None`` (default) lets tqdm decide: shown on a
terminal, hidden in logs and tests. Multi-host callers pass ``show=jax.process_index() == 0``
so that one host draws it. Postfix values are formatted as numbers (``{:.4g}``) or strings;
anything else (a device array, say) is left out, so a bar never waits on a device.

Imports nothing from sage_jax (and not JAX): every package may use it.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

__all__ = ["Progress", "progress"]


class Progress:
    """A tqdm bar (see the module docstring); :attr:`n` counts units even when hidden."""

    def __init__(self, total: int | None = None, desc: str = "", *, unit: str = "it", initial: int = 0,
                 show: bool | None = None, unit_scale: bool = False, leave: bool = True, file: Any = None):
        from tqdm.auto import tqdm

        self._n = int(initial)
        self._bar = tqdm(total=total, desc=desc, unit=unit, initial=initial, unit_scale=unit_scale, leave=leave,
                         disable=None if show is None else not show, dynamic_ncols=True, mininterval=0.5,
                         smoothing=0.1, file=file)

    def update(self, n: int = 1, postfix: Mapping[str, Any] | None = None) -> None:
        if postfix:
            self.set_postfix(postfix)
        self._n += n
        self._bar.update(n)

    def set_postfix(self, postfix: Mapping[str, Any]) -> None:
        items: dict[str, Any] = {}
        for k, v in postfix.items():
            if isinstance(v, str | numbers.Integral):  # numpy integer scalars register as Integral
                items[k] = v
            elif isinstance(v, numbers.Real):
                items[k] = f"{float(v):.4g}"
        self._bar.set_postfix(items, refresh=False)

    @property
    def n(self) -> int:
        """Units done so far (counted even when the bar is hidden)."""
        return self._n

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress(total: int | None = None, desc: str = "", *, unit: str = "it", initial: int = 0,
             show: bool | None = None, unit_scale: bool = False, leave: bool = True, file: Any = None) -> Progress:
    """A progress bar over ``total`` units (``None``: unknown) starting at ``initial`` (a resume);
    ``unit_scale``: 1.2k / 3.4M units (bytes, characters); ``leave``: keep the finished bar on screen;
    ``file``: default stderr."""
    return Progress(total, desc, unit=unit, initial=initial, show=show, unit_scale=unit_scale, leave=leave,
                    file=file)
