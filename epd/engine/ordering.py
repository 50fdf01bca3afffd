"""Work that arrives on several threads in any order, done in the order it was sent: the sender
numbers each piece per key (`Tickets`), the receiver runs it when its number comes up (`InOrder`)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Hashable, Iterator


class Tickets:
    """The sender's side: the next number per key, from 0."""

    def __init__(self):
        self._next: dict[Hashable, int] = {}

    def take(self, key: Hashable) -> int:
        ticket = self._next.get(key, 0)
        self._next[key] = ticket + 1
        return ticket

    def restart(self, key: Hashable) -> None:
        """Number from 0 again: the receiver behind `key` is a new one (a replaced worker)."""
        self._next.pop(key, None)

    def restart_where(self, pred) -> None:
        """`restart` every key for which `pred(key)` holds."""
        for key in [k for k in self._next if pred(k)]:
            del self._next[key]


class InOrder:
    """The receiver's side: `with turns.turn(key, ticket):` waits until every smaller ticket of `key`
    has had its turn, and hands on when the block ends (also when it raises)."""

    def __init__(self):
        self._cond = threading.Condition()
        self._next: dict[Hashable, int] = {}

    @contextlib.contextmanager
    def turn(self, key: Hashable, ticket: int) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: self._next.get(key, 0) == ticket)
        try:
            yield
        finally:
            with self._cond:
                self._next[key] = ticket + 1
                self._cond.notify_all()
