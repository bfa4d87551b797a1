"""When to try a destination again: exponential backoff with a cap and a little jitter.

Jitter keeps several series that failed together (a PACS restart) from all hammering the
destination at the same instant when it comes back.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff for transient failures; permanent failures are never retried by policy.

    Attempt ``n`` (1-based) that failed transiently is followed by a wait of
    ``first_delay_s * factor ** (n - 1)``, capped at ``max_delay_s``, give or take ``jitter``
    (a fraction). After ``max_attempts`` attempts the sender gives up.
    """

    max_attempts: int = 8
    first_delay_s: float = 5.0
    factor: float = 2.0
    max_delay_s: float = 600.0
    jitter: float = 0.1

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.first_delay_s < 0 or self.max_delay_s < 0:
            raise ValueError("delays must not be negative")
        if self.factor < 1:
            raise ValueError("factor must be at least 1 (the delay never shrinks)")
        if not 0 <= self.jitter < 1:
            raise ValueError("jitter must be a fraction in [0, 1)")

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after the ``attempt``-th failed attempt (1-based).

        ``rng`` makes the jitter reproducible in tests; without one there is no jitter.
        """
        if attempt < 1:
            raise ValueError("attempt numbers start at 1")
        # min() before the power would overflow for absurd attempt counts.
        exponent = min(attempt - 1, 64)
        base = min(self.first_delay_s * self.factor**exponent, self.max_delay_s)
        if rng is None or self.jitter == 0:
            return base
        return max(0.0, base * (1.0 + rng.uniform(-self.jitter, self.jitter)))

    def exhausted(self, attempts: int) -> bool:
        """True once ``attempts`` attempts have been made and no more are allowed."""
        return attempts >= self.max_attempts
