"""Generate the bundled prompt files of the built-in tasks (deterministic; fixed seed).

    python -m tidpo.tasks.make_prompts            # rewrite src/tidpo/tasks/prompts/*.jsonl
    python -m tidpo.tasks.make_prompts --check    # exit 1 if the files differ from what this makes

Train and test prompts use disjoint topics (instructions) and disjoint subjects (sentiment), so a
test score measures transfer to unseen subjects rather than memorised answers.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Any

from tidpo.tasks.instructions import describe

SEED = 0

# topic -> two words an answer about it would naturally use (for keyword constraints)
INSTRUCTION_TOPICS_TRAIN: dict[str, tuple[str, str]] = {
    "coffee": ("bean", "morning"),
    "tea": ("leaf", "cup"),
    "bicycles": ("wheel", "ride"),
    "rain": ("cloud", "water"),
    "dogs": ("walk", "loyal"),
    "cats": ("sleep", "independent"),
    "the ocean": ("wave", "salt"),
    "mountains": ("peak", "climb"),
    "gardening": ("soil", "seed"),
    "bread": ("flour", "oven"),
    "the moon": ("night", "orbit"),
    "trains": ("track", "station"),
    "libraries": ("book", "quiet"),
    "winter": ("snow", "cold"),
    "summer": ("sun", "warm"),
    "music": ("song", "rhythm"),
    "chess": ("board", "move"),
    "running": ("pace", "shoes"),
    "honey bees": ("hive", "flower"),
    "recycling": ("plastic", "waste"),
    "friendship": ("trust", "help"),
    "sleep": ("rest", "dream"),
    "volcanoes": ("lava", "eruption"),
    "apples": ("tree", "sweet"),
    "photography": ("camera", "light"),
    "deserts": ("sand", "dry"),
    "birthdays": ("cake", "party"),
    "forests": ("tree", "green"),
    "soap": ("clean", "hands"),
    "maps": ("road", "direction"),
    "clocks": ("time", "hour"),
    "rivers": ("flow", "water"),
    "umbrellas": ("rain", "dry"),
    "breakfast": ("egg", "morning"),
    "kites": ("wind", "string"),
    "stars": ("sky", "light"),
    "swimming": ("pool", "water"),
    "pencils": ("write", "paper"),
    "rainbows": ("color", "rain"),
    "picnics": ("basket", "park"),
}
INSTRUCTION_TOPICS_TEST: dict[str, tuple[str, str]] = {
    "owls": ("night", "bird"),
    "bridges": ("river", "cross"),
    "cheese": ("milk", "taste"),
    "lighthouses": ("light", "ship"),
    "snowmen": ("snow", "winter"),
    "candles": ("flame", "wax"),
    "penguins": ("ice", "bird"),
    "sandwiches": ("bread", "lunch"),
    "windmills": ("wind", "power"),
    "museums": ("art", "history"),
    "butterflies": ("wing", "flower"),
    "tomatoes": ("red", "garden"),
    "thunderstorms": ("lightning", "rain"),
    "backpacks": ("carry", "school"),
    "sunflowers": ("sun", "yellow"),
}

REQUESTS = [
    "Describe {t}.",
    "Explain why people care about {t}.",
    "Give one piece of advice about {t}.",
    "Write a short note about {t}.",
    "Tell me something interesting about {t}.",
    "What should a beginner know about {t}?",
]
LIST_REQUEST = "List some facts about {t}."

START_WORDS = ["Yes", "Sure", "Today", "Honestly", "Imagine", "First"]
END_PHRASES = ["That is all.", "Hope this helps.", "Thank you.", "The end."]
FILLER_WORDS = ["very", "really", "also", "many"]

# Pairs of constraint types that should not share a prompt (contradictory or confusing together).
_CONFLICTS = {
    frozenset(p)
    for p in [
        ("max_words", "min_words"),
        ("lowercase", "uppercase"),
        ("lowercase", "starts_with"),
        ("lowercase", "end_phrase"),
        ("bullet_count", "max_sentences"),
        ("bullet_count", "wrap_in_quotes"),
        ("bullet_count", "starts_with"),
        ("bullet_count", "end_phrase"),
        ("bullet_count", "min_words"),
        ("min_words", "max_sentences"),
        ("include_keywords", "keyword_frequency"),
        ("include_keywords", "forbidden_words"),
        ("keyword_frequency", "forbidden_words"),
        ("wrap_in_quotes", "end_phrase"),
    ]
}
# How often each type is drawn: the easy, common IFEval-like ones more often.
_TYPE_WEIGHTS = {
    "max_words": 4,
    "min_words": 1,
    "include_keywords": 3,
    "forbidden_words": 2,
    "keyword_frequency": 1,
    "lowercase": 3,
    "uppercase": 1,
    "no_commas": 3,
    "end_phrase": 2,
    "bullet_count": 2,
    "starts_with": 2,
    "max_sentences": 3,
    "wrap_in_quotes": 1,
    "no_question": 1,
}


def _constraint(kind: str, topic: str, keywords: tuple[str, str], rng: random.Random) -> dict[str, Any]:
    if kind == "max_words":
        return {"type": kind, "n": rng.choice([10, 15, 20, 25, 30])}
    if kind == "min_words":
        return {"type": kind, "n": rng.choice([25, 30, 40])}
    if kind == "include_keywords":
        return {"type": kind, "keywords": [rng.choice(keywords)] if rng.random() < 0.6 else list(keywords)}
    if kind == "forbidden_words":
        # Either the topic's own last word (hard: talk about it without naming it) or a filler word.
        word = topic.split()[-1] if rng.random() < 0.4 else rng.choice(FILLER_WORDS)
        return {"type": kind, "words": [word]}
    if kind == "keyword_frequency":
        return {"type": kind, "keyword": rng.choice(keywords), "n": 2}
    if kind == "end_phrase":
        return {"type": kind, "phrase": rng.choice(END_PHRASES)}
    if kind == "bullet_count":
        return {"type": kind, "n": rng.choice([2, 3, 4])}
    if kind == "starts_with":
        return {"type": kind, "word": rng.choice(START_WORDS)}
    if kind == "max_sentences":
        return {"type": kind, "n": rng.choice([1, 2, 3])}
    return {"type": kind}


def _draw_types(rng: random.Random) -> list[str]:
    count = rng.choices([1, 2, 3], weights=[35, 45, 20])[0]
    chosen: list[str] = []
    while len(chosen) < count:
        options = [
            t
            for t in _TYPE_WEIGHTS
            if t not in chosen and all(frozenset((t, c)) not in _CONFLICTS for c in chosen)
        ]
        if not options:
            break
        chosen.append(rng.choices(options, weights=[_TYPE_WEIGHTS[t] for t in options])[0])
    return chosen


def instruction_prompts(
    topics: dict[str, tuple[str, str]], per_topic: int, split: str, seed: int
) -> list[dict[str, Any]]:
    """``per_topic`` distinct constrained prompts for each topic."""
    rng = random.Random(f"{seed}-instructions-{split}")
    rows: list[dict[str, Any]] = []
    for topic, keywords in topics.items():
        seen: set[str] = set()
        requests = rng.sample(REQUESTS, k=len(REQUESTS))
        attempts = 0
        while len(seen) < per_topic:
            attempts += 1
            if attempts > 1000:
                raise RuntimeError(f"could not draw {per_topic} distinct prompts for topic {topic!r}")
            kinds = _draw_types(rng)
            constraints = [_constraint(k, topic, keywords, rng) for k in kinds]
            request = LIST_REQUEST if "bullet_count" in kinds else requests[len(seen) % len(requests)]
            text = " ".join([request.format(t=topic)] + [describe(c) for c in constraints])
            if text in seen:
                continue
            seen.add(text)
            rows.append(
                {
                    "id": f"instructions-{split}-{len(rows):04d}",
                    "topic": topic,
                    "prompt": text,
                    "constraints": constraints,
                }
            )
    return rows


SENTIMENT_SUBJECTS_TRAIN = [
    "a small seaside hotel",
    "a pizza place near the station",
    "a used bookshop",
    "a city bus line",
    "a budget laptop",
    "a pair of running shoes",
    "a neighbourhood bakery",
    "a public swimming pool",
    "a camping tent",
    "a cooking class",
    "a museum of local history",
    "a coffee grinder",
    "a night train",
    "a hiking trail",
    "a yoga studio",
    "a language learning app",
    "a ferry crossing",
    "a garden centre",
    "a family board game",
    "a vegetarian cafe",
    "a hair salon",
    "a bicycle repair shop",
    "a desk lamp",
    "a weekend market",
    "a ski resort",
    "a dentist's office",
    "a rental car",
    "a science fiction novel",
    "a jazz concert",
    "a fishing trip",
    "a kitchen blender",
    "a cinema",
    "a student dormitory",
    "a zoo",
    "a pair of headphones",
    "a noodle bar",
    "a botanical garden",
    "a community theatre play",
    "a winter coat",
    "a roadside motel",
    "a children's playground",
    "a farm shop",
    "a pottery workshop",
    "a mountain cabin",
    "a food truck",
    "an airport lounge",
    "a second-hand piano",
    "a city walking tour",
    "an electric scooter",
    "a village festival",
]
SENTIMENT_SUBJECTS_TEST = [
    "a lakeside campsite",
    "a sushi restaurant",
    "a fitness tracker",
    "a history podcast",
    "a river cruise",
    "an ice cream parlour",
    "a secondhand bookshop cafe",
    "a mobile phone case",
    "a bowling alley",
    "a tea house",
    "a music festival",
    "a hostel in the old town",
    "a vacuum cleaner",
    "a guided cave tour",
    "a flower shop",
    "an aquarium",
    "a rooftop bar",
    "a pair of hiking boots",
    "a public library",
    "a taxi ride",
    "a chocolate shop",
    "a kayak rental",
    "a comedy show",
    "a sewing machine",
    "a countryside inn",
]
SENTIMENT_TEMPLATES = [
    "Write a two-sentence review of {s}.",
    "Write a short customer review of {s}.",
    "Describe {s} in two sentences.",
    "Write the first two sentences of a story about {s}.",
]


def sentiment_prompts(subjects: list[str], per_subject: int, split: str, seed: int) -> list[dict[str, Any]]:
    """``per_subject`` neutral requests (no sentiment asked for) per subject."""
    rng = random.Random(f"{seed}-sentiment-{split}")
    rows: list[dict[str, Any]] = []
    for subject in subjects:
        for template in rng.sample(SENTIMENT_TEMPLATES, k=per_subject):
            rows.append(
                {
                    "id": f"sentiment-{split}-{len(rows):04d}",
                    "subject": subject,
                    "prompt": template.format(s=subject),
                }
            )
    return rows


def all_prompt_files(seed: int = SEED) -> dict[str, list[dict[str, Any]]]:
    """File name -> rows, for every bundled prompts file."""
    return {
        "instructions_train.jsonl": instruction_prompts(INSTRUCTION_TOPICS_TRAIN, 5, "train", seed),
        "instructions_test.jsonl": instruction_prompts(INSTRUCTION_TOPICS_TEST, 4, "test", seed),
        "sentiment_train.jsonl": sentiment_prompts(SENTIMENT_SUBJECTS_TRAIN, 3, "train", seed),
        "sentiment_test.jsonl": sentiment_prompts(SENTIMENT_SUBJECTS_TEST, 2, "test", seed),
    }


def render(rows: list[dict[str, Any]]) -> str:
    """JSONL text of ``rows`` (one compact object per line, UTF-8 kept as is)."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def main(argv: list[str] | None = None) -> int:
    from tidpo.tasks import PROMPTS_DIR

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--out-dir", type=Path, default=PROMPTS_DIR)
    parser.add_argument("--check", action="store_true", help="compare with the files instead of writing them")
    args = parser.parse_args(argv)
    stale = []
    for name, rows in all_prompt_files().items():
        path = args.out_dir / name
        text = render(rows)
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(str(path))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            print(f"wrote {len(rows)} prompts to {path}")
    if stale:
        print("out of date: " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
