"""Verifiable instructions, in the spirit of IFEval (where the paper reports its largest gain).

Each prompt row carries the constraints its text states in words::

    {"prompt": "Describe coffee. Answer in at most 20 words. Do not use any commas.",
     "constraints": [{"type": "max_words", "n": 20}, {"type": "no_commas"}]}

Every constraint type has a pure-Python checker; ``judge`` is the fraction of a row's constraints that
a response meets (0..1). ``check`` reports them one by one. ``describe`` gives the natural-language
sentence that states a constraint in a prompt (used by ``tidpo.tasks.make_prompts``).
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["CHECKERS", "check", "describe", "judge", "sentences", "validate_constraint", "words"]

# A word: letters/digits, with inner apostrophes or hyphens ("don't", "well-known" count once); a
# number with a decimal point or thousands separator ("3.5", "1,000") is one word too.
_WORD = re.compile(r"\d+(?:[.,]\d+)+|[^\W_]+(?:['’-][^\W_]+)*")
# A sentence ends at ., ! or ? (runs like "?!" or "..." end one sentence) followed by space or the end.
_SENTENCE_END = re.compile(r"[.!?]+(?=[\s\"'”’)]|$)")
_BULLET = re.compile(r"^\s*[-*]\s+\S")
# A list item's marker ("- ", "* ", "• ", "1. ", "2) ") is not a sentence of its own.
_LIST_MARKER = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+")
# A period after these ends no sentence ("Dr. Smith", "e.g. tea"); after a time ("3 p.m. today") only
# where the next word starts in lower case or with a digit ("at 3 p.m. Then ..." ends one).
_ABBREVIATIONS = {"mr", "mrs", "dr", "prof", "vs", "e.g", "i.e"}
_TIMES = {"a.m", "p.m"}
_QUOTES = {('"', '"'), ("“", "”")}


def words(text: str) -> list[str]:
    """The words of ``text`` (punctuation, markdown symbols and numbers' separators are not words)."""
    return _WORD.findall(text)


def sentences(text: str) -> list[str]:
    """Split into sentences at ``.``, ``!``, ``?``; a trailing fragment without a stop counts as one.

    Bullet lines and other line breaks also end a sentence, so a list of three short items is three
    (their markers, ``-`` or ``1.``, are not sentences); a period after a common abbreviation
    (``Dr.``, ``e.g.``, ``p.m.``) is not an end.
    """
    out: list[str] = []
    for line in text.splitlines():
        line = _LIST_MARKER.sub("", line, count=1)
        start = 0
        for end in _SENTENCE_END.finditer(line):
            before = line[start : end.start()].split()
            last = before[-1].lower() if before else ""
            after = line[end.end() :].lstrip()
            if end.group() == "." and (
                last in _ABBREVIATIONS or (last in _TIMES and (after[:1].islower() or after[:1].isdigit()))
            ):
                continue
            if words(line[start : end.start()]):
                out.append(line[start : end.start()].strip())
            start = end.end()
        if words(line[start:]):
            out.append(line[start:].strip())
    return out


def _has_word(text: str, word: str) -> bool:
    """Case-insensitive whole-word (or whole-phrase) match."""
    return re.search(rf"(?<![^\W_]){re.escape(word)}(?![^\W_])", text, flags=re.IGNORECASE) is not None


def _count_word(text: str, word: str) -> int:
    return len(re.findall(rf"(?<![^\W_]){re.escape(word)}(?![^\W_])", text, flags=re.IGNORECASE))


# ------------------------------------------------------------------------------------------ checkers


def _max_words(text: str, c: Mapping[str, Any]) -> bool:
    return len(words(text)) <= c["n"]


def _min_words(text: str, c: Mapping[str, Any]) -> bool:
    return len(words(text)) >= c["n"]


def _include_keywords(text: str, c: Mapping[str, Any]) -> bool:
    return all(_has_word(text, k) for k in c["keywords"])


def _forbidden_words(text: str, c: Mapping[str, Any]) -> bool:
    return not any(_has_word(text, w) for w in c["words"])


def _keyword_frequency(text: str, c: Mapping[str, Any]) -> bool:
    return _count_word(text, c["keyword"]) >= c["n"]


def _lowercase(text: str, c: Mapping[str, Any]) -> bool:
    # An answer with no letters at all does not "write in lowercase"; it did not answer.
    return any(ch.isalpha() for ch in text) and text == text.lower()


def _uppercase(text: str, c: Mapping[str, Any]) -> bool:
    return any(ch.isalpha() for ch in text) and text == text.upper()


def _no_commas(text: str, c: Mapping[str, Any]) -> bool:
    return bool(text.strip()) and not any(comma in text for comma in ",，、،﹐")


def _end_phrase(text: str, c: Mapping[str, Any]) -> bool:
    # The whole phrase: "I bathe end." does not end with "The end.".
    text, phrase = text.rstrip().lower(), c["phrase"].strip().lower()
    return text.endswith(phrase) and not (
        len(text) > len(phrase) and _is_word_char(text[-len(phrase) - 1]) and _is_word_char(phrase[0])
    )


# Scripts written without spaces between words (Thai, Lao, Myanmar, Khmer; CJK and other wide or
# half-width forms below): no word boundary to check there.
_SPACELESS = ((0x0E00, 0x0EFF), (0x1000, 0x109F), (0x1780, 0x17FF))


def _is_word_char(ch: str) -> bool:
    if not (ch.isalnum() or ch == "_"):
        return False
    if unicodedata.east_asian_width(ch) in ("W", "F", "H"):
        return False
    return not any(low <= ord(ch) <= high for low, high in _SPACELESS)


def _bullet_count(text: str, c: Mapping[str, Any]) -> bool:
    return sum(1 for line in text.splitlines() if _BULLET.match(line)) == c["n"]


def _starts_with(text: str, c: Mapping[str, Any]) -> bool:
    first = words(text.lstrip(" \t\n\"'“*#>-"))
    return bool(first) and first[0].lower() == c["word"].lower()


def _max_sentences(text: str, c: Mapping[str, Any]) -> bool:
    n = len(sentences(text))
    return 1 <= n <= c["n"]


def _wrap_in_quotes(text: str, c: Mapping[str, Any]) -> bool:
    # One quotation around the whole answer: '"Yes," he said, "no."' is two quotations.
    t = text.strip()
    return (
        len(t) >= 2
        and (t[0], t[-1]) in _QUOTES
        and not any(q in t[1:-1] for q in (t[0], t[-1]))
        and bool(words(t))
    )


def _no_question(text: str, c: Mapping[str, Any]) -> bool:
    return bool(text.strip()) and not any(mark in text for mark in "?？؟﹖")


# type -> (checker, required params with their types, sentence that states the constraint)
_SPEC: dict[str, tuple[Callable[[str, Mapping[str, Any]], bool], dict[str, type], Callable[..., str]]] = {
    "max_words": (_max_words, {"n": int}, lambda n: f"Answer in at most {n} words."),
    "min_words": (_min_words, {"n": int}, lambda n: f"Write at least {n} words."),
    "include_keywords": (
        _include_keywords,
        {"keywords": list},
        lambda keywords: (
            "Include the "
            + ("word " if len(keywords) == 1 else "words ")
            + " and ".join(f'"{k}"' for k in keywords)
            + "."
        ),
    ),
    "forbidden_words": (
        _forbidden_words,
        {"words": list},
        lambda words: (
            "Do not use the "
            + ("word " if len(words) == 1 else "words ")
            + " or ".join(f'"{w}"' for w in words)
            + "."
        ),
    ),
    "keyword_frequency": (
        _keyword_frequency,
        {"keyword": str, "n": int},
        lambda keyword, n: f'Use the word "{keyword}" at least {n} times.',
    ),
    "lowercase": (
        _lowercase,
        {},
        lambda: "Write your whole answer in lowercase letters, with no capital letters.",
    ),
    "uppercase": (_uppercase, {}, lambda: "Write your whole answer in capital letters."),
    "no_commas": (_no_commas, {}, lambda: "Do not use any commas."),
    "end_phrase": (
        _end_phrase,
        {"phrase": str},
        lambda phrase: f'End your answer with the exact phrase "{phrase}"',
    ),
    "bullet_count": (
        _bullet_count,
        {"n": int},
        lambda n: f'Answer with exactly {n} bullet points, each on its own line starting with "- ".',
    ),
    "starts_with": (_starts_with, {"word": str}, lambda word: f'Start your answer with the word "{word}".'),
    "max_sentences": (
        _max_sentences,
        {"n": int},
        lambda n: "Answer in one sentence." if n == 1 else f"Use at most {n} sentences.",
    ),
    "wrap_in_quotes": (_wrap_in_quotes, {}, lambda: "Wrap your whole answer in double quotation marks."),
    "no_question": (_no_question, {}, lambda: "Do not ask any questions."),
}

CHECKERS: dict[str, Callable[[str, Mapping[str, Any]], bool]] = {k: v[0] for k, v in _SPEC.items()}


def validate_constraint(constraint: Any, where: str = "constraint") -> None:
    """Raise ``ValueError`` naming ``where`` when a constraint is malformed (unknown type, bad params)."""
    if not isinstance(constraint, Mapping):
        raise ValueError(f"{where}: a constraint must be an object with a 'type', got {constraint!r}")
    kind = constraint.get("type")
    if kind not in _SPEC:
        raise ValueError(
            f"{where}: unknown constraint type {kind!r}; known types: {', '.join(sorted(_SPEC))}"
        )
    for name, typ in _SPEC[kind][1].items():
        if name not in constraint:
            raise ValueError(f"{where}: constraint {kind!r} needs the field {name!r}")
        value = constraint[name]
        if typ is int and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ValueError(
                f"{where}: field {name!r} of {kind!r} must be a non-negative integer, got {value!r}"
            )
        if typ is str and (not isinstance(value, str) or not value.strip()):
            raise ValueError(f"{where}: field {name!r} of {kind!r} must be a non-empty string, got {value!r}")
        if typ is list and (
            not isinstance(value, list)
            or not value
            or not all(isinstance(v, str) and v.strip() for v in value)
        ):
            raise ValueError(
                f"{where}: field {name!r} of {kind!r} must be a non-empty list of strings, got {value!r}"
            )


def describe(constraint: Mapping[str, Any]) -> str:
    """The sentence that states ``constraint`` to the model."""
    validate_constraint(constraint)
    kind = constraint["type"]
    return _SPEC[kind][2](**{k: constraint[k] for k in _SPEC[kind][1]})


def _as_constraints(constraints: Any, where: str) -> list[Mapping[str, Any]]:
    # Built datasets store the constraints column as a JSON string (a uniform column type for Arrow).
    if isinstance(constraints, str):
        try:
            constraints = json.loads(constraints)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: 'constraints' is a string but not valid JSON ({err})") from err
    if not isinstance(constraints, Sequence) or isinstance(constraints, str):
        raise ValueError(f"{where}: 'constraints' must be a list of constraint objects, got {constraints!r}")
    for i, c in enumerate(constraints):
        validate_constraint(c, f"{where}: constraints[{i}]")
    return list(constraints)


def check(text: str, constraints: Sequence[Mapping[str, Any]] | str) -> list[bool]:
    """Whether ``text`` meets each constraint, in order (a JSON string of constraints works too).

    An answer without a word meets none: it did not answer (else an empty sample would meet
    "at most 10 words" or "do not use the word ...").
    """
    constraints = _as_constraints(constraints, "check")
    if not words(text):
        return [False] * len(constraints)
    return [CHECKERS[c["type"]](text, c) for c in constraints]


def judge(text: str, row: Mapping[str, Any] | None = None) -> float:
    """Fraction of the prompt row's constraints that ``text`` meets, in [0, 1]."""
    if row is None or "constraints" not in row:
        raise ValueError(
            "the instructions judge needs the prompt row with its 'constraints' (got "
            + ("no row" if row is None else f"a row with fields {sorted(row)}")
            + ")"
        )
    constraints = _as_constraints(row["constraints"], "instructions judge")
    if not constraints:
        raise ValueError(
            "the instructions judge got a row with an empty 'constraints' list; nothing to check"
        )
    results = check(text, constraints)
    return sum(results) / len(results)


def validate_row(row: Mapping[str, Any], where: str) -> None:
    """Check a prompt row of this task (``where`` names file and line in errors)."""
    if row.get("constraints") is None:  # absent, or null in a column other rows fill
        raise ValueError(f"{where}: missing field 'constraints' (the instructions task checks them)")
    if not _as_constraints(row["constraints"], where):
        raise ValueError(f"{where}: field 'constraints' is empty")


judge.check_row = validate_row  # run on every row before any generation (tidpo.judges)
