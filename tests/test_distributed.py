"""Scale-out: real multi-process DDP runs on CPU (gloo), shipped recipes/accelerate configs, LoRA +
gradient checkpointing + fused attribution.

The DDP runs are real `accelerate launch` processes running tests/distributed_train_script.py; no
mocks. DeepSpeed and FSDP need GPUs and are not exercised here (docs/scaling.md says what was run).
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).resolve().parent / "distributed_train_script.py"
RECIPES = sorted((ROOT / "configs" / "recipes").glob("*.yaml"))
ACCELERATE_CONFIGS = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    # The child processes must import this checkout's tidpo even if it is not installed.
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    return env


def _launch(num_processes: int, out: Path, runs: str, per_device_batch: int, steps: int) -> subprocess.Popen:
    script_args = [str(SCRIPT), "--out", str(out), "--runs", runs]
    script_args += ["--per_device_batch", str(per_device_batch), "--steps", str(steps)]
    if num_processes == 1:
        cmd = [sys.executable, *script_args]
    else:
        # --multi_gpu starts N processes even without GPUs (gloo); port 0 = a free port.
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu"]
        cmd += ["--num_processes", str(num_processes), "--main_process_port", "0", *script_args]
    log = open(out.parent / f"{out.name}.log", "w")
    return subprocess.Popen(cmd, env=_env(), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)


def _wait(proc: subprocess.Popen, out: Path, timeout: float = 300) -> None:
    code = proc.wait(timeout=timeout)
    log = (out.parent / f"{out.name}.log").read_text()
    assert code == 0, f"launch failed ({code}):\n{log[-4000:]}"


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """One 2-process DDP launch (runs equal, full, lora) and the 1-process baseline of run equal.

    Started together so their start-up (imports) overlaps; global batch 4 in both (2 x 2 vs 4 x 1).
    """
    base = tmp_path_factory.mktemp("ddp")
    ddp_out, single_out = base / "ddp", base / "single"
    ddp_out.mkdir()
    single_out.mkdir()
    ddp = _launch(2, ddp_out, "equal,full,lora,skip", per_device_batch=2, steps=4)
    single = _launch(1, single_out, "equal", per_device_batch=4, steps=4)
    _wait(single, single_out)
    _wait(ddp, ddp_out)
    return ddp_out, single_out


def _load(out: Path, run: str, rank: int):
    params = torch.load(out / f"{run}_rank{rank}.pt")
    info = json.loads((out / f"{run}_rank{rank}.json").read_text())
    return params, info


# ----------------------------------------------------------------------------- DDP correctness


def test_ddp_weights_match_single_process(ddp_runs, tiny_tok):
    """2 processes x 2 pairs == 1 process x 4 pairs: same weights after 4 SGD steps (fused attribution,
    hybrid weights, reference log-probs precomputed split across the ranks)."""
    from tidpo.models import tiny_causal_lm

    ddp_out, single_out = ddp_runs
    single, single_info = _load(single_out, "equal", 0)
    rank0, info0 = _load(ddp_out, "equal", 0)
    rank1, info1 = _load(ddp_out, "equal", 1)
    assert single_info["backend"] == "single" and single_info["num_processes"] == 1
    assert info0["backend"] == "ddp" and info0["num_processes"] == 2
    assert info0["precomputed"] and info1["precomputed"]
    initial = dict(tiny_causal_lm("llama", tokenizer=tiny_tok, seed=0).named_parameters())
    moved = max((single[n] - initial[n].detach()).abs().max().item() for n in single)
    # The comparison below is meaningful: training moved the weights far more than the tolerance.
    assert moved > 1e-3, moved
    assert single.keys() == rank0.keys() == rank1.keys()
    for name in single:
        assert torch.equal(rank0[name], rank1[name]), f"ranks disagree on {name}"
        torch.testing.assert_close(rank0[name], single[name], rtol=0, atol=1e-6, msg=name)
    # Gathered metrics are over every pair/token of every rank: the same curves as the single process
    # (pair means, the weights' pooled std and global max; per-rank means, stds or maxima would differ).
    ddp_logs = [h for h in info0["log_history"] if "loss" in h]
    single_logs = [h for h in single_info["log_history"] if "loss" in h]
    assert len(ddp_logs) == len(single_logs) == 4
    for key in ("loss", "rewards/margins", "logps/chosen", "weights/std", "weights/max"):
        expected = pytest.approx([h[key] for h in single_logs], rel=1e-4, abs=1e-6)
        assert [h[key] for h in ddp_logs] == expected, key
    # At step 1 the policy is the reference: the margins are rounding noise (~1e-9) and so is which pair
    # counts as right; after it the fraction of right pairs is the same.
    assert [h["rewards/accuracies"] for h in ddp_logs[1:]] == [
        h["rewards/accuracies"] for h in single_logs[1:]
    ]
    # Evaluation on 7 pairs: the padding row of the ranks' last batch counts nowhere (loss, metrics).
    ddp_eval, single_eval = info0["evaluation"], single_info["evaluation"]
    timings = ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second")
    assert {k: v for k, v in ddp_eval.items() if k not in timings} == {
        k: v for k, v in info1["evaluation"].items() if k not in timings
    }
    for key in (
        "eval_loss",
        "eval_rewards/margins",
        "eval_logps/rejected",
        "eval_logits/chosen",
        "eval_weights/std",
    ):
        assert ddp_eval[key] == pytest.approx(single_eval[key], rel=1e-5, abs=1e-7), key


def test_ddp_skips_a_non_finite_batch_on_one_rank_without_hanging(ddp_runs):
    """skip_nonfinite_batches under DDP: the rank whose batch holds row 5 (NaN embedding) skips it while
    the other trains; both reach the end (no collective left waiting) and log the same numbers."""
    ddp_out, _ = ddp_runs
    p0, info0 = _load(ddp_out, "skip", 0)
    p1, info1 = _load(ddp_out, "skip", 1)
    logs0 = [h for h in info0["log_history"] if "loss" in h]
    assert len(logs0) == 4 and logs0 == [h for h in info1["log_history"] if "loss" in h]
    assert logs0[-1]["nonfinite/skipped"] >= 1  # the running total, gathered: the same on both ranks
    assert all(math.isfinite(h["loss"]) for h in logs0)  # the other rank's batch is the step's loss
    for name in p0:  # the poisoned embedding row stays NaN on both ranks; everything else is finite
        torch.testing.assert_close(p0[name], p1[name], rtol=0, atol=0, equal_nan=True, msg=name)
        assert torch.isnan(p0[name]).sum() == (p0[name].shape[-1] if "embed" in name else 0), name


@pytest.mark.parametrize("run", ["full", "lora"])
def test_ddp_full_ti_dpo_logs_are_finite_and_identical_across_ranks(ddp_runs, run):
    """Full TI-DPO (anchors sampled per rank, KL, triplet; 2 accumulated micro-batches) and LoRA +
    gradient checkpointing under DDP: training runs, every metric is finite, and the gathered logs and
    weights agree on both ranks."""
    ddp_out, _ = ddp_runs
    p0, info0 = _load(ddp_out, run, 0)
    p1, info1 = _load(ddp_out, run, 1)
    logs0 = [h for h in info0["log_history"] if "loss" in h]
    logs1 = [h for h in info1["log_history"] if "loss" in h]
    assert len(logs0) == 4
    for key in (
        "loss",
        "rewards/margins",
        "triplet/loss",
        "triplet/dist_pos",
        "kl/chosen",
        "weights/entropy",
    ):
        for entry in logs0:
            assert key in entry and math.isfinite(entry[key]), (key, entry)
    assert logs0 == logs1  # metrics are gathered: every rank logs the same numbers
    for name in p0:
        assert torch.equal(p0[name], p1[name]), f"ranks disagree on {name}"
    if run == "full":  # 2 micro-batches of 2 pairs per step: one decode loop of 4 prompts per step
        assert info0["anchor_loops"] == info1["anchor_loops"] == [4] * 4
    else:  # one micro-batch per step
        assert info0["anchor_loops"] == [2] * 4
    if run == "lora":
        assert info0["ref_model_is_none"]  # reference = adapters disabled, no second model
        assert p0 and all("lora_" in name for name in p0)
        assert any(p.abs().max() > 0 for n, p in p0.items() if "lora_B" in n)  # B starts at 0


# ----------------------------------------------------------------------------- CLI relaunch


def test_cli_num_processes_relaunches_under_accelerate(tmp_path, tiny_tok):
    """`tidpo train --num_processes 2` hands over to accelerate and trains with 2 processes; without GPUs
    it adds use_cpu itself (without it each worker trained alone, into the same output_dir)."""
    from conftest import PAIRS
    from tidpo.models import tiny_causal_lm

    model_dir = tmp_path / "tiny"
    tiny_causal_lm("llama", tokenizer=tiny_tok, seed=0).save_pretrained(model_dir)
    tiny_tok.save_pretrained(model_dir)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in PAIRS))
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": str(model_dir),
                "train_data": str(data),
                "output_dir": str(tmp_path / "out"),
                "num_processes": 2,
                **({"use_cpu": True} if torch.cuda.is_available() else {}),
                "max_steps": 2,
                "per_device_train_batch_size": 2,
                "learning_rate": 1e-3,
                "anchor_max_new_tokens": 4,
                "max_length": 64,
                "max_prompt_length": 32,
                "save_strategy": "no",
                "report": False,
                "report_to": "none",
                "disable_tqdm": True,
            }
        )
    )
    result = subprocess.run(
        [sys.executable, "-m", "tidpo.cli", "train", "--config", str(config)],
        env=_env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "relaunching under accelerate" in result.stdout
    if torch.cuda.is_available():
        return
    assert "--use_cpu true" in result.stdout
    # Launched by hand without use_cpu: refused, instead of two lone trainings into one output_dir.
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--main_process_port", "0", "-m", "tidpo.cli", "train", "--config", str(config)]
    launch += ["--output_dir", str(tmp_path / "by_hand")]
    result = subprocess.run(launch, env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "add --use_cpu true" in result.stderr, result.stderr[-4000:]
    assert not (tmp_path / "by_hand" / "model.safetensors").exists()
    state = json.loads((tmp_path / "out" / "trainer_state.json").read_text())
    # 8 pairs, 2 steps of 2 processes x 2 pairs = one epoch; one process would be at epoch 0.5.
    assert state["global_step"] == 2 and state["epoch"] == pytest.approx(1.0)
    assert (tmp_path / "out" / "model.safetensors").exists()


# ----------------------------------------------------------------------------- single process


def test_lora_with_gradient_checkpointing_fused_matches_separate(
    tmp_path, tiny_tok, tiny_llama, pairs_dataset
):
    """LoRA + gradient checkpointing + fused attribution: same loss and adapter gradients as the
    separate pass, and a short run trains the adapters only."""
    from peft import LoraConfig

    from tidpo import TIDPOTrainer
    from tiny_setup import make_config, train_loss_and_grads

    results = {}
    for attribution_pass in ("fused", "separate"):
        args = make_config(
            tmp_path / attribution_pass,
            gamma=0.0,
            gradient_checkpointing=True,
            attribution_pass=attribution_pass,
        )
        lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
        trainer = TIDPOTrainer(
            copy.deepcopy(tiny_llama),
            args=args,
            train_dataset=pairs_dataset,
            processing_class=tiny_tok,
            peft_config=lora,
        )
        assert trainer.ref_model is None
        # Move the adapters off zero so the policy differs from the reference (adapters disabled).
        with torch.no_grad():
            for name, p in trainer.model.named_parameters():
                if "lora_B" in name:
                    p.add_(0.05 * torch.randn_like(p, generator=torch.Generator().manual_seed(4)))
        trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        results[attribution_pass] = train_loss_and_grads(trainer)
        if attribution_pass == "fused":
            base = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" not in n}
            lora_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
            trainer.train()
            for name, p in trainer.model.named_parameters():
                if "lora_" in name:
                    continue
                assert torch.equal(base[name], p.detach()), f"base weight {name} changed"
            assert any(
                not torch.equal(lora_before[n], p.detach())
                for n, p in trainer.model.named_parameters()
                if n in lora_before
            )
    (loss_f, g_f), (loss_s, g_s) = results["fused"], results["separate"]
    assert loss_f == pytest.approx(loss_s, rel=1e-5)
    assert g_f and g_f.keys() == g_s.keys()
    assert all("lora_" in n for n in g_f)
    for name in g_f:
        torch.testing.assert_close(g_f[name], g_s[name], rtol=1e-4, atol=1e-6)


def test_rank_slice_covers_every_row_with_equal_batches():
    from tidpo.training.distributed import rank_slice

    for rows in (1, 3, 7, 8, 9):
        for world in (1, 2, 3):
            for batch in (1, 2, 4):
                slices = [rank_slice(rows, world, r, batch) for r in range(world)]
                assert sorted(set().union(*slices)) == list(range(rows))
                lengths = {len(s) for s in slices}
                assert len(lengths) == 1 and lengths.pop() % batch == 0  # same whole batches per rank
    assert rank_slice(0, 2, 1, 4) == []


def test_backend_helpers_on_one_process():
    from accelerate import Accelerator

    from tidpo.training.distributed import (
        backend_name,
        fused_attribution_supported,
        global_sum_count,
        reduce_batch_stats,
    )

    acc = Accelerator(cpu=True)
    assert backend_name(acc) == "single"
    assert fused_attribution_supported(acc)
    assert global_sum_count(acc, torch.tensor([[1.0, 2.0], [3.0, 6.0]])) == (12.0, 4.0)
    assert global_sum_count(acc, torch.zeros(0)) == (0.0, 0.0)
    stats = {"a": torch.tensor([3.0, 4.0]), "top": torch.tensor(7.0), "b": torch.tensor([1.0, 2.0])}
    assert reduce_batch_stats(acc, stats, {"top"}) == {"a": (3.0, 4.0), "b": (1.0, 2.0), "top": (7.0, 1.0)}
    assert reduce_batch_stats(acc, {}) == {}


# ----------------------------------------------------------------------------- shipped configs


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipes_are_valid_tidpo_train_options(recipe):
    """Every key of a shipped recipe is a `tidpo train` option, and the whole file builds a config.

    bf16 needs a GPU, so the check adds use_cpu (the only override)."""
    from tidpo.cli import load_yaml_config, parse_train_args

    raw = load_yaml_config(str(recipe))  # rejects unknown keys
    script, config, _ = parse_train_args(["--config", str(recipe), "--use_cpu", "true"])
    assert config.loss_type == "ti_dpo"
    # The paper's final objective hyper-parameters (spec section 6) in every recipe.
    assert (config.beta, config.tdpo_alpha, config.gamma, config.lambda_importance) == (0.1, 0.5, 0.1, 0.7)
    assert config.max_length == 256 and config.max_prompt_length == 128
    assert config.bf16 and config.activation_checkpointing
    assert script.train_data == "trl-lib/ultrafeedback_binarized"
    assert config.warmup_steps == 150 and config.max_grad_norm == 10.0 and config.num_train_epochs == 1
    if raw.get("use_peft"):
        assert script.use_peft and script.lora_r > 0
    else:  # full fine-tuning: the authors' optimiser settings
        assert config.learning_rate == 5e-6 and config.optim == "rmsprop"


def test_recipes_exist():
    names = {p.name for p in RECIPES}
    assert "llama31-8b-ultrafeedback.yaml" in names
    assert any("24gb" in n for n in names)


def test_accelerate_configs_load_with_accelerate():
    from accelerate.commands.config.config_args import load_config_from_file

    kinds = {}
    for path in ACCELERATE_CONFIGS:
        cfg = load_config_from_file(str(path))
        stage = (cfg.deepspeed_config or {}).get("zero_stage")
        kinds[path.stem] = (str(cfg.distributed_type), stage, (cfg.fsdp_config or {}).get("fsdp_version"))
    assert kinds["ddp"][0].endswith("MULTI_GPU")
    assert kinds["zero2"][:2] == ("DistributedType.DEEPSPEED", 2)
    assert kinds["zero3"][:2] == ("DistributedType.DEEPSPEED", 3)
    assert kinds["fsdp"][0].endswith("FSDP") and kinds["fsdp"][2] == 2


@pytest.mark.parametrize("bound", [True, False])
def test_outputs_in_forward_dtype_skips_accelerates_float32_copy_and_restores_it(tiny_tok, bound):
    # accelerate wraps a prepared model's forward under bf16 as convert_outputs_to_fp32(autocast(forward)),
    # as a bound method (models) or a plain function (other callables); inside the block the logits keep
    # autocast's bf16, outside (and after an error inside) the wrapper is back.
    from accelerate import Accelerator

    from tidpo.models import tiny_causal_lm
    from tidpo.training.distributed import outputs_in_forward_dtype

    model = tiny_causal_lm("llama", tokenizer=tiny_tok)
    if not bound:
        # A forward without __func__ (as MS-AMP leaves it): accelerate wraps it as a plain function.
        model.forward = functools.partial(type(model).forward, model)
    ids = torch.tensor([[5, 6, 7]])
    with outputs_in_forward_dtype(model):  # not prepared: nothing to skip
        assert model(input_ids=ids).logits.dtype == torch.float32
    model = Accelerator(cpu=True, mixed_precision="bf16").prepare_model(model)
    wrapped = model.forward
    assert hasattr(wrapped, "__func__") == bound
    assert model(input_ids=ids).logits.dtype == torch.float32
    with outputs_in_forward_dtype(model):
        assert model(input_ids=ids).logits.dtype == torch.bfloat16
        with outputs_in_forward_dtype(model):  # nested: the inner block finds no wrapper
            assert model(input_ids=ids).logits.dtype == torch.bfloat16
        assert model(input_ids=ids).logits.dtype == torch.bfloat16
    assert model.forward == wrapped and model(input_ids=ids).logits.dtype == torch.float32
    with pytest.raises(RuntimeError, match="boom"), outputs_in_forward_dtype(model):
        raise RuntimeError("boom")
    assert model.forward == wrapped
