"""One request's failure stays that request's: a batch that raises is run again one request at a
time, so the requests that fail alone are told apart from those that were only batched with them."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Failed:
    reason: str


def describe(exc: BaseException, where: str) -> str:
    """A short reason for the run record (the type and the first line, no traceback)."""
    log.exception("%s failed", where)
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}"[:300]


def isolated(run: Callable[[Sequence[int]], Sequence[Any]], n: int, where: str, rerunnable: Optional[Sequence[bool]] = None) -> list[Any]:
    """run(indices) -> one result per index, for all n at once; if that raises, for each index alone,
    a `Failed` standing in for the results of those that raise again.

    rerunnable[i] False: request i cannot run again after a failed batch (a hybrid LM's sequence that
    continues from its state, which the failed batch may have advanced part way): it fails with the batch."""
    if n == 0:
        return []
    try:
        return list(run(range(n)))
    except Exception as exc:
        reason = describe(exc, where)
        if n == 1:
            return [Failed(reason)]
        log.warning("%s: a batch of %d failed (%s); running its requests one by one", where, n, exc)
    out: list[Any] = []
    for i in range(n):
        if rerunnable is not None and not rerunnable[i]:
            out.append(Failed(f"{reason} (its batch failed part way through its linear-attention state: not run again)"))
            continue
        try:
            out.extend(run([i]))
        except Exception as exc:
            out.append(Failed(describe(exc, where)))
    return out
