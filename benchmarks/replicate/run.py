"""Small-scale replication of TI-DPO's claims on the built-in tasks (not part of CI).

Every run trains the embedded SmolLM2-135M-Instruct with LoRA from the same start on pairs built by
`tidpo data build` from the model's own samples and a programmatic judge, then evaluates it on the
held-out test prompts. Runs are resumable: each finished run writes `runs/<name>/result.json` and is
skipped next time. `summarize.py` turns the results into `tables.md` and plots, which RESULTS.md quotes.

    python benchmarks/replicate/run.py                 # everything (data, main grid, label noise)
    python benchmarks/replicate/run.py --only main --tasks instructions --seeds 0
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent
DATA = ROOT / "data"
RUNS = ROOT / "runs"

# The methods compared (spec section 8): the baselines and TI-DPO's ablations, all on one pipeline.
METHODS: dict[str, dict] = {
    "dpo": {"loss_type": "dpo"},
    "tdpo2": {"loss_type": "tdpo2", "tdpo_alpha": 0.5},
    "ti_dpo": {"loss_type": "ti_dpo"},
    "no_triplet": {"loss_type": "ti_dpo", "gamma": 0.0},
    "uniform": {"loss_type": "ti_dpo", "importance_mode": "uniform"},
    "no_prior": {"loss_type": "ti_dpo", "importance_mode": "gradient"},
    "prior_only": {"loss_type": "ti_dpo", "importance_mode": "prior"},
}
JUDGES = {"instructions": "instructions", "sentiment": "sentiment"}
_ASSETS = ROOT.parents[1] / "src" / "tidpo" / "assets" / "data"
BUNDLED = {"instructions": _ASSETS / "quickstart.jsonl", "sentiment": _ASSETS / "sentiment_quickstart.jsonl"}


@dataclass(frozen=True)
class Budget:
    """One budget for every run, so methods are compared at equal cost in data and steps."""

    samples: int = 4  # responses per prompt when building pairs
    max_new_tokens: int = 48  # response length when building pairs (as the bundled quickstart data)
    max_steps: int = 12  # sized so ~35 runs fit in about an hour on a 2-core CPU
    batch_size: int = 4
    learning_rate: float = 2e-4
    lora_r: int = 16
    lora_alpha: int = 32
    max_length: int = 160
    max_prompt_length: int = 96
    anchor_max_new_tokens: int = 24
    eval_prompts: int = 24
    eval_new_tokens: int = 40
    eval_seed: int = 1234
    bf16: bool = True


@dataclass(frozen=True)
class Run:
    task: str
    method: str
    seed: int
    noise: float = 0.0

    @property
    def name(self) -> str:
        return f"{self.task}/{self.method}/noise{round(self.noise * 100):02d}/seed{self.seed}"


def experiments(tasks: list[str], seeds: list[int], only: str | None) -> list[Run]:
    """The grid, most important first, so a run cut short by time still answers the main questions:
    every method on the instructions task (seeds outermost), then the 40% label-noise point, then the
    sentiment task, then the remaining noise levels."""
    main = only in (None, "main")
    noise = only in (None, "noise")
    runs: list[Run] = []
    if main and "instructions" in tasks:
        runs += [Run("instructions", m, seed) for seed in seeds for m in METHODS]
    if noise:
        # Paper Table B8: DPO vs TI-DPO as a growing fraction of training labels is flipped.
        runs += [Run("instructions", m, seed, 0.4) for seed in seeds for m in ("dpo", "ti_dpo")]
    if main and "sentiment" in tasks:
        # The second task compares the main methods only, to keep the budget near an hour or two.
        runs += [Run("sentiment", m, seed) for seed in seeds for m in ("dpo", "ti_dpo", "tdpo2")]
    if noise:
        for level in (0.2, 0.1):
            runs += [Run("instructions", m, seed, level) for seed in seeds for m in ("dpo", "ti_dpo")]
    return runs


# ----------------------------------------------------------------------------------------- data


def build_data(task: str, budget: Budget) -> tuple[Path, Path]:
    """Train and test pairs for a task, built from the embedded model's own samples.

    The training pairs are the bundled quickstart files (made by `tidpo data build` on the task's
    train prompts with this budget's samples / max_new_tokens / seed 0); the test pairs are built here
    from the task's held-out test prompts (seed 1), once.
    """
    from tidpo.tasks import get_task
    from tidpo.tasks.build import build_pairs

    DATA.mkdir(parents=True, exist_ok=True)
    train = BUNDLED[task]
    test = DATA / f"{task}_test.jsonl"
    stats = build_pairs(
        task,
        prompts=get_task(task).test_prompts,
        out=test,
        seed=1,
        samples=budget.samples,
        max_new_tokens=budget.max_new_tokens,
        batch_size=32,
    )
    print(f"[data] {task}: train {train.name}, test {stats['pairs']} pairs", flush=True)
    return train, test


def noisy_copy(train: Path, task: str, noise: float, seed: int) -> Path:
    """The clean training pairs with exactly round(noise * n) labels flipped (seeded per seed)."""
    from tidpo.tasks.build import build_pairs, ties_path

    out = DATA / f"{task}_train_noise{round(noise * 100):02d}_seed{seed}.jsonl"
    if not out.exists():
        shutil.copyfile(train, out)
        if ties_path(train).exists():  # tied prompts are recorded there; without it they would be resampled
            shutil.copyfile(ties_path(train), ties_path(out))
    # Every prompt is already in `out`, so this only (idempotently) applies the flips.
    build_pairs(task, out=out, flip_fraction=noise, seed=seed, progress=False)
    return out


# ----------------------------------------------------------------------------------------- runs


def run_one(run: Run, train: Path, test: Path, budget: Budget) -> dict:
    import torch
    from peft import LoraConfig

    from tidpo import TIDPOConfig, TIDPOTrainer
    from tidpo.data import load_preference_dataset
    from tidpo.evaluation.evaluate import evaluate
    from tidpo.models import load_causal_lm, load_tokenizer

    out = RUNS / run.name
    result_file = out / "result.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(run.seed)
    tokenizer = load_tokenizer("smollm2-135m")
    model = load_causal_lm("smollm2-135m", dtype=torch.float32)
    train_data = load_preference_dataset(str(train))
    method = METHODS[run.method]
    uses_anchors = method["loss_type"] == "ti_dpo" and method.get("gamma", 0.1) > 0
    triplet = {"anchor_max_new_tokens": budget.anchor_max_new_tokens} if uses_anchors else {}
    args = TIDPOConfig(
        output_dir=str(out / "train"),
        use_cpu=True,
        bf16=budget.bf16,
        seed=run.seed,
        max_steps=budget.max_steps,
        per_device_train_batch_size=budget.batch_size,
        learning_rate=budget.learning_rate,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        max_length=budget.max_length,
        max_prompt_length=budget.max_prompt_length,
        **method,
        **triplet,
    )
    lora = LoraConfig(
        r=budget.lora_r, lora_alpha=budget.lora_alpha, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    trainer = TIDPOTrainer(
        model, args=args, train_dataset=train_data, processing_class=tokenizer, peft_config=lora
    )
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start
    history = [h for h in trainer.state.log_history if "loss" in h]

    start = time.perf_counter()
    trainer.model.eval()
    results = evaluate(
        trainer.model,
        None,  # LoRA: the reference is the same model with adapters disabled
        tokenizer,
        str(test),
        judge=JUDGES[run.task],
        beta=0.1,
        max_new_tokens=budget.eval_new_tokens,
        num_prompts=budget.eval_prompts,
        batch_size=16,
        seed=budget.eval_seed,
        max_length=budget.max_length,
        max_prompt_length=budget.max_prompt_length,
        return_samples=True,
    )
    eval_seconds = time.perf_counter() - start
    samples = results.pop("samples")
    if run.task == "instructions":
        # Constraint satisfaction: the share of prompts whose every constraint is met.
        results["constraints/all_met"] = statistics.mean(s["policy_score"] == 1.0 for s in samples)
        results["constraints/all_met_reference"] = statistics.mean(
            s["reference_score"] == 1.0 for s in samples
        )
    result = {
        "run": asdict(run),
        "budget": asdict(budget),
        "method": METHODS[run.method],
        "train_seconds": train_seconds,
        "eval_seconds": eval_seconds,
        "steps": trainer.state.global_step,
        "history": [
            {k: h[k] for k in h if k in ("step", "epoch", "loss", "rewards/accuracies", "rewards/margins")}
            for h in history
        ],
        "eval": results,
    }
    (out / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    tmp = result_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(result_file)  # a result file exists only for a finished run
    shutil.rmtree(out / "train", ignore_errors=True)  # LoRA weights are not needed for the tables
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--tasks", nargs="+", default=["instructions", "sentiment"], choices=list(JUDGES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--only", choices=["main", "noise"], default=None)
    parser.add_argument("--methods", nargs="+", default=None, choices=list(METHODS), help="subset of methods")
    parser.add_argument(
        "--shard", default="0/1", help="K/N: run every N-th run starting at K (parallel shards)"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    a = parser.parse_args(argv)
    if a.threads:
        import torch

        # One thread per process and one process per core: oversubscribed torch threads slow down
        # many-fold on a busy 2-core machine.
        torch.set_num_threads(a.threads)
    shard, n_shards = (int(x) for x in a.shard.split("/"))
    budget = Budget()
    runs = [r for r in experiments(a.tasks, a.seeds, a.only) if a.methods is None or r.method in a.methods]
    runs = runs[shard::n_shards]
    data = {task: build_data(task, budget) for task in sorted({r.task for r in runs})}
    print(f"{len(runs)} runs; finished ones are skipped", flush=True)
    for i, run in enumerate(runs, 1):
        train, test = data[run.task]
        if run.noise > 0:
            train = noisy_copy(train, run.task, run.noise, run.seed)
        start = time.perf_counter()
        result = run_one(run, train, test, budget)
        ev = result["eval"]
        print(
            f"[{i}/{len(runs)}] {run.name}: judge {ev.get('judge/mean', float('nan')):.3f} "
            f"win {ev.get('judge/win_rate', float('nan')):.3f} acc {ev['rewards/accuracies']:.3f} "
            f"kl {ev['kl']:.3f} ({time.perf_counter() - start:.0f} s)",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
