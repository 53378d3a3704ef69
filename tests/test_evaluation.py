"""evaluate() on tiny real models; reward and entropy maths against direct computations."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from tidpo.evaluation.evaluate import (
    evaluate,
    format_table,
    mean_token_entropy,
    run_eval,
    write_eval,
)
from tidpo.models import tiny_causal_lm, tiny_tokenizer

ROWS = [
    {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
    {
        "prompt": "Write a short review of the restaurant.",
        "chosen": " I loved it!",
        "rejected": " It was terrible.",
    },
    {"prompt": "The grass is", "chosen": " green.", "rejected": " blue."},
]
KEYS = {
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "judge/mean",
    "judge/reference_mean",
    "judge/win_rate",
    "diversity/self_bleu",
    "diversity/distinct_2",
    "diversity/distinct_4",
    "diversity/entropy",
    "kl",
    "num_pairs",
    "num_prompts",
}


@pytest.fixture(scope="module")
def models():
    tok = tiny_tokenizer()
    return tiny_causal_lm(tokenizer=tok, seed=1), tiny_causal_lm(tokenizer=tok, seed=0), tok


def _direct_logp(model, tok, prompt: str, response: str) -> float:
    """Sum of log p(response tokens | prompt) with a full log-softmax (the slow, obvious way)."""
    p_ids = tok(prompt)["input_ids"]
    full = tok(prompt + response + tok.eos_token)["input_ids"]
    ids = torch.tensor([full])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits.double(), dim=-1)
    return sum(float(logp[0, t - 1, full[t]]) for t in range(len(p_ids), len(full)))


def test_evaluate_returns_all_keys_finite(models):
    policy, reference, tok = models
    res = evaluate(policy, reference, tok, ROWS, judge="sentiment", max_new_tokens=12, batch_size=2)
    assert set(res) == KEYS
    assert all(math.isfinite(v) for v in res.values())
    assert 0.0 <= res["rewards/accuracies"] <= 1.0
    assert 0.0 <= res["judge/win_rate"] <= 1.0
    assert res["num_pairs"] == 3 and res["num_prompts"] == 3
    assert res["diversity/entropy"] > 0
    assert res["rewards/margins"] == pytest.approx(res["rewards/chosen"] - res["rewards/rejected"], abs=1e-6)


def test_rewards_match_a_direct_computation(models):
    policy, reference, tok = models
    beta = 0.5
    res = evaluate(policy, reference, tok, ROWS, beta=beta, max_new_tokens=4, batch_size=2)
    chosen, rejected = [], []
    for row in ROWS:
        for key, out in (("chosen", chosen), ("rejected", rejected)):
            lp = _direct_logp(policy, tok, row["prompt"], row[key])
            lr = _direct_logp(reference, tok, row["prompt"], row[key])
            out.append(beta * (lp - lr))
    assert res["rewards/chosen"] == pytest.approx(sum(chosen) / 3, abs=1e-4)
    assert res["rewards/rejected"] == pytest.approx(sum(rejected) / 3, abs=1e-4)
    acc = sum(c > r for c, r in zip(chosen, rejected, strict=True)) / 3
    assert res["rewards/accuracies"] == pytest.approx(acc)
    lp_chosen = sum(_direct_logp(policy, tok, r["prompt"], r["chosen"]) for r in ROWS) / 3
    assert res["logps/chosen"] == pytest.approx(lp_chosen, abs=1e-3)
    # No judge given: no judge metrics.
    assert not any(k.startswith("judge/") for k in res)


def test_policy_against_itself(models):
    policy, _, tok = models
    res = evaluate(policy, policy, tok, ROWS, judge="sentiment", max_new_tokens=8, return_samples=True)
    assert res["kl"] == 0.0
    assert res["rewards/chosen"] == 0.0 and res["rewards/margins"] == 0.0
    assert res["rewards/accuracies"] == 0.0  # ties are not wins (TRL's definition)
    # Same seed, same model: identical generations, so every prompt ties.
    assert res["judge/win_rate"] == 0.5
    assert all(s["policy"] == s["reference"] for s in res["samples"])
    assert [s["prompt"] for s in res["samples"]] == [r["prompt"] for r in ROWS]


def test_same_seed_is_reproducible_and_leaves_global_rng_alone(models):
    policy, reference, tok = models
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = evaluate(policy, reference, tok, ROWS, max_new_tokens=8, seed=7, return_samples=True)
    after = torch.rand(1)
    b = evaluate(policy, reference, tok, ROWS, max_new_tokens=8, seed=7, return_samples=True)
    assert before == after
    assert a["samples"] == b["samples"] and a["kl"] == b["kl"]


def test_peft_policy_uses_adapters_disabled_as_reference(models):
    peft = pytest.importorskip("peft")
    _, _, tok = models
    wrapped = peft.get_peft_model(
        tiny_causal_lm(tokenizer=tok, seed=3), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    # Fresh LoRA (B = 0) is the base model exactly: zero KL and zero rewards.
    res = evaluate(wrapped, None, tok, ROWS, max_new_tokens=6)
    assert res["kl"] == pytest.approx(0.0, abs=1e-5)
    assert res["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="not a PEFT model"):
        evaluate(tiny_causal_lm(tokenizer=tok), None, tok, ROWS, max_new_tokens=4)


def test_one_pair_evaluates_without_self_bleu(models):
    policy, reference, tok = models
    whole = evaluate(policy, reference, tok, ROWS, max_new_tokens=4)
    one = evaluate(policy, reference, tok, ROWS[:1], max_new_tokens=4)
    assert "diversity/self_bleu" in whole and "diversity/self_bleu" not in one
    assert one["num_pairs"] == one["num_prompts"] == 1.0
    assert all(math.isfinite(v) for v in one.values())
    # The pair's own numbers are those it has among the others (the rewards do not depend on the batch).
    alone = evaluate(policy, reference, tok, ROWS, max_new_tokens=4, num_pairs=1)
    assert one["rewards/chosen"] == pytest.approx(alone["rewards/chosen"], abs=1e-6)


def test_a_judge_missing_its_row_fields_fails_before_any_generation(models, monkeypatch):
    module = sys.modules[evaluate.__module__]  # the package re-exports the function under the same name
    policy, reference, tok = models

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled before checking the judge's rows")

    monkeypatch.setattr(module, "_sample", no_sampling)
    with pytest.raises(
        ValueError, match=r"'instructions' judge cannot score the data: row 0: missing field 'constr"
    ):
        evaluate(policy, reference, tok, ROWS, judge="instructions")
    rows = [dict(r, constraints=[{"type": "no_commas"}]) for r in ROWS]
    rows[2] = dict(ROWS[2])  # a file's column: null in this row
    with pytest.raises(ValueError, match=r"row 2: missing field 'constraints'"):
        evaluate(policy, reference, tok, rows, judge="instructions")
    rows[2] = dict(ROWS[2], constraints=[])
    with pytest.raises(ValueError, match=r"row 2: field 'constraints' is empty"):
        evaluate(policy, reference, tok, rows, judge="instructions")
    rows[2] = dict(ROWS[2], constraints=[{"type": "bogus"}])
    with pytest.raises(ValueError, match=r"row 2: constraints\[0\]: unknown constraint type 'bogus'"):
        evaluate(policy, reference, tok, rows, judge="instructions")


def test_evaluate_errors(models):
    policy, reference, tok = models
    with pytest.raises(KeyError, match="Unknown judge 'nope'"):
        evaluate(policy, reference, tok, ROWS, judge="nope")
    with pytest.raises(ValueError, match="num_prompts must be >= 1"):
        evaluate(policy, reference, tok, ROWS, num_prompts=0)
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(policy, reference, tok, ROWS, batch_size=0)
    with pytest.raises(ValueError, match=r"temperature must be > 0 \(the generations are sampled\), got 0"):
        evaluate(policy, reference, tok, ROWS, temperature=0.0)


def test_a_failing_judge_is_named_with_the_prompt(models, monkeypatch, capsys):
    import tidpo.cli as cli_module

    policy, reference, tok = models

    def picky(text):
        raise ValueError("bad input to my judge")

    with pytest.raises(ValueError, match="bad input to my judge") as info:
        evaluate(policy, reference, tok, ROWS, judge=picky, max_new_tokens=4, batch_size=2)
    note = "judge <function"
    assert note in info.value.__notes__[0] and "policy's generation for prompt 0" in info.value.__notes__[0]

    def eval_raising(_argv):  # the CLI's one-line error carries the note
        raise info.value

    monkeypatch.setitem(cli_module.COMMANDS, "eval", eval_raising)
    assert cli_module.main(["eval"]) == 2
    line = capsys.readouterr().err.splitlines()[0]
    assert "bad input to my judge" in line and "policy's generation for prompt 0" in line


def test_mean_token_entropy_hand_computed():
    vocab = 8
    logits = torch.zeros(1, 4, vocab)  # uniform: entropy log(8)
    logits[0, 1] = torch.tensor([0.0, 0.0] + [-1e9] * (vocab - 2))  # two equally likely tokens: log 2
    mask = torch.tensor([[0, 0, 1, 1]])  # tokens 2 and 3 count: predicted by positions 1 and 2
    total, count = mean_token_entropy(logits, mask)
    assert count == 2
    assert total == pytest.approx(math.log(2) + math.log(8), abs=1e-5)
    total, count = mean_token_entropy(logits, torch.tensor([[1, 0, 0, 0]]))  # position 0 never counts
    assert count == 0 and total == 0.0
    with pytest.raises(ValueError, match="expected logits"):
        mean_token_entropy(logits, torch.ones(1, 3))


def test_format_table_and_write_eval(tmp_path):
    res = {
        "rewards/accuracies": 0.75,
        "kl": 1.25,
        "diversity/self_bleu": 30.1,
        "num_pairs": 4.0,
        "custom": 2.5,
    }
    table = format_table(res)
    assert "rewards/accuracies" in table and "0.7500" in table and "higher is better" in table
    assert "custom" in table and "other:" in table
    assert table.index("rewards/") < table.index("diversity/") < table.index("kl")
    path = write_eval({**res, "samples": [{"prompt": "p", "policy": "a", "reference": "b"}]}, tmp_path / "o")
    assert json.loads(path.read_text()) == res
    assert json.loads((tmp_path / "o" / "samples.jsonl").read_text()) == {
        "prompt": "p",
        "policy": "a",
        "reference": "b",
    }


def test_run_eval_end_to_end(tmp_path, capsys):
    tok = tiny_tokenizer()
    for name, seed in (("policy", 1), ("ref", 0)):
        tiny_causal_lm(tokenizer=tok, seed=seed).save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    data = tmp_path / "held_out.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    res = run_eval(
        str(tmp_path / "policy"),
        str(tmp_path / "ref"),
        str(data),
        "sentiment",
        str(tmp_path / "out"),
        max_new_tokens=6,
    )
    assert set(res) == KEYS | {"samples"}
    saved = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert set(saved) == KEYS
    assert len((tmp_path / "out" / "samples.jsonl").read_text().splitlines()) == 3
    assert "judge/win_rate" in capsys.readouterr().out


def test_run_eval_truncates_as_the_training_run_and_checks_cheap_inputs_first(tmp_path, monkeypatch, capsys):
    from tidpo import models

    tok = tiny_tokenizer()
    for name in ("policy", "ref"):
        tiny_causal_lm(tokenizer=tok).save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    (tmp_path / "policy" / "run_config.json").write_text(
        json.dumps({"training": {"max_length": 40, "max_prompt_length": 3, "beta": 0.25}})
    )
    data = tmp_path / "held_out.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    seen = {}
    real_evaluate = evaluate

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real_evaluate(*args, **kwargs)

    module = sys.modules[run_eval.__module__]  # the package re-exports the function under the same name
    monkeypatch.setattr(module, "evaluate", spy)
    folders = (str(tmp_path / "policy"), str(tmp_path / "ref"), str(data), None, str(tmp_path / "o"))
    run_eval(*folders, max_new_tokens=2)
    assert (seen["max_length"], seen["max_prompt_length"], seen["beta"]) == (40, 3, 0.25)
    run_eval(*folders, max_new_tokens=2, max_length=64, max_prompt_length=None, beta=None)
    assert (seen["max_length"], seen["max_prompt_length"]) == (64, 3)  # given wins; None: the run's
    assert seen["beta"] == 0.25  # the rewards are on the training's scale
    run_eval(*folders, max_new_tokens=2, beta=0.5)
    assert seen["beta"] == 0.5
    # A checkpoint folder of that run: its run's lengths. A folder without any: the defaults, said so.
    checkpoint = tmp_path / "policy" / "checkpoint-2"
    tiny_causal_lm(tokenizer=tok).save_pretrained(checkpoint)
    tok.save_pretrained(checkpoint)
    run_eval(str(checkpoint), *folders[1:], max_new_tokens=2)
    assert (seen["max_length"], seen["max_prompt_length"]) == (40, 3)
    capsys.readouterr()
    seen.clear()
    run_eval(str(tmp_path / "ref"), *folders[1:], max_new_tokens=2, max_prompt_length=5)
    assert "max_length" not in seen and seen["max_prompt_length"] == 5  # evaluate's default length
    assert "beta" not in seen  # evaluate's default beta, 0.1
    assert "found, so --max-length 512, --beta 0.1 (the defaults) apply" in capsys.readouterr().out

    # A bad judge or data file fails before any model is loaded.
    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the cheap checks")

    monkeypatch.setattr(models, "load_causal_lm", no_model)
    with pytest.raises(KeyError, match="Unknown judge"):
        run_eval(str(tmp_path / "policy"), str(tmp_path / "ref"), str(data), "nope", str(tmp_path / "o"))
    with pytest.raises(ValueError, match="'instructions' judge cannot score the data: row 0"):
        run_eval(
            str(tmp_path / "policy"), str(tmp_path / "ref"), str(data), "instructions", str(tmp_path / "o")
        )
    with pytest.raises(FileNotFoundError):
        run_eval(
            str(tmp_path / "policy"),
            str(tmp_path / "ref"),
            str(tmp_path / "x.jsonl"),
            None,
            str(tmp_path / "o"),
        )
