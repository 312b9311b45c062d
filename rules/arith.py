"""Exact integer arithmetic for points and money: splitting and rounding.

Everything here is integers (numerators over a stated denominator): Fraction in
the per-receipt path measured about 5x over the time budget.
"""

from __future__ import annotations

ROUNDING_MODES = ("floor", "half_up", "ceil")


def largest_remainder(total: int, weights: list[int]) -> list[int]:
    """Split total in proportion to weights so the parts sum to total exactly.

    Each part is the floor of its exact share; the units left over go to the
    largest remainders, ties to the lower index. A negative total is split as its
    absolute value and negated, so returns mirror sales.
    """
    if total < 0:
        return [-part for part in largest_remainder(-total, weights)]
    if min(weights, default=0) < 0:
        raise ValueError("weights must not be negative")
    whole = sum(weights)
    if whole == 0:
        if total:
            raise ValueError("cannot split a non-zero total over zero weights")
        return [0] * len(weights)
    parts = [total * weight // whole for weight in weights]
    left = total - sum(parts)
    if left:
        remainders = [total * weight % whole for weight in weights]
        # sorted() is stable, also in reverse: equal remainders keep the lower index first
        for index in sorted(range(len(weights)), key=remainders.__getitem__, reverse=True)[:left]:
            parts[index] += 1
    return parts


def round_fraction(numerator: int, denominator: int, mode: str) -> int:
    """numerator/denominator (both >= 0, denominator > 0) rounded by the program's mode."""
    if mode == "floor":
        return numerator // denominator
    if mode == "ceil":
        return -(-numerator // denominator)
    if mode == "half_up":
        return (2 * numerator + denominator) // (2 * denominator)
    raise ValueError(f"unknown rounding mode {mode!r}")
