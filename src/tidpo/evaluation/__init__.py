"""Evaluation: held-out reward metrics, generation quality (judges, diversity, KL), and explanations.

- ``tidpo.evaluation.evaluate``: ``evaluate``, ``run_eval``, ``format_table``, ``write_eval``;
- ``tidpo.evaluation.explain``: ``explain`` -> ``TokenImportance`` and its renderers, ``run_explain``.
"""

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
    "explain",
    "render_html",
    "render_png",
    "render_terminal",
    "run_explain",
]
