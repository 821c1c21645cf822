"""Fact-level metrics (METHOD.md section 5b): normalisation, fact match, token F1, bootstrap intervals. CPU, fast."""

from __future__ import annotations

import pytest
import torch

from gag_lightning.eval.facts import (
    answer_tokens,
    bootstrap_ci,
    fact_match,
    normalize_answer,
    paired_bootstrap,
    token_f1,
)

REFERENCE = "Qwenthar-74 was discovered in 1956."


# ------------------------------------------------------------------------------------ fact match
def test_the_right_terse_answer_beats_the_wrong_fluent_one() -> None:
    assert fact_match("It was 1956.", ["1956"]) == 1.0
    assert fact_match("Qwenthar-74 was discovered in 1987.", ["1956"]) == 0.0
    assert fact_match(REFERENCE, ["1956"]) == 1.0
    # BERTScore-like overlap with the reference would rank these the other way round
    assert token_f1("Qwenthar-74 was discovered in 1987.", REFERENCE) > token_f1("It was 1956.", REFERENCE)


def test_number_formats_are_unified() -> None:
    assert normalize_answer("1,412") == normalize_answer("1412") == normalize_answer("1 412") == "1412"
    assert normalize_answer("1\u202f412") == normalize_answer("1\u00a0412") == "1412"  # narrow / no-break space
    assert normalize_answer("12,345,678 units") == "12345678 units"
    assert fact_match("It melts at 1,412 °C.", ["1412"]) == 1.0
    assert fact_match("It melts at 1412 degrees.", ["1,412 °C", "1412"]) == 1.0
    assert normalize_answer("3.50") == normalize_answer("3.5") == "3.5"
    assert normalize_answer("3.0 kg") == "3 kg"
    assert fact_match("The ratio is 3.50.", ["3.5"]) == 1.0 and fact_match("The ratio is 3.5", ["35"]) == 0.0
    assert normalize_answer("1,412.50") == "1412.5"
    # a year after a comma and a space is not a digit group; a list of small numbers stays a list
    assert normalize_answer("May 5, 2020") == "may 5 2020" and normalize_answer("1,2,3") == "1 2 3"
    assert normalize_answer("-40 °C") == normalize_answer("\u221240 °C") == "-40 c"
    assert fact_match("It freezes at -40 °C.", ["40 °C"]) == 0.0  # the sign is part of the fact
    assert normalize_answer("1956-1960") == "1956 1960"  # a range's dash is not a sign


def test_no_partial_number_match() -> None:
    assert fact_match("catalogue number 19567", ["1956"]) == 0.0
    assert fact_match("in 11956", ["1956"]) == 0.0
    assert fact_match("1956.5 grams", ["1956"]) == 0.0
    assert fact_match("it was 1956, in spring", ["1956"]) == 1.0
    assert fact_match("the 1950s", ["1950"]) == 0.0


def test_articles_punctuation_and_unicode() -> None:
    assert normalize_answer("The U.S.A.!") == normalize_answer("usa") == "usa"
    assert normalize_answer("  An   apple,\tthe pear ") == "apple pear"
    assert fact_match("It is made at the Nordhavn site.", ["Nordhavn site"]) == 1.0
    assert fact_match("Made at Nordhavn.", ["the Nordhavn site"]) == 0.0  # all the alias's words, in order
    assert fact_match("It was made at the Nordhavn (Denmark) site", ["Nordhavn site"]) == 0.0
    assert fact_match("Discovered by Dr. Ilsa Moreau's team", ["Ilsa Moreau"]) == 1.0
    # the letter of "vitamin A" is not an article
    assert fact_match("Vitamin B12 helps", ["vitamin A"]) == 0.0
    assert fact_match("VITAMIN A helps", ["Vitamin A"]) == 1.0
    # composed and decomposed accents agree, compatibility forms (full-width) fold, case folds
    assert normalize_answer("Pel\u00e9") == normalize_answer("PELE\u0301")
    assert normalize_answer("Pelé") != normalize_answer("Pele")  # the accent stays, as in section 5
    assert normalize_answer("\uff21\uff22\uff23\uff11\uff12\uff13") == "abc123"
    assert normalize_answer("Straße") == normalize_answer("STRASSE")
    # an alias that is only an article still means something; one with no tokens never matches
    assert answer_tokens("The") == [] and fact_match("answer: the", ["The"]) == 1.0
    assert fact_match("anything at all", ["?!"]) == 0.0 and fact_match("anything", []) == 0.0


def test_empty_prediction_scores_zero() -> None:
    assert fact_match("", ["1956"]) == 0.0 and fact_match(None, ["1956"]) == 0.0
    assert fact_match("   ", "1956") == 0.0
    assert token_f1("", REFERENCE) == 0.0 and token_f1("1956", "") == 0.0


def test_token_f1_hand_values() -> None:
    assert token_f1(REFERENCE, REFERENCE) == 1.0
    # pred {it, was, 1956}, ref {qwenthar, 74, was, discovered, in, 1956}: 2 common, P = 2/3, R = 2/6
    assert token_f1("It was 1956.", REFERENCE) == pytest.approx(2 * (2 / 3) * (2 / 6) / (2 / 3 + 2 / 6))
    # articles and punctuation do not count; repeated tokens count once per occurrence (bag intersection)
    assert token_f1("the cat sat", "a cat sat down") == pytest.approx(2 * 1.0 * (2 / 3) / (1 + 2 / 3))
    assert token_f1("cat cat cat", "cat dog") == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))
    assert token_f1("completely different", REFERENCE) == 0.0


# ------------------------------------------------------------------------------------ bootstrap
def test_bootstrap_ci_degenerate_on_a_constant_vector() -> None:
    assert bootstrap_ci([0.5] * 20) == (0.5, 0.5, 0.5)
    assert bootstrap_ci([1.0]) == (1.0, 1.0, 1.0)


def test_bootstrap_ci_contains_the_mean_and_matches_the_normal_approximation() -> None:
    values = [1.0] * 25 + [0.0] * 15  # p = 0.625, n = 40: normal-approximation half-width 1.96 * 0.0765 = 0.15
    mean, lo, hi = bootstrap_ci(values, n_resamples=4000, seed=0)
    assert mean == 0.625 and lo < mean < hi
    assert lo == pytest.approx(0.475, abs=0.03) and hi == pytest.approx(0.775, abs=0.03)
    smooth = torch.rand(40, generator=torch.Generator().manual_seed(0)).tolist()
    assert bootstrap_ci(smooth, seed=3) == bootstrap_ci(smooth, seed=3)  # deterministic by seed
    assert bootstrap_ci(smooth, seed=3) != bootstrap_ci(smooth, seed=4)
    # a narrower confidence level gives a narrower interval
    _, lo90, hi90 = bootstrap_ci(values, n_resamples=4000, seed=0, alpha=0.10)
    assert lo < lo90 and hi90 < hi
    with pytest.raises(ValueError, match="no values"):
        bootstrap_ci([])
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_ci([0.0, float("nan")])


def test_bootstrap_in_blocks_equals_one_block(monkeypatch) -> None:
    from gag_lightning.eval import facts

    values = torch.rand(50, generator=torch.Generator().manual_seed(1))
    whole = bootstrap_ci(values, n_resamples=300, seed=7)
    monkeypatch.setattr(facts, "_MAX_DRAWS", 50 * 7)  # 7 resamples per block
    assert bootstrap_ci(values, n_resamples=300, seed=7) == pytest.approx(whole)


def test_paired_bootstrap_known_cases() -> None:
    ones, zeros = [1.0] * 30, [0.0] * 30
    out = paired_bootstrap(ones, zeros)
    assert (out["diff"], out["lo"], out["hi"]) == (1.0, 1.0, 1.0) and out["p_value"] < 0.01 and out["n"] == 30
    same = [1.0, 0.0, 1.0, 1.0, 0.0] * 6
    out = paired_bootstrap(same, same)
    assert (out["diff"], out["lo"], out["hi"]) == (0.0, 0.0, 0.0) and out["p_value"] == 1.0
    # a constant shift: every record gains 0.05, so the paired interval is exactly the shift, while the
    # unpaired intervals of the two means overlap
    base = torch.rand(60, generator=torch.Generator().manual_seed(0))
    out = paired_bootstrap(base + 0.05, base)
    assert out["diff"] == pytest.approx(0.05) and out["lo"] == pytest.approx(0.05) and out["hi"] == pytest.approx(0.05)
    assert out["p_value"] < 0.01
    _, lo_a, _ = bootstrap_ci(base + 0.05)
    _, _, hi_b = bootstrap_ci(base)
    assert lo_a < hi_b
    # one system right on 10 more of 40 records, the rest equal: diff 0.25 with a CI that excludes 0
    a = [1.0] * 20 + [0.0] * 20
    b = [1.0] * 10 + [0.0] * 30
    out = paired_bootstrap(a, b, n_resamples=2000)
    assert out["diff"] == 0.25 and 0.0 < out["lo"] < 0.25 < out["hi"] and out["p_value"] < 0.05
    flipped = paired_bootstrap(b, a, n_resamples=2000)
    assert flipped["diff"] == -0.25 and flipped["hi"] < 0
    with pytest.raises(ValueError, match="30 values in a but 29"):
        paired_bootstrap(ones, zeros[:-1])
