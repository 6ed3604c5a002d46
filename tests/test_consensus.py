"""Consensus rank aggregation on hand-built score tables, ties included."""

from __future__ import annotations

import math

import pytest

from secateurs.criteria.consensus import consensus_ranking, fractional_ranks
from secateurs.errors import SecateursError


def test_fractional_ranks_smallest_first_ties_share_the_mean_rank():
    assert fractional_ranks({4: 0.3, 7: 0.1, 9: 0.2}) == {7: 1.0, 9: 2.0, 4: 3.0}
    ranks = fractional_ranks({1: 0.5, 2: 0.1, 3: 0.5, 4: 0.9, 5: 0.5})
    assert ranks == {2: 1.0, 1: 3.0, 3: 3.0, 5: 3.0, 4: 5.0}
    assert sum(ranks.values()) == 5 * 6 / 2


def test_rank_sum_not_score_sum_decides():
    # metric "b" has a huge scale; summing raw scores would let it decide alone
    table = {"a": {1: 0.10, 2: 0.20, 3: 0.30},
             "b": {1: 900.0, 2: 100.0, 3: 1000.0},
             "c": {1: 0.01, 2: 0.03, 3: 0.02}}
    rows = consensus_ranking(table)
    assert [r.candidate for r in rows] == [1, 2, 3]
    assert [r.rank_sum for r in rows] == [4.0, 6.0, 8.0]
    assert rows[0].ranks == {"a": 1.0, "b": 2.0, "c": 1.0}


def test_tied_rank_sums_go_to_the_smaller_worst_rank_then_the_deeper_layer():
    # all three tie at rank sum 4; layer 2 is never ranked worse than 2, layers 1 and 3 are ranked 3 once
    table = {"a": {1: 0.1, 2: 0.2, 3: 0.3}, "b": {1: 0.3, 2: 0.2, 3: 0.1}}
    rows = consensus_ranking(table)
    assert [(r.candidate, r.rank_sum, r.worst_rank) for r in rows] == [(2, 4.0, 2.0), (3, 4.0, 3.0), (1, 4.0, 3.0)]
    table = {"a": {1: 0.1, 2: 0.2, 3: 0.3}, "b": {1: 0.3, 2: 0.1, 3: 0.2}}
    rows = consensus_ranking(table)  # rank sums 1: 1+3, 2: 2+1, 3: 3+2 -> 2 first
    assert [r.candidate for r in rows] == [2, 1, 3]
    table = {"a": {5: 0.1, 6: 0.2}, "b": {5: 0.2, 6: 0.1}}  # full tie: the deeper layer goes first
    assert [r.candidate for r in consensus_ranking(table)] == [6, 5]
    table = {"a": {5: 0.1, 6: 0.1}}  # tied scores inside one metric
    rows = consensus_ranking(table)
    assert [r.candidate for r in rows] == [6, 5] and rows[0].rank_sum == rows[1].rank_sum == 1.5


def test_single_metric_ranking_is_the_metric_order():
    scores = {i: s for i, s in enumerate([0.5, 0.2, 0.9, 0.1, 0.3])}
    assert [r.candidate for r in consensus_ranking({"m": scores})] == sorted(scores, key=scores.get)


def test_bad_tables_are_refused():
    with pytest.raises(SecateursError, match="at least one metric"):
        consensus_ranking({})
    with pytest.raises(SecateursError, match="scored candidates"):
        consensus_ranking({"a": {1: 0.1, 2: 0.2}, "b": {1: 0.1, 3: 0.2}})
    with pytest.raises(SecateursError, match="non-finite"):
        consensus_ranking({"a": {1: math.nan, 2: 0.2}})
    with pytest.raises(SecateursError, match="scored no candidates"):
        consensus_ranking({"a": {}})
