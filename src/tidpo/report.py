"""The run report: one self-contained HTML page showing what a TI-DPO run did.

``write_report(run_dir, ...)`` writes ``run_dir/report.html`` with, as far as the run logged them:
the loss, the implicit rewards and their margins and accuracies, the token-weight statistics
(``weights/*``), the triplet and sequential-KL terms, other logged numbers (learning rate, gradient
norm...), the evaluation curves (``eval_*``), a table of evaluation results, the run configuration,
and the token-importance pictures of a few training pairs at the start and the end of training.
Plots are matplotlib PNGs embedded as base64, so the page needs no other file.

``ReportCallback`` plugs this into a ``transformers.Trainer``: it takes the importance snapshots when
training begins and ends and writes the report into ``args.output_dir``.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from tidpo.evaluation.explain import TokenImportance, explain, page, render_html_fragment
from tidpo.tokenops import NonFiniteError

__all__ = ["ReportCallback", "find_log_history", "write_report"]

# Curves drawn together, in this order: (section title, metric names). Metrics not listed here are
# still drawn, under "Other logged metrics".
_PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Loss", ("loss",)),
    ("Implicit rewards", ("rewards/chosen", "rewards/rejected", "rewards/margins")),
    ("Reward accuracy", ("rewards/accuracies",)),
    ("Token-weight statistics", ("weights/mean", "weights/std", "weights/max", "weights/entropy")),
    ("Triplet loss", ("triplet/loss", "triplet/dist_pos", "triplet/dist_neg")),
    ("Sequential KL", ("kl/chosen", "kl/rejected")),
    ("Log-probabilities", ("logps/chosen", "logps/rejected")),
)
# Bookkeeping numbers that are not training curves.
_SKIP = re.compile(
    r"^(step|epoch|total_flos|train_runtime|train_samples_per_second|train_steps_per_second)$|_runtime$|_per_second$"
)
_CONFIG_FILES = ("tidpo_config.json", "training_config.json", "run_config.json", "config.yaml", "train.yaml")

_CSS = """
h2 { margin-top: 2em; border-bottom: 1px solid #ddd; padding-bottom: .2em; }
img.plot { max-width: 100%; display: block; margin: .5em 0; }
table.metrics { border-collapse: collapse; font-size: 90%; }
table.metrics td, table.metrics th { padding: .2em .9em; border-bottom: 1px solid #e3e3e3; text-align: left; }
table.metrics td.num { text-align: right; font-variant-numeric: tabular-nums; }
.pair { border: 1px solid #e3e3e3; border-radius: 6px; padding: .3em 1em 1em; margin: 1em 0; }
.pair h3 { margin: .6em 0 .2em; font-size: 100%; }
.muted { color: #777; }
pre.config { background: #f6f6f6; padding: .8em; overflow-x: auto; font-size: 85%; }
"""


# --------------------------------------------------------------------------- inputs


def find_log_history(run_dir: str | Path) -> list[dict[str, Any]] | None:
    """The ``log_history`` of ``run_dir/trainer_state.json``, else of the latest
    ``checkpoint-*/trainer_state.json`` (highest step); None when there is neither."""
    run_dir = Path(run_dir)
    candidates = [run_dir / "trainer_state.json"]
    checkpoints = []
    for ckpt in run_dir.glob("checkpoint-*"):
        match = re.fullmatch(r"checkpoint-(\d+)", ckpt.name)
        if match and (ckpt / "trainer_state.json").exists():
            checkpoints.append((int(match.group(1)), ckpt / "trainer_state.json"))
    candidates += [path for _, path in sorted(checkpoints, reverse=True)]
    for path in candidates:
        if path.exists():
            try:
                state = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: not valid JSON ({exc})") from exc
            history = state.get("log_history") if isinstance(state, dict) else None
            if not isinstance(history, list):
                raise ValueError(
                    f"{path}: has no 'log_history' list (is it a transformers trainer_state.json?)"
                )
            return history
    return None


def _series(log_history: Sequence[Mapping[str, Any]]) -> dict[str, tuple[list[float], list[float]]]:
    """metric -> (steps, values), finite numbers only, in logging order."""
    out: dict[str, tuple[list[float], list[float]]] = {}
    for i, entry in enumerate(log_history):
        if not isinstance(entry, Mapping):
            raise ValueError(f"log_history entry {i} is {type(entry).__name__}, expected a dict")
        step = entry.get("step", i)
        for key, value in entry.items():
            if _SKIP.search(key) or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if key == "train_loss":  # the run's average, logged once at the end: not a curve point
                continue
            if math.isfinite(value):
                steps, values = out.setdefault(key, ([], []))
                steps.append(float(step))
                values.append(float(value))
    return out


# --------------------------------------------------------------------------- plots


def _png(fig: Any) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _img(b64: str, alt: str) -> str:
    return f"<img class='plot' alt='{html.escape(alt, quote=True)}' src='data:image/png;base64,{b64}'>"


def _eval_prefixes(series: Mapping[str, Any]) -> list[str]:
    """``eval_`` and, for a dict of eval sets, each ``eval_<name>_`` (read off their ``..._loss`` keys)."""
    found = {k[: -len("loss")] for k in series if k.startswith("eval_") and k.endswith("_loss")}
    return sorted(found | {"eval_"}, key=lambda p: (p != "eval_", p))


def _plot_panel(
    series: Mapping[str, tuple[list[float], list[float]]], names: Sequence[str], title: str
) -> str:
    """One chart per call: the named metrics as lines; with train and eval versions overlaid.

    Metrics with very different scales (weight statistics) get small multiples instead.
    """
    prefixes = _eval_prefixes(series)
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    present = [n for n in names if any(k in series for k in (n, *(p + n for p in prefixes)))]
    separate = len(present) > 3 or title == "Token-weight statistics"
    cols = min(len(present), 4) if separate else 1
    fig, axes = plt.subplots(1, cols, figsize=(3.2 * cols if separate else 7.5, 3.0), squeeze=False)
    try:
        for k, name in enumerate(present):
            ax = axes[0][k if separate else 0]
            color = None  # an eval curve takes its train curve's colour, dashed
            styles = ["-", *(["--", ":", "-."][i % 3] for i in range(len(prefixes)))]
            for key, style in zip((name, *(p + name for p in prefixes)), styles, strict=True):
                if key in series:
                    steps, values = series[key]
                    label = key if not separate else (key[: -len(name)].rstrip("_") or "train")
                    (line,) = ax.plot(
                        steps,
                        values,
                        style,
                        color=color,
                        marker="o" if len(steps) < 30 else None,
                        markersize=3,
                        label=label,
                    )
                    color = line.get_color()
            if separate:
                ax.set_title(name, fontsize=10)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        if not separate:
            axes[0][0].set_title(title, fontsize=11)
        for ax in axes[0]:
            if len(ax.get_lines()) > 1:
                ax.legend(fontsize=8)
        fig.tight_layout()
        return _img(_png(fig), f"{title}: {', '.join(present)}")
    finally:
        plt.close(fig)


def _small_multiples(
    series: Mapping[str, tuple[list[float], list[float]]], names: Sequence[str], alt: str
) -> str:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    cols = min(4, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    try:
        for k, ax in enumerate(ax for row in axes for ax in row):
            if k >= len(names):
                ax.axis("off")
                continue
            steps, values = series[names[k]]
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3)
            ax.set_title(names[k], fontsize=9)
            ax.tick_params(labelsize=8)
            ax.grid(alpha=0.3)
        fig.tight_layout()
        return _img(_png(fig), alt)
    finally:
        plt.close(fig)


# --------------------------------------------------------------------------- sections


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def _summary(
    log_history: Sequence[Mapping[str, Any]], series: Mapping[str, Any], resumed_at: int | None = None
) -> str:
    if not log_history:
        return "<p class='muted'>No training log found.</p>"
    last_step = max(
        (e.get("step", 0) for e in log_history if isinstance(e.get("step"), int | float)), default=0
    )
    rows = [("logged entries", len(log_history)), ("last step", last_step)]
    final = next((e for e in reversed(log_history) if "train_runtime" in e), None)
    if final:
        # transformers averages and times the steps of the last train() call only: after a resume, the
        # steps since it, which the labels say (the loss curve spans the whole run).
        since = ""
        if resumed_at:
            first, last = resumed_at + 1, final.get("step", "?")
            since = (
                f" (step {last}, since the resume)"
                if first == last
                else f" (steps {first}-{last}, since the resume)"
            )
        rows += [(k + since, final[k]) for k in ("train_loss", "train_runtime") if k in final]
        rows += [("epoch", final["epoch"])] if "epoch" in final else []
    for key in ("loss", "rewards/accuracies", "rewards/margins", "weights/max", "triplet/loss"):
        if key in series:
            first, last = series[key][1][0], series[key][1][-1]
            rows.append((f"{key} (first → last)", f"{first:.4g} → {last:.4g}"))
    body = "".join(f"<tr><th>{html.escape(str(k))}</th><td class='num'>{_fmt(v)}</td></tr>" for k, v in rows)
    return f"<table class='metrics'>{body}</table>"


def _eval_table(results: Mapping[str, Any]) -> str:
    from tidpo.evaluation.evaluate import _NOTES

    numeric = {k: v for k, v in results.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    if not numeric:
        return "<p class='muted'>The evaluation results hold no numbers.</p>"
    body = "".join(
        f"<tr><td>{html.escape(k)}</td><td class='num'>{_fmt(float(v))}</td>"
        f"<td class='muted'>{html.escape(_NOTES.get(k, ''))}</td></tr>"
        for k, v in numeric.items()
    )
    return f"<table class='metrics'><tr><th>metric</th><th>value</th><th></th></tr>{body}</table>"


def _config_section(run_dir: Path, config: Mapping[str, Any] | None) -> str:
    blocks = []
    if config:
        shown = json.dumps(dict(config), indent=2, sort_keys=True, default=str)
        blocks.append(f"<h3>training arguments</h3><pre class='config'>{html.escape(shown)}</pre>")
    for name in _CONFIG_FILES:
        path = run_dir / name
        if path.exists():
            blocks.append(
                f"<h3>{html.escape(name)}</h3><pre class='config'>{html.escape(path.read_text(encoding='utf-8'))}</pre>"
            )
    model_config = run_dir / "config.json"
    if model_config.exists():
        blocks.append(
            f"<details><summary>model config.json</summary><pre class='config'>"
            f"{html.escape(model_config.read_text(encoding='utf-8'))}</pre></details>"
        )
    return "".join(blocks)


def _importance_section(snapshots: Mapping[str, Sequence[TokenImportance]]) -> str:
    """Pair by pair, each snapshot (e.g. start, end) of its token weights one under the other."""
    labels = list(snapshots)
    n_pairs = max((len(v) for v in snapshots.values()), default=0)
    parts = [
        "<p>Token weights of the chosen responses of a few training pairs under the policy at each "
        "moment (darker = heavier; hover a token for weight / attribution / prior).</p>"
    ]
    for i in range(n_pairs):
        pair = [f"<div class='pair'><h3>pair {i + 1}</h3>"]
        for j, label in enumerate(labels):
            if i < len(snapshots[label]):
                ti = snapshots[label][i]
                pair.append(f"<h3>{html.escape(label)}</h3>")
                pair.append(render_html_fragment(ti, show_prompt=(j == 0), top_k=5))
        pair.append("</div>")
        parts.append("".join(pair))
    return "\n".join(parts)


def write_report(
    run_dir: str | Path,
    log_history: list[dict] | None = None,
    eval_results: dict | None = None,
    importance_snapshots: dict[str, list[TokenImportance]] | None = None,
    *,
    config: Mapping[str, Any] | None = None,
    title: str | None = None,
    resumed_at: int | None = None,
) -> Path:
    """Write ``run_dir/report.html`` and return its path.

    Args:
        run_dir: the run's output folder (created if missing).
        log_history: the trainer's ``state.log_history``; default: read from ``run_dir/trainer_state.json``
            or the latest ``checkpoint-*/trainer_state.json``.
        eval_results: metrics from ``tidpo.evaluation.evaluate``; default: ``run_dir/eval.json`` if present
            (``tidpo eval --out run_dir``; the report says which file and when it was written). ``{}``:
            no evaluation section, whatever the folder holds.
        importance_snapshots: e.g. ``{"start of training": [...], "end of training": [...]}``, the
            explanations of the same pairs at different moments.
        config: the training arguments to show (``run_dir/tidpo_config.json`` etc. are shown too).
        resumed_at: the step the last ``train()`` call resumed from, if any: its ``train_loss`` and
            ``train_runtime`` cover only the steps after it, which the summary says.

    Raises:
        FileNotFoundError: when there is nothing to report (no log, no eval results, no snapshots).
    """
    run_dir = Path(run_dir)
    if log_history is None:
        log_history = find_log_history(run_dir)
    eval_source = ""
    if eval_results is None and (run_dir / "eval.json").exists():
        eval_file = run_dir / "eval.json"
        eval_results = json.loads(eval_file.read_text(encoding="utf-8"))
        # Not necessarily this run's last model: a `tidpo eval --out` of whatever model was asked for.
        written = time.strftime("%Y-%m-%d %H:%M", time.localtime(eval_file.stat().st_mtime))
        eval_source = f"From {eval_file.name} (written {written} by tidpo eval), not from the training run."
    if log_history is None and not eval_results and not importance_snapshots:
        raise FileNotFoundError(
            f"Nothing to report in {run_dir}: no trainer_state.json (nor checkpoint-*/trainer_state.json), "
            "no eval.json, and no log history, eval results or importance snapshots were passed"
        )
    log_history = log_history or []
    series = _series(log_history)

    sections = [f"<p class='muted'>run: {html.escape(str(run_dir.resolve()))}</p>", "<h2>Summary</h2>"]
    sections.append(_summary(log_history, series, resumed_at))
    drawn: set[str] = set()
    prefixes = _eval_prefixes(series)  # eval_, and eval_<name>_ per named eval set
    for panel_title, names in _PANELS:
        variants = [k for n in names for k in (n, *(p + n for p in prefixes))]
        shown = [k for k in variants if k in series]
        if shown:
            sections.append(f"<h2>{html.escape(panel_title)}</h2>")
            dashed = " (eval: dashed or dotted)" if any(k.startswith("eval_") for k in shown) else ""
            sections.append(f"<p class='muted'>{', '.join(html.escape(k) for k in shown)}{dashed}</p>")
            sections.append(_plot_panel(series, names, panel_title))
            drawn.update(variants)
    eval_names = [k for k in series if k.startswith("eval_") and k not in drawn]
    other = [k for k in series if not k.startswith("eval_") and k not in drawn]
    if other:
        sections.append("<h2>Other logged metrics</h2>")
        sections.append(f"<p class='muted'>{', '.join(html.escape(n) for n in other)}</p>")
        sections.append(_small_multiples(series, other, "other metrics: " + ", ".join(other)))
    if eval_names:
        sections.append("<h2>Evaluation curves</h2>")
        sections.append(f"<p class='muted'>{', '.join(html.escape(n) for n in eval_names)}</p>")
        sections.append(_small_multiples(series, eval_names, "evaluation metrics: " + ", ".join(eval_names)))
    if eval_results:
        sections.append("<h2>Evaluation</h2>")
        if eval_source:
            sections.append(f"<p class='muted'>{html.escape(eval_source)}</p>")
        sections.append(_eval_table(eval_results))
    if importance_snapshots:
        sections.append("<h2>Token importance</h2>")
        note = _importance_note(config or {})
        if note:
            sections.append(f"<p class='muted'>{html.escape(note, quote=False)}</p>")
        sections.append(_importance_section(importance_snapshots))
    config_html = _config_section(run_dir, config)
    if config_html:
        sections.append("<h2>Configuration</h2>")
        sections.append(config_html)

    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "report.html"
    path.write_text(
        page(title or f"TI-DPO run report — {run_dir.name}", "\n".join(sections), _CSS), encoding="utf-8"
    )
    return path


def _importance_note(config: Mapping[str, Any]) -> str | None:
    """Where the pictures (TI-DPO's attribution weights) are not the weights the run trained with, say so."""
    loss_type, mode = config.get("loss_type", "ti_dpo"), config.get("importance_mode", "hybrid")
    if loss_type != "ti_dpo":
        used = f"loss_type={loss_type!r}, which weights every token 1"
    elif mode in ("hybrid", "prior", "gradient"):
        return None
    else:
        used = f"importance_mode={mode!r}"
    return f"The pictures show TI-DPO's hybrid attribution weights, for inspection: this run trained with {used}."


# --------------------------------------------------------------------------- trainer callback


def _prompt_and_chosen(row: Mapping[str, Any], index: int) -> tuple[Any, Any]:
    if "chosen" not in row:
        raise KeyError(f"ReportCallback: pair {index} has no 'chosen' (keys: {sorted(row)})")
    if "prompt" in row:
        return row["prompt"], row["chosen"]
    if "rejected" not in row:
        raise KeyError(f"ReportCallback: pair {index} has neither 'prompt' nor 'rejected' to extract it from")
    from tidpo.data import split_implicit_prompt

    prompt, chosen, _ = split_implicit_prompt(row["chosen"], row["rejected"])
    return prompt, chosen


class ReportCallback(TrainerCallback):
    """Take token-importance snapshots of a few training pairs at the start and end of training and
    write ``report.html`` into ``args.output_dir`` when training ends.

    Args:
        pairs: a few raw rows (``prompt`` + ``chosen``; implicit-prompt rows also work).
        tokenizer: the policy's tokenizer (default: the trainer's ``processing_class``).
        lambda_importance, sigma_div, span: as in training (see ``tidpo.evaluation.explain``).
        eval_results: optional evaluation metrics to include (a training run's report never shows an
            ``eval.json`` left in the output folder by an earlier ``tidpo eval``).
        write_on_train_end: ``False`` leaves the end snapshot and the report to a later :meth:`finish`
            call (``tidpo train`` makes it after saving the model and running the final evaluation, so
            a failing snapshot cannot cost the saved model, and the report holds the final eval).

    The snapshots are computed on every process (under ZeRO-3/FSDP a forward needs all ranks); only
    the main process writes the report.
    """

    def __init__(
        self,
        pairs: Sequence[Mapping[str, Any]],
        tokenizer: Any = None,
        lambda_importance: float = 0.7,
        sigma_div: float = 4.0,
        span: str = "response",
        eval_results: dict | None = None,
        write_on_train_end: bool = True,
    ) -> None:
        self.pairs = [_prompt_and_chosen(row, i) for i, row in enumerate(pairs)]
        self.tokenizer = tokenizer
        self.lambda_importance = lambda_importance
        self.sigma_div = sigma_div
        self.span = span
        self.eval_results = eval_results
        self.write_on_train_end = write_on_train_end
        self.snapshots: dict[str, list[TokenImportance]] = {}
        self.start_step = 0

    def _snapshot(self, label: str, model: Any, tokenizer: Any) -> None:
        tokenizer = self.tokenizer or tokenizer
        if model is None or tokenizer is None:
            raise ValueError(
                "ReportCallback: the trainer passed no model or tokenizer to the callback; give tokenizer=..."
            )
        shots = []
        for i, (prompt, chosen) in enumerate(self.pairs):
            try:
                shots.append(
                    explain(
                        model,
                        tokenizer,
                        prompt,
                        chosen,
                        lambda_importance=self.lambda_importance,
                        sigma_div=self.sigma_div,
                        span=self.span,
                    )
                )
            except NonFiniteError as err:
                raise NonFiniteError(
                    f"report.html: the token-importance snapshot '{label}' of report pair {i} is not finite "
                    f"(the policy's gradients hold NaN/Inf; saved checkpoints are untouched): {err}",
                    err.batch_rows,
                ) from err
        self.snapshots[label] = shots

    def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[override]
        """Snapshot the token weights under the initial policy (or the one a resumed run starts from)."""
        self.start_step = state.global_step
        label = "start of training" if state.global_step == 0 else f"resumed at step {state.global_step}"
        self._snapshot(label, kwargs.get("model"), kwargs.get("processing_class"))

    def on_train_end(self, args, state, control, **kwargs):  # type: ignore[override]
        """Snapshot again under the trained policy and write the report (main process only)."""
        if self.write_on_train_end:
            self.finish(args, state, kwargs.get("model"), kwargs.get("processing_class"))

    def finish(self, args: Any, state: Any, model: Any, tokenizer: Any = None) -> None:
        """Take the end-of-training snapshot and write the report (every process must call it)."""
        self._snapshot("end of training", model, tokenizer)
        if state.is_world_process_zero:
            write_report(
                args.output_dir,
                log_history=list(state.log_history),
                eval_results=self.eval_results if self.eval_results is not None else {},
                importance_snapshots=self.snapshots,
                config=args.to_dict(),
                resumed_at=self.start_step or None,
            )
