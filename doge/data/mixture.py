"""Mixtures: a YAML list of prepared DATADIRs with weights, and the exact interleaving of them.

Weights are reduced to integers w_s with period P = sum(w_s); one period is a fixed sequence of
P source slots holding source s exactly w_s times, repeated forever. So any P consecutive
samples hold the weights exactly, and sample i's source and its index within that source follow
from i alone in O(1). The period is chosen so that every window of N consecutive samples holds
source s N*w_s/P times to within one sample, found by a small depth-first search; when no such
sequence exists (or the period is too long to search), smooth weighted round-robin is used and its
worst window error is logged (always < 2 samples).
"""
import logging
import math
import os
from fractions import Fraction
from pathlib import Path

import numpy as np

from doge.data.errors import DataError

log = logging.getLogger(__name__)
MAX_PERIOD = 100_000
SEARCH_PERIOD = 200
SEARCH_BUDGET = 20_000


def read_mixture(path: Path) -> list[dict]:
    """YAML -> [{name, path, weight}], paths resolved against `root:` (default: the YAML's folder)."""
    import yaml

    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise DataError(f"{path}: cannot read the mixture YAML ({exc}); fix the file") from exc
    example = "sources: [{name: web, path: DATADIR, weight: 70}, ...]"
    if not isinstance(spec, dict) or not isinstance(spec.get("sources"), list) or not spec["sources"]:
        raise DataError(f"{path}: a mixture needs a non-empty 'sources' list, e.g. {example}")
    root = path.parent / os.path.expandvars(str(spec.get("root", ".")))
    sources = []
    for i, entry in enumerate(spec["sources"]):
        if not isinstance(entry, dict) or "path" not in entry or "weight" not in entry:
            raise DataError(f"{path}: sources[{i}] needs 'path' and 'weight' keys, e.g. {example}")
        weight = entry["weight"]
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            raise DataError(f"{path}: sources[{i}] weight {weight!r} must be a positive number")
        datadir = (root / os.path.expandvars(str(entry["path"]))).resolve()
        sources.append({"name": str(entry.get("name", Path(entry["path"]).name)), "path": datadir, "weight": weight})
    return sources


def integer_weights(weights: list) -> list[int]:
    """[70, 20, 5, 5] -> [14, 4, 1, 1]; 0.7/0.2/... work the same (decimal values taken exactly)."""
    fractions = [Fraction(str(w)) for w in weights]
    scale = math.lcm(*(f.denominator for f in fractions))
    ints = [int(f * scale) for f in fractions]
    divisor = math.gcd(*ints)
    ints = [w // divisor for w in ints]
    if sum(ints) > MAX_PERIOD:
        raise DataError(f"mixture weights {weights} repeat only every {sum(ints)} samples; round them "
                        "(e.g. to percent)")
    return ints


class Schedule:
    """Which source serves global sample i, and the how-many-th of that source's samples it is."""

    def __init__(self, weights: list[int]):
        self.weights = list(weights)
        self.period = sum(self.weights)
        self.slots = np.array(_period(self.weights), dtype=np.int64)
        onehot = self.slots[None, :] == np.arange(len(self.weights))[:, None]
        self.before = np.concatenate([np.zeros((len(self.weights), 1), np.int64), np.cumsum(onehot, 1)], 1)
        self.positions = [np.flatnonzero(row) for row in onehot]

    def locate(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Global sample indices -> (source, index within that source's own sequence)."""
        cycle, slot = np.divmod(np.asarray(index, dtype=np.int64), self.period)
        source = self.slots[slot]
        return source, cycle * np.asarray(self.weights)[source] + self.before[source, slot]

    def count_before(self, source: int, index: int) -> int:
        """How many of global samples [0, index) come from `source`."""
        cycle, slot = divmod(index, self.period)
        return cycle * self.weights[source] + int(self.before[source, slot])

    def global_index(self, source: int, k: int) -> int:
        """Global index of the k-th sample drawn from `source` (inverse of locate)."""
        cycle, nth = divmod(k, self.weights[source])
        return cycle * self.period + int(self.positions[source][nth])


def max_window_error(weights: list[int], slots) -> float:
    """Largest |count - N*w/P| over all windows (all lengths, all offsets) of the repeated period."""
    period = sum(weights)
    doubled = np.concatenate([np.asarray(slots)] * 2)
    worst = 0.0
    lengths = np.arange(1, period + 1)[:, None]
    offsets = np.arange(period)[None, :]
    for s, w in enumerate(weights):
        prefix = np.concatenate([[0], np.cumsum(doubled == s)])
        counts = prefix[offsets + lengths] - prefix[offsets]
        worst = max(worst, float(np.abs(counts * period - lengths * w).max()) / period)
    return worst


def _period(weights: list[int]) -> list[int]:
    found = _search(weights) if sum(weights) <= SEARCH_PERIOD else None
    if found is None:
        found = _round_robin(weights)
        log.info("mixture %s: no period with every window within 1 sample; worst window error %.2f samples",
                 weights, max_window_error(weights, found) if sum(weights) <= 2000 else float("nan"))
    return found


def _round_robin(weights: list[int]) -> list[int]:
    """Smooth weighted round-robin: each slot goes to the source with the most accumulated credit."""
    period, credit, slots = sum(weights), [0] * len(weights), []
    for _ in range(period):
        credit = [c + w for c, w in zip(credit, weights)]
        best = max(range(len(weights)), key=lambda s: (credit[s], -s))
        credit[best] -= period
        slots.append(best)
    return slots


def _search(weights: list[int]):
    """Depth-first search for a period whose every (cyclic) window is within 1 sample.

    Candidates are tried in round-robin preference order, so the first leaf is usually a hit;
    windows ending at the newest slot are checked as we go, wrapping windows at the end.
    """
    period, k = sum(weights), len(weights)
    slots, prefix, credit = [], [[0] for _ in range(k)], [0] * k
    nodes = 0

    def fits(length: int, count: int, s: int) -> bool:
        return abs(count * period - length * weights[s]) <= period

    def ends_ok(t: int) -> bool:
        return all(fits(t - a, prefix[s][t] - prefix[s][a], s) for s in range(k) for a in range(t))

    def cyclic_ok() -> bool:
        doubled = slots * 2
        for s in range(k):
            run = np.concatenate([[0], np.cumsum(np.asarray(doubled) == s)])
            for a in range(1, period):
                if not all(fits(n, int(run[a + n] - run[a]), s) for n in range(1, period)):
                    return False
        return True

    def extend(t: int) -> bool:
        nonlocal nodes
        nodes += 1
        if nodes > SEARCH_BUDGET:
            return False
        if t == period:
            return cyclic_ok()
        order = sorted((s for s in range(k) if prefix[s][t] < weights[s]), key=lambda s: (-(credit[s] + weights[s]), s))
        for s in order:
            slots.append(s)
            for q in range(k):
                prefix[q].append(prefix[q][t] + (q == s))
                credit[q] += weights[q]
            credit[s] -= period
            if ends_ok(t + 1) and extend(t + 1):
                return True
            credit[s] += period
            for q in range(k):
                prefix[q].pop()
                credit[q] -= weights[q]
            slots.pop()
        return False

    return list(slots) if extend(0) else None
