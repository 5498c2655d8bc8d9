"""Counts in words: `plural(1, "class")` is "1 class", `plural(10, "class")` is "10 classes".

One helper for every message that counts something, in `dali_pipes`, `trainer` and the tools.
"""
from __future__ import annotations

_SIBILANTS = ("s", "x", "z", "ch", "sh")
# Words whose -ch is a k sound take a plain -s (an epoch, 2 epochs).
_HARD_CH = ("epoch", "stomach", "monarch", "tech")


def plural_noun(noun: str) -> str:
    """The English plural of `noun`: -es after a sibilant, -ies after a consonant and y, else -s.

    The last word of a phrase is the one inflected ("training image" -> "training images").
    """
    if noun.endswith(_SIBILANTS) and not noun.endswith(_HARD_CH):
        return noun + "es"
    if noun.endswith("y") and len(noun) > 1 and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


def plural(count: int, noun: str, plural_form: str | None = None) -> str:
    """`count` followed by `noun`, in its plural form (`plural_form`, or `plural_noun`'s) unless `count` is 1."""
    if count == 1:
        return f"{count} {noun}"
    return f"{count} {plural_form or plural_noun(noun)}"
