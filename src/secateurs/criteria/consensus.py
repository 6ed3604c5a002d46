"""Consensus rank aggregation (Mugnaini et al., arXiv 2411.14345): rank the candidates under every
metric (rank 1 = smallest change), sum the ranks, remove the smallest sums.

Ranks, not raw scores, are summed because the metrics live on unrelated scales (CKA in [0, 1],
Wasserstein in activation units); a rank sum lets each metric vote with equal weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from secateurs.errors import SecateursError


def fractional_ranks(scores: dict[int, float]) -> dict[int, float]:
    """Rank 1 = smallest score; tied scores share the mean of the ranks they span (1, 2.5, 2.5, 4),
    so a tie gives no candidate an edge and the ranks still sum to n(n+1)/2."""
    bad = [k for k, v in scores.items() if not math.isfinite(v)]
    if bad:
        raise SecateursError(f"non-finite scores for candidates {sorted(bad)}")
    order = sorted(scores, key=lambda k: scores[k])
    ranks: dict[int, float] = {}
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        for k in order[i:j + 1]:
            ranks[k] = (i + j) / 2 + 1
        i = j + 1
    return ranks


@dataclass(frozen=True)
class ConsensusRow:
    candidate: int
    rank_sum: float
    worst_rank: float
    ranks: dict[str, float]


def consensus_ranking(table: dict[str, dict[int, float]]) -> list[ConsensusRow]:
    """Candidates ordered best first (least change) from {metric: {candidate: score}}.

    Order: smallest rank sum; ties broken by the smaller worst rank (the candidate no metric
    strongly objects to), then by the larger index (deeper layers are the usual redundant ones,
    and a fixed rule keeps plans reproducible).
    """
    if not table:
        raise SecateursError("consensus needs at least one metric")
    candidates = None
    for metric, scores in table.items():
        if not scores:
            raise SecateursError(f"metric {metric!r} scored no candidates")
        if candidates is None:
            candidates = set(scores)
        elif set(scores) != candidates:
            raise SecateursError(f"metric {metric!r} scored candidates {sorted(scores)}, others {sorted(candidates)}")
    ranks = {metric: fractional_ranks(scores) for metric, scores in table.items()}
    rows = [ConsensusRow(c, sum(r[c] for r in ranks.values()), max(r[c] for r in ranks.values()),
                         {m: r[c] for m, r in ranks.items()}) for c in candidates]
    return sorted(rows, key=lambda row: (row.rank_sum, row.worst_rank, -row.candidate))
