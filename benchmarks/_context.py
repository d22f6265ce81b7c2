"""The context every benchmark gets: where Redis is, how big to go, what to share.

Its own module so that the bench modules and the runner that imports them do
not import each other.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bench_propagation import System

__all__ = ["Context"]


@dataclass
class Context:
    url: str
    quick: bool
    run_id: str
    seed: int = 42
    #: Idle pause before each sparse propagation sample (s).
    spacing: float = 0.005
    cdf: dict[str, list[float]] = field(default_factory=dict)
    #: Memory benchmark: holder -> [(entries, RSS bytes per entry)], for the plot.
    memory: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    #: The 4-node banbus samples of run_close, reused by run_scaling.
    propagation4: System | None = None
    namespaces: list[str] = field(default_factory=list)

    @property
    def samples(self) -> int:
        """Sparse propagation samples per system (the issue asks for >= 300)."""
        return 300 if self.quick else 1000

    def ns(self, name: str) -> str:
        namespace = f"bench{self.run_id}-{name}"
        if namespace not in self.namespaces:
            self.namespaces.append(namespace)
        return namespace

    def log(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)
