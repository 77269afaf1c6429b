"""How a generated answer is compared with the expected one: its first word, normalised."""

from __future__ import annotations

import re

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_DIGITS = {str(i): word for i, word in enumerate(NUMBER_WORDS)}


def normalize_answer(text: str) -> str:
    """First word, lower case, no punctuation; numbers up to ten as words ("2" and "two" are the same answer)."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    if not words:
        return ""
    return _DIGITS.get(words[0], words[0])
