"""Answer extraction, matching and ROUGE-L against values worked out by hand."""

import pytest

from kdata.answers import (
    answers_match,
    extract_answer,
    group_answers,
    normalize,
    parse_number,
    rouge_l,
    split_final_answer,
)


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72"),
        ("so x = 3.\nThe answer is 18.", "18"),
        ("Step 1 ... Final answer: $1,250", "$1,250"),
        ("we get \\boxed{42} and check 7", "42"),
        ("She pays 5 + 7 = 12 dollars", "12"),  # no marker: the last number
        ("The answer is Paris.\nSo the answer is Lyon.", "Lyon"),  # the last marker wins
        ("no digits here", None),
        ("", None),
    ],
)
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_parse_number_and_match():
    assert parse_number("$1,234.50") == 1234.5
    assert parse_number("40%") == 40.0
    assert parse_number("3 or 4") is None  # ambiguous: not a single number
    assert answers_match("$1,250", "1250")
    assert answers_match("72.0", "72")
    assert not answers_match("71", "72")
    assert answers_match("0.3333334", "0.3333333", tolerance=1e-3)
    assert answers_match("The Eiffel Tower!", "eiffel tower")
    assert not answers_match(None, "72")
    assert normalize("  An  apple, a Day. ") == "apple day"


def test_rouge_l_known_values():
    # LCS of "the cat sat on the mat" / "the cat lay on the mat" is 5 of 6 words each side.
    assert rouge_l("the cat sat on the mat", "the cat lay on the mat") == pytest.approx(5 / 6)
    # pred 3 words, ref 6 words, LCS "the mat" = 2: P = 2/3, R = 2/6, F = 2PR/(P+R) = 4/9.
    assert rouge_l("the red mat", "the cat sat on the mat") == pytest.approx(4 / 9)
    assert rouge_l("Hello, World", "hello world") == 1.0
    assert rouge_l("abc", "xyz") == 0.0
    assert rouge_l("", "xyz") == 0.0


def test_split_final_answer_needs_an_explicit_marker():
    text = "48 / 2 = 24 in May.\n48 + 24 = 72.\nFinal answer: 72 clips."
    assert split_final_answer(text) == ("48 / 2 = 24 in May.\n48 + 24 = 72.", "72 clips")
    assert split_final_answer("She pays 5 + 7 = 12 dollars") is None  # no marker, no fallback
    assert split_final_answer("Final answer:") is None  # a marker with nothing after it
    # The marker extract_answer takes: #### outranks "final answer", the last one of a kind wins.
    assert split_final_answer("Final answer: 3\nwork\n#### 4\nmore") == (
        "Final answer: 3\nwork",
        "4",
    )
    assert extract_answer("Final answer: 3\nwork\n#### 4\nmore") == "4"


def test_group_answers_votes_with_matching():
    answers = ["7", "$1,000", None, "7.0", "1000", "8", "1000.00"]
    assert group_answers(answers) == [[1, 4, 6], [0, 3], [5]]
    assert group_answers(["b", "a", "a", "b"]) == [[0, 3], [1, 2]]  # a tie: first seen first
    assert group_answers([None, None]) == []
    assert group_answers(["10", "10.4"], tolerance=0.05) == [[0, 1]]
