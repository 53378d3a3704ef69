"""Evaluation: held-out reward metrics, generation quality (judges, diversity, KL), and explanations.

- ``tidpo.evaluation.evaluate``: ``evaluate``, ``run_eval``, ``format_table``, ``write_eval``;
- ``tidpo.evaluation.explain``: ``explain`` -> ``TokenImportance`` and its renderers, ``run_explain``.
"""

from tidpo.evaluation.evaluate import evaluate, format_table, mean_token_entropy, run_eval, write_eval
from tidpo.evaluation.explain import (
    TokenImportance,
    explain,
    render_html,
    render_png,
    render_terminal,
    run_explain,
)

__all__ = [
    "TokenImportance",
    "evaluate",
    "explain",
    "format_table",
    "mean_token_entropy",
    "render_html",
    "render_png",
    "render_terminal",
    "run_eval",
    "run_explain",
    "write_eval",
]
