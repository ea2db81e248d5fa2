import pytest

from slipstream.tasks.answers import answers_match, extract_answer


@pytest.mark.parametrize(
    "text, strict, flexible",
    [
        ("so 3 + 4 = 7\n#### 7", "7", "7"),
        ("#### $1,234", "1234", "1234"),
        ("first #### 5 then #### 6 and 99", "6", "6"),
        ("####-3", "-3", "-3"),
        ("#### -$5", "-5", "-5"),
        ("#### $ -7.", "-7", "-7"),
        ("#### 2.50", "2.50", "2.50"),
        ("#### 12.", "12", "12"),
        ("The answer is 42.", None, "42"),
        ("I get 1,250 apples in total", None, "1250"),
        ("we have -3 left", None, "-3"),
        ("10-3 is it", None, "3"),
        ("it costs $3.75.", None, "3.75"),
        ("choose 1,2,3", None, "3"),
        ("no number here", None, None),
        ("#### none\nbut 8 before", None, "8"),
        ("", None, None),
    ],
)
def test_extract_modes(text, strict, flexible):
    assert extract_answer(text, "strict") == strict
    assert extract_answer(text, "flexible") == flexible


def test_flexible_prefers_marker_over_later_numbers():
    assert extract_answer("#### 5\nchecked with 3 steps", "flexible") == "5"


def test_unknown_mode():
    with pytest.raises(ValueError, match="strict"):
        extract_answer("#### 1", "loose")


@pytest.mark.parametrize(
    "pred, gold, expected",
    [
        ("12.0", "12", True),
        ("-3", "-3", True),
        ("3", "-3", False),
        ("1,234", "1234", True),
        ("0.5", ".5", True),
        ("12.01", "12", False),
        (None, "12", False),
        ("12", None, False),
        (None, None, False),
        ("abc", "abc", False),
    ],
)
def test_answers_match(pred, gold, expected):
    assert answers_match(pred, gold) is expected
