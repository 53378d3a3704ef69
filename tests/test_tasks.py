"""Tests of the built-in tasks: constraint checkers, judges, prompt files and the pair builder."""

from __future__ import annotations

import importlib
import json
import zlib
from pathlib import Path

import pytest

from tidpo.models import tiny_causal_lm, tiny_tokenizer
from tidpo.tasks import TASKS, Task, get_task, load_prompts, make_prompts, sentiment
from tidpo.tasks import instructions as ins
from tidpo.tasks.build import build_pairs, prompt_key, read_pairs, settings_path, ties_path

# --------------------------------------------------------------------------------- constraint checks

# (constraint, texts that meet it, texts that do not) — written and counted by hand.
CASES = [
    (
        {"type": "max_words", "n": 5},
        ["One two three four five.", "don't stop-now, ok", "It costs 3.5 dollars"],
        ["One two three four five six", "a b c d e f g"],
    ),
    ({"type": "min_words", "n": 3}, ["one two three", "1,000 big dogs"], ["one two", "well-known thing"]),
    (
        {"type": "include_keywords", "keywords": ["bean", "morning"]},
        ["The morning bean.", "MORNING: one Bean"],
        ["The beans in the morning", "a bean at night"],
    ),
    (
        {"type": "forbidden_words", "words": ["very"]},
        ["It is every day", "fine"],
        ["Very nice", "it was very, good"],
    ),
    (
        {"type": "keyword_frequency", "keyword": "tea", "n": 2},
        ["Tea, tea!", "tea and more TEA"],
        ["tea and teapot"],
    ),
    ({"type": "lowercase"}, ["all lowercase here.", "one, two 3"], ["Not lowercase", "123 !", ""]),
    ({"type": "uppercase"}, ["ALL CAPS 123", "HELLO!"], ["ALL Caps", "42"]),
    ({"type": "no_commas"}, ["no commas here.", "a; b"], ["a, b", "", "中文，逗号", "一、二"]),
    (
        {"type": "end_phrase", "phrase": "That is all."},
        ["Blah. That is all.  \n", "blah that is all."],
        ["That is all. More", "That is all", "Hat is all."],
    ),
    (
        {"type": "bullet_count", "n": 3},
        ["- a\n- b\n* c", "Intro:\n  - a\n- b\n- c\nOutro"],
        ["- a\n- b", "- a\n- b\n- c\n- d", "-a\n-b\n-c", "**a**\n**b**\n**c**"],
    ),
    (
        {"type": "starts_with", "word": "Yes"},
        ["Yes, it is.", '"Yes!" she said', "yes"],
        ["Yesterday was fine", "Well, yes", ""],
    ),
    (
        {"type": "max_sentences", "n": 2},
        [
            "One. Two!",
            "No stop at all",
            "It costs 3.5 dollars. Fine.",
            "1. Cats sleep.\n2. Cats purr.",
            "Dr. Smith came at 3 p.m. today. Fine.",
        ],
        ["One. Two? Three.", "", "- a\n- b\n- c", "1. a\n2. b\n3. c"],
    ),
    (
        {"type": "wrap_in_quotes"},
        ['"hello there"', "  “curly quotes”\n"],
        ['"hello" there', '""', "hello", '"Yes," he said, "no."'],
    ),
    ({"type": "no_question"}, ["Sure.", "Fine!"], ["Why?", "", "なぜ？", "لماذا؟"]),
]


def test_every_constraint_type_has_cases():
    assert {c["type"] for c, _, _ in CASES} == set(ins.CHECKERS)
    assert len(ins.CHECKERS) >= 8


@pytest.mark.parametrize(("constraint", "good", "bad"), CASES, ids=[c["type"] for c, _, _ in CASES])
def test_checker(constraint, good, bad):
    for text in good:
        assert ins.check(text, [constraint]) == [True], f"{constraint} should accept {text!r}"
    for text in bad:
        assert ins.check(text, [constraint]) == [False], f"{constraint} should reject {text!r}"


def test_word_and_sentence_splitting():
    assert ins.words("don't stop-now, 3.5 kg #tag") == ["don't", "stop-now", "3.5", "kg", "tag"]
    assert ins.sentences("Hi there. How are you?! Fine...") == ["Hi there", "How are you", "Fine"]
    assert ins.sentences("- one\n- two") == ["one", "two"]  # list markers are not sentences
    assert ins.sentences("1. Cats sleep a lot.\n2) Cats purr.") == ["Cats sleep a lot", "Cats purr"]
    # A time ends a sentence where the next word starts one.
    assert ins.sentences("It ends at 3 p.m. Then we go. Main St. It is long.") == [
        "It ends at 3 p.m",
        "Then we go",
        "Main St",
        "It is long",
    ]
    assert ins.sentences("Dr. Smith is here at 3 p.m. today. Use e.g. tea!") == [
        "Dr. Smith is here at 3 p.m. today",
        "Use e.g. tea",
    ]


@pytest.mark.parametrize("text", ["", "   \n", "...", "- \n* "])
def test_an_answer_without_words_meets_no_constraint(text):
    """It did not answer: not "at most 10 words", nor "do not use the word ...", nor "0 bullets"."""
    constraints = [
        {"type": "max_words", "n": 10},
        {"type": "forbidden_words", "words": ["tea"]},
        {"type": "bullet_count", "n": 0},
        {"type": "max_sentences", "n": 3},
    ]
    assert ins.check(text, constraints) == [False] * 4
    assert ins.judge(text, {"constraints": constraints}) == 0.0


def test_judge_is_fraction_met_and_check_reports_each():
    row = {"constraints": [{"type": "max_words", "n": 3}, {"type": "no_commas"}, {"type": "lowercase"}]}
    assert ins.judge("hello there friend", row) == 1.0
    assert ins.check("Hello, there friend", row["constraints"]) == [True, False, False]
    assert ins.judge("Hello, there friend", row) == pytest.approx(1 / 3)
    assert ins.judge("Hello, there my friend", row) == 0.0
    # Built datasets store constraints as a JSON string; the judge reads that too.
    assert ins.judge("hello, there friend", {"constraints": json.dumps(row["constraints"])}) == pytest.approx(
        2 / 3
    )


def test_judge_and_validation_errors():
    with pytest.raises(ValueError, match="needs the prompt row"):
        ins.judge("text")
    with pytest.raises(ValueError, match="empty 'constraints'"):
        ins.judge("text", {"constraints": []})
    with pytest.raises(ValueError, match=r"unknown constraint type 'shout'.*max_words"):
        ins.check("text", [{"type": "shout"}])
    with pytest.raises(ValueError, match="needs the field 'n'"):
        ins.check("text", [{"type": "max_words"}])
    with pytest.raises(ValueError, match="non-negative integer"):
        ins.check("text", [{"type": "max_words", "n": "20"}])
    with pytest.raises(ValueError, match="non-empty list of strings"):
        ins.check("text", [{"type": "include_keywords", "keywords": []}])


def test_describe_states_each_constraint():
    assert ins.describe({"type": "max_words", "n": 20}) == "Answer in at most 20 words."
    assert (
        ins.describe({"type": "include_keywords", "keywords": ["a", "b"]}) == 'Include the words "a" and "b".'
    )
    assert ins.describe({"type": "max_sentences", "n": 1}) == "Answer in one sentence."


# ------------------------------------------------------------------------------------------ sentiment


def test_sentiment_judge_orders_positive_above_negative():
    pos = sentiment.judge("I loved this wonderful hotel, the staff were great and the view was beautiful!")
    neg = sentiment.judge("Terrible, dirty and rude. I hated it and the food was awful.")
    neutral = sentiment.judge("The hotel is on a street.")
    assert 0.0 <= neg < 0.25 < neutral == 0.5 < 0.75 < pos <= 1.0
    assert sentiment.judge("") == 0.5
    assert sentiment.judge("great", {"prompt": "x"}) == pytest.approx((sentiment.compound("great") + 1) / 2)


# -------------------------------------------------------------------------------- registry and files


def test_registry_and_judge_import_paths():
    assert set(TASKS) == {"instructions", "sentiment"}
    with pytest.raises(ValueError, match="unknown task 'nope'; built-in tasks: instructions, sentiment"):
        get_task("nope")
    for task in TASKS.values():
        module, name = task.judge_path.split(":")
        assert getattr(importlib.import_module(module), name) is task.judge
    assert TASKS["instructions"].judge_path == "tidpo.tasks.instructions:judge"
    assert TASKS["sentiment"].judge_path == "tidpo.tasks.sentiment:judge"


def test_prompt_files_parse_are_disjoint_and_reproducible():
    sizes = {"instructions": (200, 60), "sentiment": (150, 50)}
    for name, task in TASKS.items():
        train, test = load_prompts(task.train_prompts, task), load_prompts(task.test_prompts, task)
        assert (len(train), len(test)) == sizes[name]
        for rows in (train, test):
            assert len({r["prompt"] for r in rows}) == len(rows), "prompts must be unique"
        assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
        field = "topic" if name == "instructions" else "subject"
        assert not {r[field] for r in train} & {r[field] for r in test}, f"train/test share a {field}"
    # Each instructions prompt states every one of its constraints in words.
    for row in load_prompts(TASKS["instructions"].train_prompts):
        assert 1 <= len(row["constraints"]) <= 3
        for c in row["constraints"]:
            assert ins.describe(c) in row["prompt"]
    # The files are exactly what the generator makes (nobody edited them by hand).
    assert make_prompts.main(["--check"]) == 0


def test_load_prompts_errors_name_file_line_and_field(tmp_path):
    bad_json = tmp_path / "a.jsonl"
    bad_json.write_text('{"prompt": "ok"}\n{"prompt": \n')
    with pytest.raises(ValueError, match=r"a\.jsonl, line 2: not valid JSON"):
        load_prompts(bad_json)
    no_prompt = tmp_path / "b.jsonl"
    no_prompt.write_text('\n{"text": "hi"}\n')
    with pytest.raises(ValueError, match=r"b\.jsonl, line 2: missing field 'prompt'"):
        load_prompts(no_prompt)
    bad_constraint = tmp_path / "c.jsonl"
    bad_constraint.write_text('{"prompt": "hi", "constraints": [{"type": "max_words", "n": -1}]}\n')
    with pytest.raises(ValueError, match=r"c\.jsonl, line 1: constraints\[0\]: field 'n'"):
        load_prompts(bad_constraint, "instructions")
    with pytest.raises(ValueError, match="missing field 'constraints'"):
        load_prompts(_write(tmp_path / "d.jsonl", '{"prompt": "x"}\n'), "instructions")
    with pytest.raises(FileNotFoundError, match="prompts file not found"):
        load_prompts(tmp_path / "missing.jsonl")


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------------- builder


@pytest.fixture(scope="module")
def tiny():
    tok = tiny_tokenizer()
    return tiny_causal_lm(tokenizer=tok, seed=0), tok


def _length_task(tmp_path: Path) -> Task:
    """A test task whose judge is a hash of the text: only identical samples tie."""
    return Task(
        name="length",
        description="a pseudo-random but fixed score per text (test task)",
        judge=lambda text, row=None: zlib.crc32(text.encode()) / 2**32,
        judge_path="tests:hash",
        train_prompts=tmp_path / "none.jsonl",
        test_prompts=tmp_path / "none.jsonl",
    )


def _prompts_file(tmp_path: Path, n: int) -> Path:
    texts = [f"Write a short review {i}. The sky is blue." for i in range(n)]
    return _write(
        tmp_path / f"prompts{n}.jsonl",
        "".join(json.dumps({"prompt": t, "id": f"p{i}"}) + "\n" for i, t in enumerate(texts)),
    )


def _build(tiny, task, prompts, out, **kw):
    model, tok = tiny
    kw.setdefault("samples", 3)
    return build_pairs(
        task, model, prompts, out=out, tokenizer=tok, max_new_tokens=6, batch_size=6, progress=False, **kw
    )


def test_build_instructions_end_to_end(tiny, tmp_path):
    prompts = _write(
        tmp_path / "ins.jsonl",
        "".join(
            json.dumps(
                {
                    "prompt": f"Describe cats {i}. Answer in at most {n} words. Do not use any commas.",
                    "constraints": [{"type": "max_words", "n": n}, {"type": "no_commas"}],
                }
            )
            + "\n"
            for i, n in enumerate([1, 2, 3, 2, 1, 3, 2, 1])
        ),
    )
    out = tmp_path / "pairs.jsonl"
    stats = _build(tiny, "instructions", prompts, out, samples=4)
    rows = read_pairs(out)
    assert stats["prompts"] == 8 and stats["generated"] == 8
    assert stats["pairs"] == stats["pairs_new"] == len(rows) == 8 - stats["ties_skipped"]
    assert rows, "with these constraints some samples should differ in score"
    for row in rows:
        assert row["task"] == "instructions" and row["flipped"] is False
        assert row["prompt"][0]["role"] == "user" and row["chosen"][0]["role"] == "assistant"
        source = {"constraints": json.loads(row["constraints"])}
        # Stored scores are the judge's scores of the stored texts, and chosen is strictly better.
        assert ins.judge(row["chosen"][0]["content"], source) == row["chosen_score"]
        assert ins.judge(row["rejected"][0]["content"], source) == row["rejected_score"]
        assert row["chosen_score"] > row["rejected_score"]
    assert stats["mean_chosen_score"] == pytest.approx(sum(r["chosen_score"] for r in rows) / len(rows))


def test_build_skips_ties(tiny, tmp_path):
    constant = Task("const", "all equal", lambda text, row=None: 0.5, "tests:const", tmp_path, tmp_path)
    out = tmp_path / "ties.jsonl"
    stats = _build(tiny, constant, _prompts_file(tmp_path, 4), out)
    assert stats["ties_skipped"] == stats["ties_total"] == 4 and stats["pairs"] == 0
    assert stats["mean_chosen_score"] is None  # JSON null, not NaN (invalid JSON)
    json.loads(json.dumps(stats, allow_nan=False))
    assert out.exists() and read_pairs(out) == []
    ties = [json.loads(line) for line in ties_path(out).read_text().splitlines()]
    assert [t["scores"] for t in ties] == [[0.5, 0.5, 0.5]] * 4
    # A rerun knows these prompts are done: nothing is sampled again.
    stats = _build(tiny, constant, _prompts_file(tmp_path, 4), out)
    assert stats["resumed"] == 4 and stats["generated"] == 0 and stats["ties_skipped"] == 0
    # More samples would not re-sample the tied prompts: such a rerun is refused, saying what to delete.
    with pytest.raises(ValueError, match=r"samples 3 -> 5.*delete .*ties\.jsonl, .*ties\.jsonl\.ties and"):
        _build(tiny, constant, _prompts_file(tmp_path, 4), out, samples=5)
    for path in (out, ties_path(out), settings_path(out)):
        path.unlink()
    stats = _build(tiny, constant, _prompts_file(tmp_path, 4), out, samples=5)
    assert stats["resumed"] == 0 and stats["generated"] == 4


def test_build_is_deterministic_and_flips_exactly(tiny, tmp_path):
    task, prompts = _length_task(tmp_path), _prompts_file(tmp_path, 7)
    plain_a, plain_b, flipped = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "f.jsonl"
    _build(tiny, task, prompts, plain_a, seed=3)
    _build(tiny, task, prompts, plain_b, seed=3)
    assert plain_a.read_text() == plain_b.read_text()
    stats = _build(tiny, task, prompts, flipped, seed=3, flip_fraction=0.4)
    rows, base = read_pairs(flipped), read_pairs(plain_a)
    assert stats["pairs"] == len(rows) == len(base) == 7
    assert stats["flipped"] == sum(r["flipped"] for r in rows) == round(0.4 * 7) == 3
    for r, b in zip(rows, base, strict=True):
        if r["flipped"]:
            assert (r["chosen"], r["rejected"]) == (b["rejected"], b["chosen"])
            assert r["chosen_score"] < r["rejected_score"]
        else:
            assert r == b
    # Rerunning with another fraction re-labels the same file exactly (flips are undone as needed).
    stats = _build(tiny, task, prompts, flipped, seed=3, flip_fraction=0.0)
    assert stats["generated"] == 0 and stats["flipped"] == 0
    assert flipped.read_text() == plain_a.read_text()
    stats = _build(tiny, task, prompts, flipped, seed=3, flip_fraction=1.0)
    assert stats["flipped"] == 7


def test_build_restarts_and_recovers_truncated_line(tiny, tmp_path):
    task = _length_task(tmp_path)
    first, everything = _prompts_file(tmp_path, 3), _prompts_file(tmp_path, 6)
    out = tmp_path / "r.jsonl"
    _build(tiny, task, first, out)
    before = out.read_text().splitlines()
    stats = _build(tiny, task, everything, out)
    assert stats["resumed"] == 3 and stats["generated"] == 3
    after = out.read_text().splitlines()
    assert after[:3] == before and len(after) == 6
    # Simulate a crash in the middle of writing the last row.
    out.write_text("\n".join(after[:5]) + "\n" + after[5][:20])
    with pytest.warns(UserWarning, match="half-written last line"):
        stats = _build(tiny, task, everything, out)
    assert stats["resumed"] == 5 and stats["generated"] == 1 and stats["pairs"] == 6
    rows = read_pairs(out)
    assert sorted(prompt_key(r["prompt"]) for r in rows) == sorted(
        prompt_key(r["prompt"]) for r in load_prompts(everything)
    )
    # A broken line that is not the last one is an error, not something to drop silently.
    lines = out.read_text().splitlines()
    out.write_text("\n".join([lines[0], "{broken", *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match=r"r\.jsonl, line 2: not a valid pairs row"):
        _build(tiny, task, everything, out)


def test_build_validates_arguments(tiny, tmp_path):
    prompts = _prompts_file(tmp_path, 2)
    with pytest.raises(ValueError, match="samples must be an integer >= 2"):
        _build(tiny, "sentiment", prompts, tmp_path / "o.jsonl", samples=1)
    with pytest.raises(ValueError, match="flip_fraction must be between 0 and 1"):
        _build(tiny, "sentiment", prompts, tmp_path / "o.jsonl", flip_fraction=1.5)
    with pytest.raises(ValueError, match="is a directory"):
        _build(tiny, "sentiment", prompts, tmp_path)
    with pytest.raises(ValueError, match="unknown task"):
        _build(tiny, "nope", prompts, tmp_path / "o.jsonl")
    with pytest.raises(ValueError, match="needs its tokenizer"):
        build_pairs("sentiment", tiny[0], prompts, out=tmp_path / "o.jsonl", progress=False)
    # An output file of another task is not silently mixed with this one.
    _build(tiny, _length_task(tmp_path), prompts, tmp_path / "len.jsonl")
    with pytest.raises(ValueError, match=r"len\.jsonl, row 1: field 'task' is 'length'"):
        _build(tiny, "sentiment", prompts, tmp_path / "len.jsonl")
    # Someone else's pairs file, its last line without a newline: refused, and not one byte cut from it.
    theirs = tmp_path / "mydata.jsonl"
    theirs.write_text(
        '{"prompt": "a", "chosen": " b", "rejected": " c"}\n{"prompt": "a", "chosen": " b", "rejected": " d"}'
    )
    before = theirs.read_bytes()
    with (
        pytest.raises(ValueError, match="field 'task' is None"),
        pytest.warns(UserWarning, match="half-written"),
    ):
        _build(tiny, "sentiment", prompts, theirs)
    assert theirs.read_bytes() == before


def test_build_settings_are_recorded_once_it_writes_and_checked_on_reruns(tiny, tmp_path):
    from tidpo.tasks.build import main as build_main
    from tidpo.tasks.build import settings_path

    task, prompts = _length_task(tmp_path), _prompts_file(tmp_path, 2)
    out = tmp_path / "s.jsonl"
    # Builds that fail before writing (bad sampling settings, a mistyped model folder) record nothing,
    # so the corrected rerun is not held to them.
    with pytest.raises(ValueError, match="temperature must be a positive finite number"):
        _build(tiny, task, prompts, out, temperature=0.0)
    with pytest.raises(ValueError, match="no such model folder"):
        build_main(["--task", "sentiment", "--model", str(tmp_path / "typo"), "--out", str(out)])
    assert not settings_path(out).exists() and not out.exists()

    def failing(text, row=None):  # fails in the first chunk, before anything is written (e.g. OOM)
        raise RuntimeError("out of memory")

    broken = Task("length", "fails", failing, "tests:fail", tmp_path, tmp_path)
    with pytest.raises(RuntimeError, match="out of memory"):
        _build(tiny, broken, prompts, out, samples=5)
    assert not settings_path(out).exists()
    _build(tiny, task, prompts, out)
    assert json.loads(settings_path(out).read_text())["samples"] == 3
    with pytest.raises(ValueError, match=r"built with other settings \(samples 3 -> 4\)"):
        _build(tiny, task, prompts, out, samples=4)
    # Pairs written before settings were recorded: this build's are recorded now, with a warning.
    settings_path(out).unlink()
    with pytest.warns(UserWarning, match="from a build whose settings were not recorded"):
        _build(tiny, task, _prompts_file(tmp_path, 3), out)
    with pytest.raises(ValueError, match="built with other settings"):
        _build(tiny, task, prompts, out, seed=5)


def test_end_phrase_in_a_script_without_spaces():
    assert ins.check("非常谢谢", [{"type": "end_phrase", "phrase": "谢谢"}]) == [True]
    assert ins.check("ขอบคุณครับ", [{"type": "end_phrase", "phrase": "ครับ"}]) == [True]


def test_build_refuses_judges_that_return_nan(tiny, tmp_path):
    task = Task("nan", "NaN scores", lambda text, row=None: float("nan"), "tests:nan", tmp_path, tmp_path)
    with pytest.raises(ValueError, match=r"the nan judge scored a sample of prompt 'p0'.*finite numbers"):
        _build(tiny, task, _prompts_file(tmp_path, 2), tmp_path / "n.jsonl")
    text = Task("text", "text scores", lambda text, row=None: "0.7", "tests:text", tmp_path, tmp_path)
    with pytest.raises(ValueError, match=r"returned '0.7', expected a number"):
        _build(tiny, text, _prompts_file(tmp_path, 2), tmp_path / "t.jsonl")


@pytest.mark.slow
def test_build_sentiment_with_real_smollm2(tmp_path):
    """The embedded SmolLM2-135M-Instruct end to end: fluent text, VADER scores, a valid pair file."""
    prompts = _write(
        tmp_path / "s.jsonl",
        json.dumps({"prompt": "Write a two-sentence review of a small seaside hotel."})
        + "\n"
        + json.dumps({"prompt": "Describe a used bookshop in two sentences."})
        + "\n",
    )
    out = tmp_path / "s_pairs.jsonl"
    stats = build_pairs(
        "sentiment", "smollm2-135m", prompts, samples=3, out=out, max_new_tokens=20, progress=False
    )
    rows = read_pairs(out)
    assert stats["pairs"] == len(rows) == 2 - stats["ties_skipped"]
    for row in rows:
        text = row["chosen"][0]["content"]
        assert len(ins.words(text)) >= 5, f"expected English text from SmolLM2, got {text!r}"
        assert sentiment.judge(text) == row["chosen_score"] > row["rejected_score"]
