"""Final-answer extraction and comparison shared by every numeric task.

Two conventions, as in the usual GSM8K evaluations:

- ``strict``: only the number right after the last ``####`` counts ("#### $1,234" -> "1234").
- ``flexible``: the strict answer when there is one, else the last number anywhere in the text.

Extracted answers are returned normalised: no commas, no ``$``, an optional leading ``-``.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

ANSWER_MODES = ("strict", "flexible")

_MARKER = "####"

# After the marker: spaces and '$' in any order around an optional minus, then digits that may
# carry thousands separators and a decimal part ("#### -$1,234.50", "#### $ -7").
_STRICT = re.compile(r"[\s$]*(-)?[\s$]*(\d[\d,]*(?:\.\d+)?|\.\d+)")

# Anywhere in the text: a number with well-formed thousands groups or plain digits, optionally
# decimal. A minus counts only when it does not follow a word character or a closing bracket, so
# "10-3" yields 10 and 3, not -3. A trailing period ("is 12.") is not part of the number.
_ANY = re.compile(
    r"(?:(?<![\w)\]])(-))?\$?((?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)(?![\d,]*\d)"
)


def _normalise(sign: str | None, digits: str) -> str | None:
    digits = digits.replace(",", "")
    if not digits or digits == ".":
        return None
    if digits.startswith("."):
        digits = "0" + digits
    return ("-" if sign else "") + digits


def extract_strict(text: str) -> str | None:
    """The number right after the last ``####`` of ``text``, or None."""
    pos = text.rfind(_MARKER)
    if pos < 0:
        return None
    m = _STRICT.match(text, pos + len(_MARKER))
    if m is None:
        return None
    return _normalise(m.group(1), m.group(2))


def extract_last_number(text: str) -> str | None:
    """The last number appearing anywhere in ``text``, or None."""
    last = None
    for last in _ANY.finditer(text):
        pass
    if last is None:
        return None
    return _normalise(last.group(1), last.group(2))


def extract_answer(text: str, mode: str = "flexible") -> str | None:
    """The final answer of a completion under ``mode`` ("strict" or "flexible"), or None."""
    if mode not in ANSWER_MODES:
        raise ValueError(f"unknown answer mode {mode!r}; choose one of: {', '.join(ANSWER_MODES)}")
    if text is None:
        return None
    strict = extract_strict(text)
    if strict is not None or mode == "strict":
        return strict
    return extract_last_number(text)


def to_number(value: str | None) -> Decimal | None:
    """Parse an answer string ("1,234", "$5", "-3.0") into a Decimal; None when it is not one."""
    if value is None:
        return None
    cleaned = str(value).strip().replace(",", "").replace("$", "").replace(" ", "")
    if not cleaned:
        return None
    try:
        number = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not number.is_finite():
        return None
    return number


def answers_match(pred: str | None, gold: str | None) -> bool:
    """True when both are numbers of equal value ("12.0" matches "12"); False if either is None."""
    a, b = to_number(pred), to_number(gold)
    if a is None or b is None:
        return False
    return a == b
