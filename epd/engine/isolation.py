"""One request's failure stays that request's: a batch that raises is run again one request at a
time, so the requests that fail alone are told apart from those that were only batched with them."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Failed:
    reason: str


def describe(exc: BaseException, where: str) -> str:
    """A short reason for the run record (the type and the first line, no traceback)."""
    log.exception("%s failed", where)
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}"[:300]


def isolated(run: Callable[[Sequence[int]], Sequence[Any]], n: int, where: str) -> list[Any]:
    """run(indices) -> one result per index, for all n at once; if that raises, for each index alone,
    a `Failed` standing in for the results of those that raise again."""
    if n == 0:
        return []
    try:
        return list(run(range(n)))
    except Exception as exc:
        if n == 1:
            return [Failed(describe(exc, where))]
        log.warning("%s: a batch of %d failed (%s); running its requests one by one", where, n, exc)
    out: list[Any] = []
    for i in range(n):
        try:
            out.extend(run([i]))
        except Exception as exc:
            out.append(Failed(describe(exc, where)))
    return out
