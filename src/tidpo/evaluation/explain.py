"""Which tokens does TI-DPO weight? Token-importance explanations and their pictures.

``explain`` runs the paper's hybrid weighting (gradient attribution + Gaussian prior, spec §2) on one
prompt/response pair with a given model and returns a :class:`TokenImportance`. Three renderers show
it: ANSI colours for a terminal, a self-contained HTML page, and a PNG heat map. ``run_explain`` is
what ``tidpo explain`` calls.

Colours run from the lightest weight to the 95th percentile of the weights (see ``colour_range``);
the numbers shown on hover, in the tables and on the colour bar are the actual weights (mean 1 over
the span).
"""

from __future__ import annotations

import html
import json
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from tidpo.generation import model_device

__all__ = [
    "TokenImportance",
    "explain",
    "render_html",
    "render_html_fragment",
    "render_png",
    "render_terminal",
    "run_explain",
]

CMAP = "YlOrRd"  # light yellow (unimportant) -> dark red (important); readable in print and greyscale


@dataclass
class TokenImportance:
    """Per-token importance of one response (or of the whole sequence with ``span="sequence"``).

    All lists have one entry per token of the span, in reading order.

    Attributes:
        tokens: each token decoded to text (special tokens kept, e.g. the closing EOS).
        weights: the hybrid TI-DPO weights ``W`` (mean 1 over the span, spec §2 step 3).
        attribution: the raw gradient attribution ``I`` normalised to sum 1 over the span (all 0 when
            every score is 0, in which case the weights are the prior alone).
        prior: the Gaussian prior ``P`` over the span (sums to 1).
        prompt: the prompt as the model saw it (after the chat template), for display.
        token_ids: the token ids of the span.
        span, lambda_importance, sigma_div: the settings used.
    """

    tokens: list[str]
    weights: list[float]
    attribution: list[float]
    prior: list[float]
    prompt: str = ""
    token_ids: list[int] = field(default_factory=list)
    span: str = "response"
    lambda_importance: float = 0.7
    sigma_div: float = 4.0

    def __post_init__(self) -> None:
        n = len(self.tokens)
        for name in ("weights", "attribution", "prior"):
            if len(getattr(self, name)) != n:
                raise ValueError(
                    f"TokenImportance: {name} has {len(getattr(self, name))} entries for {n} tokens"
                )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (the inverse of ``TokenImportance(**d)``)."""
        return asdict(self)


# --------------------------------------------------------------------------- computing


def _decode_pieces(tokenizer: Any, context_ids: list[int], ids: list[int]) -> list[str]:
    """Decode each token of ``ids`` to the text it adds after ``context_ids`` and the tokens before it.

    Decoding tokens one by one loses word-initial spaces (SentencePiece) and splits multi-byte
    characters into replacement characters (byte-level BPE); the difference of two prefix decodes
    gives each token exactly the text it contributes. A few tokens of context are enough.
    """
    context = list(context_ids[-4:])
    pieces: list[str] = []
    prev = tokenizer.decode(context, skip_special_tokens=False)
    seq = list(context)
    for tok in ids:
        seq.append(tok)
        cur = tokenizer.decode(seq, skip_special_tokens=False)
        # Bytes not yet forming a character decode to U+FFFD at the end of the text; the token that
        # completes the character gets it (the prefix before those U+FFFD is what stays).
        done = prev.rstrip("\ufffd")
        if cur.startswith(done):
            piece = cur[len(done) :]
        else:
            # The decode of the prefix changed otherwise (e.g. a tokenizer's clean-up of spaces):
            # fall back to the token on its own rather than guess.
            piece = tokenizer.decode([tok], skip_special_tokens=False)
        pieces.append(piece.replace("\ufffd", ""))
        prev = cur
    return pieces


def _tokenize_pair(tokenizer: Any, prompt: Any, response: Any) -> tuple[list[int], list[int], str]:
    """(prompt ids, response ids, prompt text) exactly as the data layer tokenises a training row.

    The pair goes through ``tidpo.data.tokenize_preference_dataset`` (as its chosen AND rejected
    response), so the boundary merges, the EOS and the chat template match training.
    """
    from datasets import Dataset

    from tidpo.data import tokenize_preference_dataset

    if not isinstance(prompt, str) and isinstance(response, str):
        # A conversational prompt takes an assistant turn as its response.
        response = [{"role": "assistant", "content": response}]
    elif isinstance(prompt, str) and not isinstance(response, str):
        raise TypeError(
            "explain: a plain-text prompt needs a plain-text response; got a message list as the response"
        )
    rows = Dataset.from_list([{"prompt": prompt, "chosen": response, "rejected": response}])
    with warnings.catch_warnings():
        # chosen == rejected is how one response is passed in; the data layer warns about it.
        warnings.filterwarnings("ignore", message=r".*chosen identical to rejected.*")
        tokenized = tokenize_preference_dataset(
            rows, tokenizer, max_length=None, max_prompt_length=None, source="explain"
        )
    prompt_ids = list(tokenized[0]["prompt_input_ids"])
    response_ids = list(tokenized[0]["chosen_input_ids"])
    return prompt_ids, response_ids, tokenizer.decode(prompt_ids, skip_special_tokens=False)


def explain(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt: str | Sequence[Mapping[str, Any]],
    response: str | Sequence[Mapping[str, Any]],
    *,
    lambda_importance: float = 0.7,
    sigma_div: float = 4.0,
    span: str = "response",
) -> TokenImportance:
    """Compute the TI-DPO token weights of ``response`` given ``prompt`` under ``model``.

    Args:
        model: a causal LM (a PEFT-wrapped model works: the attribution goes through its input
            embeddings with the adapters active).
        tokenizer: its tokenizer; a message-list prompt is rendered with its chat template.
        prompt: a string or a list of ``{"role", "content"}`` messages.
        response: a string (or an assistant message list, for conversational data).
        lambda_importance, sigma_div: the mix and prior width of spec §2 (paper: 0.7 and 4).
        span: ``"response"`` (weights over the response tokens) or ``"sequence"`` (prompt + response,
            the authors' code's choice).

    Returns:
        A :class:`TokenImportance` over the span's tokens.
    """
    from tidpo.importance import gaussian_prior, gradient_attribution, hybrid_weights

    if span not in ("response", "sequence"):
        raise ValueError(f"explain: span must be 'response' or 'sequence', got {span!r}")
    prompt_ids, response_ids, prompt_text = _tokenize_pair(tokenizer, prompt, response)
    if not response_ids:
        raise ValueError(f"explain: the response {response!r} encodes to zero tokens")
    ids = list(prompt_ids) + list(response_ids)
    device = model_device(model)
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    attention_mask = torch.ones_like(input_ids)
    span_mask = torch.zeros_like(input_ids)
    start = len(prompt_ids) if span == "response" else 0
    span_mask[0, start:] = 1

    scores = gradient_attribution(model, input_ids, attention_mask).detach()
    weights = hybrid_weights(scores, span_mask, lambda_importance=lambda_importance, sigma_div=sigma_div)
    raw = scores[0, start:].double().cpu()
    total = float(raw.sum())
    attribution = (raw / total) if total > 0 else torch.zeros_like(raw)
    n = len(ids) - start
    prior = gaussian_prior(n, sigma_div=sigma_div)

    span_ids = ids[start:]
    return TokenImportance(
        tokens=_decode_pieces(tokenizer, ids[:start], span_ids),
        weights=[float(w) for w in weights[0, start:].detach().cpu()],
        attribution=[float(a) for a in attribution],
        prior=[float(p) for p in prior.detach().cpu()],
        prompt=prompt_text,
        token_ids=[int(i) for i in span_ids],
        span=span,
        lambda_importance=float(lambda_importance),
        sigma_div=float(sigma_div),
    )


# --------------------------------------------------------------------------- colours


def _colour(level: float) -> tuple[float, float, float]:
    """RGB in [0, 1] for a max-normalised weight in [0, 1]."""
    from matplotlib import colormaps

    r, g, b, _ = colormaps[CMAP](min(max(level, 0.0), 1.0))
    return r, g, b


def _text_colour(rgb: tuple[float, float, float]) -> tuple[float, float, float]:
    # Relative luminance: white text on dark backgrounds, black on light ones.
    lum = 0.2126 * rgb[0] + 0.7152 * rgb[1] + 0.0722 * rgb[2]
    return (0.0, 0.0, 0.0) if lum > 0.5 else (1.0, 1.0, 1.0)


def colour_range(weights: Sequence[float]) -> tuple[float, float]:
    """The weight range the colours span: from the smallest weight to the 95th percentile.

    The top 5% are clipped (drawn darkest) so that one outlier — typically the closing EOS token,
    right next to the attribution target (spec §2) — does not wash every other token out.
    """
    if not weights:
        return 0.0, 1.0
    ordered = sorted(weights)
    pos = 0.95 * (len(ordered) - 1)
    lo_i = int(pos)
    hi_i = min(lo_i + 1, len(ordered) - 1)
    high = ordered[lo_i] + (ordered[hi_i] - ordered[lo_i]) * (pos - lo_i)
    low = ordered[0]
    if high <= low:  # (almost) constant weights: one mid colour would say nothing, use [0, max]
        low, high = 0.0, max(ordered[-1], 1e-12)
    return low, high


def _levels(ti: TokenImportance) -> list[float]:
    low, high = colour_range(ti.weights)
    return [min(max((w - low) / (high - low), 0.0), 1.0) for w in ti.weights]


def _hex(rgb: tuple[float, float, float]) -> str:
    return "#" + "".join(f"{round(c * 255):02x}" for c in rgb)


def _visible(piece: str) -> str:
    """Make whitespace that would otherwise vanish visible (tabs, carriage returns, empty pieces)."""
    return piece.replace("\t", "→   ").replace("\r", "␍") if piece else "·"


# --------------------------------------------------------------------------- terminal


def render_terminal(ti: TokenImportance, *, legend: bool = True, colour: bool = True) -> str:
    """The response with each token on a 24-bit ANSI background coloured by its weight; ``colour=False``
    (a pipe, a file, ``NO_COLOR``): each token followed by its weight in brackets instead.

    Newlines inside tokens are shown as ``↵`` and then break the line.
    """
    out: list[str] = []
    if not colour:
        text = "".join(f"{_visible(piece)}[{w:.2f}]" for piece, w in zip(ti.tokens, ti.weights, strict=True))
        if legend:
            text += (
                f"\n\n{len(ti.weights)} {ti.span} tokens, each followed by its weight (mean 1); "
                f"lambda={ti.lambda_importance:g}, sigma_div={ti.sigma_div:g}"
            )
        return text
    for piece, level in zip(ti.tokens, _levels(ti), strict=True):
        bg = _colour(level)
        fg = _text_colour(bg)
        code = (
            f"\x1b[48;2;{round(bg[0] * 255)};{round(bg[1] * 255)};{round(bg[2] * 255)}m"
            f"\x1b[38;2;{round(fg[0] * 255)};{round(fg[1] * 255)};{round(fg[2] * 255)}m"
        )
        parts = _visible(piece).split("\n")
        for i, part in enumerate(parts):
            if i:
                # The background is reset before the line break so the colour does not bleed.
                out.append(f"{code}↵\x1b[0m\n")
            if part:
                out.append(f"{code}{part}\x1b[0m")
    text = "".join(out)
    if legend:
        n = len(ti.weights)
        low, high = colour_range(ti.weights)
        top = max(ti.weights, default=0.0)
        scale = "".join(
            "\x1b[48;2;{};{};{}m  \x1b[0m".format(*(round(c * 255) for c in _colour(i / 9)))
            for i in range(10)
        )
        text += (
            f"\n\n{n} {ti.span} tokens; weight {low:.2f} {scale} {high:.2f}+ (max {top:.2f}, mean 1); "
            f"lambda={ti.lambda_importance:g}, sigma_div={ti.sigma_div:g}"
        )
    return text


# --------------------------------------------------------------------------- HTML

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 60em;
       color: #222; line-height: 1.5; padding: 0 1em; }
.ti-prompt { white-space: pre-wrap; background: #f3f3f3; border-left: 4px solid #bbb; padding: .6em .8em;
             font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 90%; color: #555; }
.ti-response { white-space: pre-wrap; font-family: ui-monospace, "DejaVu Sans Mono", monospace;
               line-height: 1.9; padding: .6em .2em; word-wrap: break-word; }
.ti-tok { border-radius: 3px; padding: 1px 0; box-shadow: inset -1px 0 0 rgba(255,255,255,.6); }
.ti-tok:hover { outline: 2px solid #1f5fbf; }
.ti-nl { opacity: .55; }
.ti-legend { display: flex; align-items: center; gap: .6em; font-size: 85%; color: #555; margin: .5em 0 1.5em; }
.ti-bar { width: 16em; height: .9em; border-radius: 3px; }
.ti-top { font-size: 85%; border-collapse: collapse; }
.ti-top td, .ti-top th { padding: .15em .8em; border-bottom: 1px solid #ddd; text-align: left; }
.ti-top td.num { text-align: right; font-variant-numeric: tabular-nums; }
"""


def _gradient_css() -> str:
    stops = ", ".join(f"{_hex(_colour(i / 10))} {i * 10}%" for i in range(11))
    return f"linear-gradient(to right, {stops})"


def _escape_piece(piece: str) -> str:
    """HTML-escape a token's text; newlines get a visible ``↵`` before the real break."""
    shown = _visible(piece)
    return "<span class='ti-nl'>↵</span>\n".join(html.escape(part, quote=False) for part in shown.split("\n"))


def render_html_fragment(ti: TokenImportance, *, show_prompt: bool = True, top_k: int = 10) -> str:
    """The explanation as an HTML fragment (no page around it), for embedding in reports."""
    spans = []
    for i, (piece, level) in enumerate(zip(ti.tokens, _levels(ti), strict=True)):
        bg = _colour(level)
        fg = _text_colour(bg)
        tip = (
            f"token {i}: {piece!r}\nweight {ti.weights[i]:.3f}\n"
            f"attribution {ti.attribution[i]:.4f}\nprior {ti.prior[i]:.4f}"
        )
        spans.append(
            f"<span class='ti-tok' style='background:{_hex(bg)};color:{_hex(fg)}' "
            f"title='{html.escape(tip, quote=True)}'>{_escape_piece(piece)}</span>"
        )
    low, high = colour_range(ti.weights)
    top = max(ti.weights, default=0.0)
    parts = []
    if show_prompt and ti.prompt:
        parts.append(f"<div class='ti-prompt'>{html.escape(ti.prompt, quote=False)}</div>")
    parts.append(f"<div class='ti-response'>{''.join(spans)}</div>")
    parts.append(
        f"<div class='ti-legend'><span>weight {low:.2f}</span>"
        f"<span class='ti-bar' style='background:{_gradient_css()}'></span>"
        f"<span>{high:.2f}+ &middot; max {top:.2f} &middot; mean 1 over {len(ti.tokens)} {html.escape(ti.span)} tokens "
        f"&middot; &lambda;={ti.lambda_importance:g}, &sigma; = n/{ti.sigma_div:g}</span></div>"
    )
    if top_k and ti.tokens:
        order = sorted(range(len(ti.tokens)), key=lambda i: -ti.weights[i])[:top_k]
        rows = "".join(
            f"<tr><td>{i}</td><td><code>{html.escape(repr(ti.tokens[i]), quote=False)}</code></td>"
            f"<td class='num'>{ti.weights[i]:.3f}</td><td class='num'>{ti.attribution[i]:.4f}</td>"
            f"<td class='num'>{ti.prior[i]:.4f}</td></tr>"
            for i in order
        )
        parts.append(
            "<table class='ti-top'><tr><th>#</th><th>token</th><th>weight</th><th>attribution</th>"
            f"<th>prior</th></tr>{rows}</table>"
        )
    return "\n".join(parts)


def page(title: str, body: str, css: str = "") -> str:
    """A complete self-contained HTML page (inline CSS, no external resources)."""
    return (
        "<!DOCTYPE html>\n<html lang='en'>\n<head>\n<meta charset='utf-8'>\n"
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}{css}</style>\n</head>\n<body>\n"
        f"<h1>{html.escape(title)}</h1>\n{body}\n</body>\n</html>\n"
    )


def render_html(ti: TokenImportance, title: str = "TI-DPO token importance") -> str:
    """A self-contained HTML page: every token a span shaded by its weight; hovering shows its
    weight, attribution and prior. Whitespace is preserved and newlines are marked with ``↵``."""
    intro = (
        "<p>Token weights of the TI-DPO objective (spec §2): gradient attribution mixed with a "
        "Gaussian prior. Darker = heavier. Hover a token for its numbers.</p>"
    )
    return page(title, intro + render_html_fragment(ti))


# --------------------------------------------------------------------------- PNG


def _png_lines(tokens: Sequence[str], width: int) -> list[list[tuple[int, str]]]:
    """Lay tokens out in reading order over lines of at most ``width`` characters.

    Returns lines of (token index, displayed text). A token with a newline ends its line (shown as
    ``↵``); a token longer than a line gets a line of its own and is cut with ``…``.
    """
    lines: list[list[tuple[int, str]]] = [[]]
    used = 0
    for i, piece in enumerate(tokens):
        segments = _visible(piece).split("\n")
        for j, seg in enumerate(segments):
            newline_after = j < len(segments) - 1
            text = seg + ("↵" if newline_after else "")
            if not text:
                continue
            if len(text) > width:
                text = text[: width - 1] + "…"
            if used + len(text) > width and lines[-1]:
                lines.append([])
                used = 0
            if not lines[-1]:
                # A line never starts with the word-separating space: it is the wrap point.
                stripped = text.lstrip(" ") or text
                text = stripped
            lines[-1].append((i, text))
            used += len(text)
            if newline_after:
                lines.append([])
                used = 0
    if not lines[-1] and len(lines) > 1:
        lines.pop()
    return lines


def _prompt_lines(prompt: str, width: int, max_lines: int = 3) -> list[str]:
    """The END of the prompt (where the question is; chat templates put system text first), wrapped."""
    import textwrap

    flat = " ".join(prompt.split())
    lines = textwrap.wrap(flat, width=width, break_long_words=True) or [""]
    if len(lines) > max_lines:
        lines = lines[-max_lines:]
        lines[0] = "… " + lines[0]
    return lines


def render_png(
    ti: TokenImportance, path: str | Path, *, width: int = 72, title: str | None = None, dpi: int = 150
) -> Path:
    """Save a heat map of the tokens in reading order, wrapped over lines, with a colour bar.

    Each token is a box shaded by its weight, holding the token's text in a monospace font; the end
    of the prompt is shown above it for context.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.patches import Rectangle

    path = Path(path)
    lines = _png_lines(ti.tokens, width)
    levels = _levels(ti)
    low, high = colour_range(ti.weights)
    font_size = 11
    char_w = 0.6 * font_size / 72  # DejaVu Sans Mono advances 0.6 em per character; inches
    line_h = 1.9 * font_size / 72  # inches per text line
    prompt_font = 9
    prompt_width = int(width * font_size / prompt_font) - 10
    prompt = _prompt_lines(ti.prompt, prompt_width) if ti.prompt else []
    prompt_h = 1.6 * prompt_font / 72

    # Vertical layout in inches, top to bottom.
    margin, title_h, gap = 0.2, 0.35, 0.2
    text_h = max(len(lines), 1) * line_h
    bar_h, bar_label_h = 0.14, 0.55
    head_h = margin + title_h + (len(prompt) * prompt_h + gap if prompt else 0.0)
    fig_h = head_h + gap + text_h + gap + bar_h + bar_label_h
    fig_w = width * char_w + 2 * 0.3
    fig = plt.figure(figsize=(fig_w, fig_h), dpi=dpi)
    try:

        def y(inches_from_top: float) -> float:
            return 1.0 - inches_from_top / fig_h

        fig.text(
            0.3 / fig_w,
            y(margin + title_h / 2),
            title or "TI-DPO token importance",
            fontsize=12,
            weight="bold",
            va="center",
        )
        for k, line in enumerate(prompt):
            fig.text(
                0.3 / fig_w,
                y(margin + title_h + (k + 0.5) * prompt_h),
                ("prompt: " if k == 0 else "        ") + line,
                fontsize=prompt_font,
                family="DejaVu Sans Mono",
                color="#666",
                va="center",
            )
        ax = fig.add_axes((0.3 / fig_w, y(head_h + gap + text_h), width * char_w / fig_w, text_h / fig_h))
        ax.set_xlim(0, width)
        ax.set_ylim(max(len(lines), 1), 0)
        ax.axis("off")
        for row, line in enumerate(lines):
            x = 0.0
            for idx, text in line:
                bg = _colour(levels[idx])
                ax.add_patch(
                    Rectangle(
                        (x, row + 0.08), len(text), 0.84, facecolor=bg, edgecolor="white", linewidth=0.8
                    )
                )
                ax.text(
                    x + len(text) / 2,
                    row + 0.5,
                    text,
                    ha="center",
                    va="center",
                    family="DejaVu Sans Mono",
                    fontsize=font_size,
                    color=_text_colour(bg),
                )
                x += len(text)
        bar_w = min(4.5, fig_w - 0.6)
        cax = fig.add_axes(
            ((fig_w - bar_w) / 2 / fig_w, y(fig_h - bar_label_h), bar_w / fig_w, bar_h / fig_h)
        )
        extend = "max" if max(ti.weights, default=0.0) > high else "neither"
        bar = fig.colorbar(
            ScalarMappable(norm=Normalize(low, high), cmap=colormaps[CMAP]),
            cax=cax,
            orientation="horizontal",
            extend=extend,
        )
        bar.set_label(
            f"token weight (mean 1 over {len(ti.tokens)} {ti.span} tokens, max {max(ti.weights, default=0.0):.2f}; "
            f"λ={ti.lambda_importance:g})",
            fontsize=9,
        )
        bar.ax.tick_params(labelsize=8)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)
    return path


# --------------------------------------------------------------------------- CLI entry point


def _load_row(data: str, row: int) -> tuple[Any, Any]:
    """Prompt and chosen response of row ``row`` of a preference file, through the data layer."""
    from tidpo.data import load_preference_dataset

    dataset = load_preference_dataset(data)
    if not 0 <= row < len(dataset):
        raise ValueError(
            f"--row {row} is out of range: {data} has {len(dataset)} rows (0..{len(dataset) - 1})"
        )
    record = dataset[row]
    if "chosen" not in record:
        raise ValueError(f"{data} row {row} has no 'chosen' (keys: {sorted(record)})")
    if "prompt" not in record:
        if "rejected" not in record:
            raise ValueError(f"{data} row {row} has neither 'prompt' nor 'rejected' to take the prompt from")
        from tidpo.data import split_implicit_prompt

        prompt, chosen, _ = split_implicit_prompt(record["chosen"], record["rejected"])  # implicit prompt
        return prompt, chosen
    return record["prompt"], record["chosen"]


def run_explain(
    model: str,
    prompt: str | None,
    response: str | None,
    out: str,
    data: str | None = None,
    row: int | None = None,
    *,
    lambda_importance: float = 0.7,
    sigma_div: float = 4.0,
    span: str = "response",
    tokenizer: str | None = None,
    print_terminal: bool = True,
    **unused: Any,
) -> TokenImportance:
    """What ``tidpo explain`` does: load the model, explain one pair, write ``out/importance.html``,
    ``out/importance.png`` and ``out/importance.json``, and print the terminal rendering.

    The pair is either ``prompt`` + ``response``, or row ``row`` of the preference file ``data``
    (its prompt and chosen response).
    """
    from tidpo.models import load_causal_lm, load_tokenizer

    if unused:
        raise TypeError(f"run_explain: unknown option(s) {', '.join(sorted(unused))}")
    if data is not None or row is not None:
        if prompt is not None or response is not None:
            raise ValueError("Give either --prompt/--response or --data/--row, not both")
        if data is None or row is None:
            raise ValueError("--data and --row go together (the row index of the pair to explain)")
        prompt, response = _load_row(data, row)
    elif prompt is None or response is None:
        raise ValueError("Give both --prompt and --response (or --data FILE --row N)")
    elif isinstance(response, str) and not response.strip():
        raise ValueError("--response is empty: give the response text whose tokens to weigh")

    lm = load_causal_lm(model, dtype=torch.float32)
    tok = load_tokenizer(tokenizer or model)
    ti = explain(
        lm, tok, prompt, response, lambda_importance=lambda_importance, sigma_div=sigma_div, span=span
    )

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    title = f"TI-DPO token importance — {model}"
    (out_dir / "importance.html").write_text(render_html(ti, title), encoding="utf-8")
    render_png(ti, out_dir / "importance.png", title=title)
    (out_dir / "importance.json").write_text(json.dumps(ti.to_dict(), indent=2), encoding="utf-8")
    if print_terminal:
        colour = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
        print(render_terminal(ti, colour=colour))
        print(
            f"\nwrote {out_dir / 'importance.html'}, {out_dir / 'importance.png'} and {out_dir / 'importance.json'}"
        )
    return ti
