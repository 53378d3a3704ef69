"""Token-importance explanations on a tiny real model, and their renderings."""

from __future__ import annotations

import html
import math
import re

import pytest

from tidpo.evaluation.explain import (
    TokenImportance,
    _decode_pieces,
    colour_range,
    explain,
    render_html,
    render_png,
    render_terminal,
    run_explain,
)
from tidpo.models import tiny_causal_lm, tiny_tokenizer

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny():
    tok = tiny_tokenizer()
    return tiny_causal_lm(tokenizer=tok), tok


def test_explain_weights_mean_one_and_distributions_sum_one(tiny):
    model, tok = tiny
    ti = explain(model, tok, "The sky is", " blue. The grass is green.")
    n = len(ti.tokens)
    assert n == len(ti.weights) == len(ti.attribution) == len(ti.prior) == len(ti.token_ids) > 3
    assert math.fsum(ti.weights) / n == pytest.approx(1.0, abs=1e-5)
    assert math.fsum(ti.attribution) == pytest.approx(1.0, abs=1e-5)
    assert math.fsum(ti.prior) == pytest.approx(1.0, abs=1e-5)
    assert all(w >= 0 for w in ti.weights)
    # The Gaussian prior peaks in the middle of the span and is symmetric.
    assert ti.prior[0] == pytest.approx(ti.prior[-1])
    assert max(ti.prior) == ti.prior[(n - 1) // 2] or max(ti.prior) == ti.prior[n // 2]
    # Hybrid mix (spec §2): W = n * (0.7 I + 0.3 P) (the mix already sums to 1).
    for w, a, p in zip(ti.weights, ti.attribution, ti.prior, strict=True):
        assert w == pytest.approx(n * (0.7 * a + 0.3 * p), rel=1e-4, abs=1e-6)
    # The tokens spell the response, EOS appended as the data layer does for standard rows.
    assert "".join(ti.tokens) == " blue. The grass is green." + tok.eos_token
    assert ti.prompt == "The sky is"


def test_explain_lambda_zero_is_the_prior(tiny):
    model, tok = tiny
    ti = explain(model, tok, "The sky is", " blue.", lambda_importance=0.0)
    n = len(ti.tokens)
    for w, p in zip(ti.weights, ti.prior, strict=True):
        assert w == pytest.approx(n * p, rel=1e-5)


def test_explain_sequence_span_and_bad_span(tiny):
    model, tok = tiny
    resp = explain(model, tok, "The sky is", " blue.")
    seq = explain(model, tok, "The sky is", " blue.", span="sequence")
    assert len(seq.tokens) > len(resp.tokens)
    assert "".join(seq.tokens) == "The sky is blue." + tok.eos_token
    assert sum(seq.weights) / len(seq.weights) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="span must be"):
        explain(model, tok, "The sky is", " blue.", span="prompt")


def test_explain_conversational_prompt_uses_chat_template(tiny):
    model, tok = tiny
    ti = explain(model, tok, [{"role": "user", "content": "Is the sky blue?"}], "The sky is blue.")
    assert ti.prompt.startswith("<|im_start|>user\nIs the sky blue?")
    assert ti.prompt.endswith("<|im_start|>assistant\n")
    assert "".join(ti.tokens).startswith("The sky is blue.<|im_end|>")


def test_explain_on_a_peft_model(tiny):
    peft = pytest.importorskip("peft")
    _model, tok = tiny
    wrapped = peft.get_peft_model(
        tiny_causal_lm(tokenizer=tok), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    ti = explain(wrapped, tok, "The sky is", " blue.")
    assert sum(ti.weights) / len(ti.weights) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("text", [" 猫が好き", " I love 🐈 and 🐶!", " naïve café", "é", " 🐈🐈 ok"])
def test_pieces_join_to_the_text_multibyte_characters_included(tiny, text):
    """Byte-level BPE splits multi-byte characters over tokens: the token completing a character shows
    it, the ones before it show nothing, and the pieces join to the text."""
    _, tok = tiny
    ids = tok(text)["input_ids"]
    pieces = _decode_pieces(tok, tok("Say:")["input_ids"], ids)
    assert len(pieces) == len(ids) and "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_colour_range_clips_outliers():
    low, high = colour_range([0.5, 1.0, 1.5, 2.0] * 5 + [30.0])
    assert low == 0.5 and high < 30.0
    assert colour_range([1.0, 1.0]) == (0.0, 1.0)


def _handmade() -> TokenImportance:
    tokens = ["<b>Tom", " & ", "Jerry's", '"x"', "\n", "  two  spaces", "\tend"]
    n = len(tokens)
    weights = [0.5, 0.2, 2.0, 1.0, 0.3, 1.5, 1.5]
    return TokenImportance(
        tokens=tokens,
        weights=weights,
        attribution=[w / n for w in weights],
        prior=[1 / n] * n,
        prompt="Say <something> & more",
    )


def test_render_html_escapes_every_token_and_is_self_contained():
    ti = _handmade()
    page = render_html(ti, title="A <test> & title")
    assert page.startswith("<!DOCTYPE html>")
    assert "<title>A &lt;test&gt; &amp; title</title>" in page
    assert "<b>Tom" not in page  # raw markup from a token must never reach the page
    spans = re.findall(
        r"<span class='ti-tok'[^>]*title='([^']*)'>(.*?)</span>(?=<span class='ti-tok'|</div>)", page, re.S
    )
    assert len(spans) == len(ti.tokens)
    for (tip, body), token, w in zip(spans, ti.tokens, ti.weights, strict=True):
        shown = re.sub(r"<span class='ti-nl'>↵</span>", "", body)
        expected = token.replace("\t", "→   ")
        assert html.unescape(shown) == expected
        assert f"weight {w:.3f}" in html.unescape(tip)
    # The newline is visible and still breaks the line; prompt escaped too.
    assert "<span class='ti-nl'>↵</span>\n" in page
    assert "Say &lt;something&gt; &amp; more" in page
    # No external resources.
    assert not re.search(r"(src|href)=['\"]?(http|//)", page)
    assert "white-space: pre-wrap" in page


def test_render_terminal_has_colours_and_all_text():
    ti = _handmade()
    out = render_terminal(ti)
    assert "\x1b[48;2;" in out
    plain = re.sub(r"\x1b\[[0-9;]*m", "", out)
    assert plain.startswith('<b>Tom & Jerry\'s"x"↵\n  two  spaces→   end')
    assert "7 response tokens" in plain


def test_render_terminal_without_colour_shows_each_weight():
    ti = _handmade()
    out = render_terminal(ti, colour=False)
    assert "\x1b" not in out
    assert out.startswith(
        "".join(f"{p}[{w:.2f}]" for p, w in zip(ti.tokens[:1], ti.weights[:1], strict=True))
    )
    assert out.count("[") >= len(ti.tokens) and "7 response tokens" in out


def test_render_png_writes_an_image(tmp_path):
    path = render_png(_handmade(), tmp_path / "sub" / "x.png", title="hand-made")
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5000


def test_run_explain_writes_html_png_json(tmp_path, capsys):
    tok = tiny_tokenizer()
    model_dir = tmp_path / "tiny"
    tiny_causal_lm(tokenizer=tok).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    out = tmp_path / "out"
    ti = run_explain(str(model_dir), "The sky is", " blue & <green>.", str(out))
    page = (out / "importance.html").read_text(encoding="utf-8")
    for token in ti.tokens:
        assert html.escape(token, quote=False) in page
    assert "&lt;" in page and "<green>" not in page
    # The token spans, unescaped and joined, give back the response exactly.
    bodies = re.findall(r"<span class='ti-tok'[^>]*>(.*?)</span>(?=<span class='ti-tok'|</div>)", page, re.S)
    assert html.unescape("".join(bodies)) == " blue & <green>." + tok.eos_token
    assert (out / "importance.png").read_bytes().startswith(PNG_MAGIC)
    assert (out / "importance.json").exists()
    printed = capsys.readouterr().out  # captured: not a terminal, so no colour codes, weights as text
    assert "\x1b[" not in printed and "importance.html" in printed and "importance.json" in printed
    assert f"{ti.tokens[0]}[{ti.weights[0]:.2f}]" in printed


def test_run_explain_from_a_data_row(tmp_path):
    tok = tiny_tokenizer()
    model_dir = tmp_path / "tiny"
    tiny_causal_lm(tokenizer=tok).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = tmp_path / "pairs.jsonl"
    data.write_text(
        '{"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}\n'
        '{"prompt": "The grass is", "chosen": " green.", "rejected": " blue."}\n'
    )
    ti = run_explain(
        str(model_dir), None, None, str(tmp_path / "o"), data=str(data), row=1, print_terminal=False
    )
    assert ti.prompt == "The grass is"
    assert "".join(ti.tokens) == " green." + tok.eos_token
    with pytest.raises(ValueError, match=r"--row 5 is out of range.*2 rows"):
        run_explain(str(model_dir), None, None, str(tmp_path / "o"), data=str(data), row=5)
    # An implicit-prompt file (a documented format): the prompt is the pair's shared beginning.
    implicit = tmp_path / "implicit.jsonl"
    implicit.write_text('{"chosen": "The sky is blue.", "rejected": "The sky is green."}\n')
    ti = run_explain(
        str(model_dir), None, None, str(tmp_path / "o"), data=str(implicit), row=0, print_terminal=False
    )
    assert ti.prompt == "The sky is" and "".join(ti.tokens).startswith(" blue.")
    with pytest.raises(ValueError, match="either --prompt/--response or --data/--row"):
        run_explain(str(model_dir), "p", "r", str(tmp_path / "o"), data=str(data), row=0)
    with pytest.raises(ValueError, match="both --prompt and --response"):
        run_explain(str(model_dir), "p", None, str(tmp_path / "o"))
    with pytest.raises(ValueError, match="--response is empty"):
        run_explain(str(model_dir), "p", " ", str(tmp_path / "o"))
