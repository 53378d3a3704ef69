"""Turn benchmarks/replicate/runs/**/result.json into tables (mean ± sd over seeds) and plots.

    python benchmarks/replicate/summarize.py          # prints the tables, writes tables.md + PNGs

RESULTS.md quotes these tables beside the paper's numbers; this script writes `tables.md`.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent
RUNS = ROOT / "runs"
METHOD_ORDER = ["dpo", "tdpo2", "ti_dpo", "no_triplet", "uniform", "no_prior", "prior_only"]


def load_results() -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(RUNS.glob("**/result.json"))]


def mean_sd(values: list[float]) -> str:
    if not values:
        return "–"
    mean = statistics.mean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.3f} ± {sd:.3f}"


def grouped(results: list[dict], task: str, noise: float) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in results:
        if r["run"]["task"] == task and abs(r["run"]["noise"] - noise) < 1e-9:
            groups[r["run"]["method"]].append(r)
    return groups


def table(groups: dict[str, list[dict]], columns: list[tuple[str, str]]) -> str:
    header = "| method | seeds | " + " | ".join(title for _, title in columns) + " |"
    lines = [header, "|" + "---|" * (len(columns) + 2)]
    for method in [m for m in METHOD_ORDER if m in groups]:
        runs = groups[method]
        cells = [mean_sd([r["eval"][key] for r in runs if key in r["eval"]]) for key, _ in columns]
        lines.append(f"| {method} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


MAIN_COLUMNS = {
    "instructions": [
        ("judge/mean", "constraints met (judge)"),
        ("constraints/all_met", "all constraints met"),
        ("judge/win_rate", "win rate vs ref"),
        ("rewards/accuracies", "pref. accuracy"),
        ("kl", "KL to ref"),
    ],
    "sentiment": [
        ("judge/mean", "sentiment (judge)"),
        ("judge/win_rate", "win rate vs ref"),
        ("rewards/accuracies", "pref. accuracy"),
        ("kl", "KL to ref"),
    ],
}
DIVERSITY_COLUMNS = [
    ("diversity/self_bleu", "Self-BLEU ↓"),
    ("diversity/distinct_2", "Distinct-2 ↑"),
    ("diversity/distinct_4", "Distinct-4 ↑"),
    ("diversity/entropy", "entropy ↑"),
]


def noise_table(results: list[dict]) -> str:
    levels = sorted({r["run"]["noise"] for r in results if r["run"]["task"] == "instructions"})
    lines = [
        "| method | " + " | ".join(f"{round(n * 100)}% flipped" for n in levels) + " |",
        "|---|" + "---|" * len(levels),
    ]
    for method in ("dpo", "ti_dpo"):
        cells = []
        for noise in levels:
            runs = grouped(results, "instructions", noise).get(method, [])
            cells.append(
                f"{mean_sd([r['eval']['judge/mean'] for r in runs])} (n={len(runs)})" if runs else "–"
            )
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def loss_curves(results: list[dict], task: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for method, runs in sorted(grouped(results, task, 0.0).items(), key=lambda kv: METHOD_ORDER.index(kv[0])):
        steps = sorted({h["step"] for r in runs for h in r["history"]})
        means = [
            statistics.mean(h["loss"] for r in runs for h in r["history"] if h["step"] == s) for s in steps
        ]
        ax.plot(steps, means, label=method, linewidth=1.5 if method in ("dpo", "ti_dpo") else 0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (mean over seeds)")
    ax.set_title(f"{task}: training loss")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def epoch_losses(results: list[dict], task: str) -> str:
    """Mean training loss over the first and last quarter of training (Table B10's shape)."""
    lines = ["| method | loss, first quarter | loss, last quarter |", "|---|---|---|"]
    groups = grouped(results, task, 0.0)
    for method in [m for m in METHOD_ORDER if m in groups]:
        first, last = [], []
        for r in groups[method]:
            losses = [h["loss"] for h in r["history"]]
            q = max(1, len(losses) // 4)
            first.append(statistics.mean(losses[:q]))
            last.append(statistics.mean(losses[-q:]))
        lines.append(f"| {method} | {mean_sd(first)} | {mean_sd(last)} |")
    return "\n".join(lines)


def main() -> int:
    import argparse

    # No options; a parser so that --help describes the script instead of rewriting its outputs.
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()
    results = load_results()
    if not results:
        print(f"no results under {RUNS}; run benchmarks/replicate/run.py first", file=sys.stderr)
        return 1
    parts = []
    for task in ("instructions", "sentiment"):
        groups = grouped(results, task, 0.0)
        if not groups:
            continue
        any_run = next(iter(groups.values()))[0]
        parts.append(
            f"## {task}\n\nreference model: judge mean {any_run['eval'].get('judge/reference_mean', 0):.3f}"
        )
        if task == "instructions":
            ref_all = [r["eval"]["constraints/all_met_reference"] for rs in groups.values() for r in rs]
            parts[-1] += f", all constraints met {statistics.mean(ref_all):.3f}"
        parts.append(table(groups, MAIN_COLUMNS[task]))
        parts.append(
            "Diversity of the policy's samples (paper Table B9):\n\n" + table(groups, DIVERSITY_COLUMNS)
        )
        parts.append("Training loss (paper Table B10's shape):\n\n" + epoch_losses(results, task))
        curve = ROOT / f"loss_{task}.png"
        loss_curves(results, task, curve)
        parts.append(f"![{task} loss curves]({curve.name})")
        seconds = [r["train_seconds"] / max(1, r["steps"]) for rs in groups.values() for r in rs]
        parts.append(f"median train time per step over these runs: {statistics.median(seconds):.2f} s")
    if any(r["run"]["noise"] > 0 for r in results):
        parts.append("## Label noise (instructions, judge mean; paper Table B8)\n\n" + noise_table(results))
    text = "\n\n".join(parts) + "\n"
    (ROOT / "tables.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
