"""Which instance of a pool gets a request: round-robin or least-loaded."""

from __future__ import annotations

from epd.stages.instance import Instance


class Router:
    def __init__(self, policy: str):
        if policy not in ("round_robin", "least_loaded"):
            raise ValueError(f"unknown routing policy {policy!r}")
        self.policy = policy
        self._next: dict[str, int] = {}

    def order(self, role: str, instances: list[Instance]) -> list[Instance]:
        """Instances in preference order for the next request of this role."""
        if self.policy == "least_loaded":
            return sorted(instances, key=lambda i: i.load())
        start = self._next.get(role, 0) % len(instances)
        self._next[role] = start + 1
        return instances[start:] + instances[:start]

    def choose(self, role: str, instances: list[Instance]) -> Instance:
        return self.order(role, instances)[0]

    def spread(self, role: str, instances: list[Instance], n_items: int) -> list[Instance]:
        """Intra-request parallelism: item i goes to the returned list's i-th entry, in contiguous chunks."""
        ordered = self.order(role, instances)
        m = min(len(ordered), n_items)
        return [ordered[i * m // n_items] for i in range(n_items)]
