"""Step-time and peak-memory benchmark: TI-DPO against DPO (ours and TRL's), side by side.

Every configuration gets its own trainer, built once, on its own copy of the same model and the same
batch of preference pairs. The measured steps are interleaved round-robin (config A step, config B
step, ..., then again), so load from other processes on the machine hits every configuration alike.
One step is what a real run pays per batch, through the public trainer API, the same for all configs
(TRL's included)::

    loss = trainer.training_step(model, batch)   # forward(s), anchors, attribution, loss, backward
    trainer.optimizer.step(); trainer.optimizer.zero_grad()

Peak memory is measured on a separate, untimed step per configuration:

- CUDA: ``torch.cuda.max_memory_allocated()`` minus the bytes allocated when the step starts.
- CPU: torch keeps no peak counter for CPU tensors, and process RSS is noisy (glibc keeps freed pages,
  other threads allocate). We run the step under ``torch.profiler`` with ``profile_memory=True``, which
  records every allocation and free of torch's CPU allocator, and take the maximum of their running
  sum: the peak bytes of tensors alive at once above the level at the step's start (parameters,
  optimizer states and the cached batch are already alive then and are not counted). Python objects
  are not counted; they are tiny next to activations and logits.

Usage::

    python benchmarks/speed.py --model tiny --steps 8
    python benchmarks/speed.py --model smollm2 --steps 5 --batch-size 4 --seq-len 128   # LoRA r=16

Ratios are to "dpo" (our trainer with loss_type="dpo"); the targets of the issue are checked at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from datasets import Dataset

# Words of the tiny tokenizer's training corpus, so the tiny model's texts tokenise into real merges.
_WORDS = (
    "the sky is blue grass green a cat sat on mat and dog ran in park please answer briefly "
    "lowercase without commas i loved this film wonderful acting great story beautiful music it was "
    "terrible boring far too long write short review of restaurant seek medical advice promptly "
    "instead self-medicating"
).split()

# name -> (our TIDPOConfig overrides, or None for TRL's DPOTrainer; description)
CONFIGS: dict[str, tuple[dict[str, Any] | None, str]] = {
    "trl_dpo": (None, "TRL 1.16 DPOTrainer, sigmoid loss"),
    "dpo": ({"loss_type": "dpo"}, "ours, loss_type='dpo'"),
    "dpo_rows": (
        {"loss_type": "dpo", "share_prompt": False},
        "ours, loss_type='dpo', each row forwards its prompt (share_prompt=False)",
    ),
    "dpo_shared": (
        {"loss_type": "dpo", "share_prompt": True},
        "ours, loss_type='dpo', prompt forwarded once per pair (share_prompt=True; auto is off on CUDA)",
    ),
    "ti_separate": (
        {"loss_type": "ti_dpo", "gamma": 0.0, "tdpo_alpha": 0.0, "attribution_pass": "separate"},
        "TI-DPO gamma=0 alpha=0, separate attribution pass",
    ),
    "ti_fused": (
        {"loss_type": "ti_dpo", "gamma": 0.0, "tdpo_alpha": 0.0, "attribution_pass": "fused"},
        "TI-DPO gamma=0 alpha=0, fused attribution",
    ),
    "ti_fused_kl": (
        {"loss_type": "ti_dpo", "gamma": 0.0, "tdpo_alpha": 0.5, "attribution_pass": "fused"},
        "TI-DPO gamma=0 alpha=0.5 (sequential KL), fused",
    ),
    "ti_fused_kl_rows": (
        {
            "loss_type": "ti_dpo",
            "gamma": 0.0,
            "tdpo_alpha": 0.5,
            "attribution_pass": "fused",
            "share_prompt": False,
        },
        "TI-DPO gamma=0 alpha=0.5, fused, share_prompt=False",
    ),
    "ti_full": (
        {"loss_type": "ti_dpo", "gamma": 0.1, "tdpo_alpha": 0.5, "attribution_pass": "fused"},
        "full TI-DPO: KL + triplet, 64-token anchors",
    ),
    "ti_full_rows": (
        {
            "loss_type": "ti_dpo",
            "gamma": 0.1,
            "tdpo_alpha": 0.5,
            "attribution_pass": "fused",
            "anchor_prompt_cache": False,
        },
        "full TI-DPO, anchors forwarded as full prompt + anchor rows",
    ),
    "ti_full_cache": (
        {
            "loss_type": "ti_dpo",
            "gamma": 0.1,
            "tdpo_alpha": 0.5,
            "attribution_pass": "fused",
            "anchor_prompt_cache": True,
        },
        "full TI-DPO, prompt cache forced (auto leaves it off under gradient checkpointing)",
    ),
    "ti_full_apart": (
        {
            "loss_type": "ti_dpo",
            "gamma": 0.1,
            "tdpo_alpha": 0.5,
            "attribution_pass": "fused",
            "anchor_sampling_rows": 0,
        },
        "full TI-DPO, each micro-batch samples its own anchors (anchor_sampling_rows=0)",
    ),
}
# ti_full_cache only differs from ti_full under gradient checkpointing, ti_full_apart under gradient
# accumulation (--grad-accum), dpo_shared from dpo on CUDA (dpo_rows is its twin on the CPU): not run
# unless asked for.
DEFAULT_CONFIGS = [name for name in CONFIGS if name not in ("ti_full_cache", "ti_full_apart", "dpo_shared")]


@dataclass
class Entry:
    """One configuration under test: its trainer, its fixed batch and what was measured."""

    name: str
    trainer: Any
    batches: list[dict[str, torch.Tensor]]  # the micro-batches of one optimizer step
    times: list[float] = field(default_factory=list)  # wall-clock seconds per measured step
    cpu_times: list[float] = field(default_factory=list)  # process CPU seconds per measured step
    peak_bytes: int | None = None
    aten_calls: int | None = None  # --count-ops
    losses: list[float] = field(default_factory=list)
    anchor_times: list[float] = field(default_factory=list)  # seconds sampling anchors, per measured step
    anchor_clock: float = 0.0  # seconds sampling anchors, accumulated during the current step


def time_anchor_sampling(entry: Entry, device: str) -> None:
    """Wrap the trainer's anchor sampling with a (synchronized) wall clock, to split the step's cost."""
    trainer = entry.trainer
    sample = getattr(trainer, "_sample_anchors", None)
    if sample is None:  # TRL's trainer: no anchors
        return

    def timed(*a, **kw):
        _sync(device)
        start = time.perf_counter()
        try:
            return sample(*a, **kw)
        finally:
            _sync(device)
            entry.anchor_clock += time.perf_counter() - start

    trainer._sample_anchors = timed


# --------------------------------------------------------------------------- data


def make_rows(tokenizer, n_pairs: int, seq_len: int, seed: int = 0) -> list[dict[str, str]]:
    """Deterministic prompt/chosen/rejected rows whose tokenised length stays within ``seq_len``.

    Prompts take about 3/8 of the budget, responses the rest (rejected a little shorter, varying per
    row, so the batch has real padding). No row needs truncation, so TRL's and our tokenisation give
    the same ids without either side's truncation rules coming into play.
    """
    rng = random.Random(seed)
    eos_room = 2  # EOS appended to the completion, plus a BOS some tokenizers add to the prompt

    def grow(target: int) -> str:
        text = ""
        while True:
            candidate = f"{text} {rng.choice(_WORDS)}"
            if len(tokenizer(candidate, add_special_tokens=False)["input_ids"]) > target:
                return text
            text = candidate

    prompt_budget = max(4, seq_len * 3 // 8)
    rows = []
    for i in range(n_pairs):
        prompt = grow(prompt_budget - 4 * (i % 3)).strip().capitalize() + ":"
        room = seq_len - len(tokenizer(prompt)["input_ids"]) - eos_room
        chosen = grow(room - 2 * (i % 4))
        rejected = grow(max(4, room - 6 - 5 * (i % 3)))
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


# --------------------------------------------------------------------------- models


def load_models(args) -> tuple[Any, Any, Any, Any]:
    """Return (policy, reference or None, tokenizer, peft_config or None), all on CPU in float32."""
    from tidpo.models import load_causal_lm, load_tokenizer, tiny_causal_lm, tiny_tokenizer

    if args.model == "tiny":
        tokenizer = tiny_tokenizer()
        ref = tiny_causal_lm(
            "llama",
            vocab_size=args.vocab or None,
            hidden_size=args.hidden,
            num_layers=args.layers,
            seed=args.seed,
            tokenizer=tokenizer,
        )
        policy = copy.deepcopy(ref)
        # Move the policy off the reference so the DPO loss (and the parity check) is not log 2.
        gen = torch.Generator().manual_seed(args.seed + 1)
        with torch.no_grad():
            for p in policy.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=gen))
        return policy, ref, tokenizer, None
    from peft import LoraConfig

    if args.arch_dir:
        # The SmolLM2 architecture with random weights, for machines the 94 MB GGUF cannot reach
        # (step time and memory depend on the shapes, not on the weights' values).
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        from tidpo.models import ensure_pad_token

        tokenizer = ensure_pad_token(AutoTokenizer.from_pretrained(args.arch_dir))
        torch.manual_seed(args.seed)
        policy = AutoModelForCausalLM.from_config(
            AutoConfig.from_pretrained(args.arch_dir), dtype=torch.float32
        )
    else:
        tokenizer = load_tokenizer("smollm2-135m")
        policy = load_causal_lm("smollm2-135m", dtype=torch.float32)
    peft_config = None
    if args.lora_r > 0:
        peft_config = LoraConfig(
            r=args.lora_r,
            lora_alpha=2 * args.lora_r,
            lora_dropout=0.0,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )
        return policy, None, tokenizer, peft_config
    ref = copy.deepcopy(policy)
    # Full fine-tuning: move the policy off the reference so the first-batch loss is not log 2.
    gen = torch.Generator().manual_seed(args.seed + 1)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.002 * torch.randn(p.shape, generator=gen))
    return policy, ref, tokenizer, None


def _lora_state(model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if "lora_" in n}


def sync_lora(entries: list[Entry], seed: int) -> None:
    """Give every trainer the same adapters, with B non-zero so the policy differs from the reference.

    TRL and our trainer each create their adapters (and draw their A matrices) on their own; copying one
    set into all makes "same model" literal, and a non-zero B makes the first-batch loss non-trivial.
    """
    gen = torch.Generator().manual_seed(seed)
    source = _lora_state(entries[0].trainer.model)
    with torch.no_grad():
        for name in sorted(source):
            if "lora_B" in name:
                source[name].copy_(0.01 * torch.randn(source[name].shape, generator=gen))
        for entry in entries[1:]:
            target = _lora_state(entry.trainer.model)
            if sorted(target) != sorted(source):
                raise RuntimeError(f"{entry.name}: adapter parameter names differ from {entries[0].name}'s")
            for name, param in target.items():
                param.copy_(source[name])


# --------------------------------------------------------------------------- trainers


def build_entry(name: str, args, models, rows, workdir: str) -> Entry:
    """Build the trainer of one configuration on fresh copies of the models, and its fixed batch."""
    policy, ref, tokenizer, peft_config = models
    overrides, _ = CONFIGS[name]
    common = dict(
        output_dir=os.path.join(workdir, name),
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        report_to=[],
        save_strategy="no",
        logging_steps=10**9,
        disable_tqdm=True,
        use_cpu=args.device == "cpu",
        bf16=args.bf16,
        gradient_checkpointing=args.gradient_checkpointing,
        max_length=None,
        seed=args.seed,
    )
    model = copy.deepcopy(policy)
    ref_model = copy.deepcopy(ref) if ref is not None else None
    dataset = Dataset.from_list(rows)
    if overrides is None:
        from trl import DPOConfig, DPOTrainer

        config = DPOConfig(beta=0.1, loss_type=["sigmoid"], **common)
        trainer = DPOTrainer(
            model=model,
            ref_model=ref_model,
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
        )
    else:
        from tidpo import TIDPOConfig, TIDPOTrainer

        if args.logits_chunk_size:
            overrides = {**overrides, "logits_chunk_size": args.logits_chunk_size}
        if args.share_prompt != "auto" and "share_prompt" not in overrides:  # the *_rows configs keep False
            overrides = {**overrides, "share_prompt": args.share_prompt == "true"}
        config = TIDPOConfig(
            beta=0.1,
            max_prompt_length=None,
            anchor_max_new_tokens=args.anchor_tokens,
            **common,
            **overrides,
        )
        trainer = TIDPOTrainer(
            model,
            ref_model=ref_model,
            args=config,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
        )
    if args.gradient_checkpointing:
        # `Trainer.train()` turns it on; these steps run without train(), so do what it does.
        trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # `Trainer.train()` gives the model to accelerate, which under bf16 makes its forward
    # convert_outputs_to_fp32(autocast(forward)) (the reference got that at construction, in both
    # trainers); these steps run without train(), so do what it does. Code outside the forwards then
    # runs outside autocast, as in a run.
    trainer.model_wrapped = trainer.accelerator.prepare_model(trainer.model)
    trainer.create_optimizer()
    # Set by `Trainer.train()`'s loop, read by `training_step` (it divides the loss by it).
    trainer.current_gradient_accumulation_steps = args.grad_accum
    # The same rows for every configuration (micro-batch j: rows jB..jB+B-1), each collated by its own
    # trainer's collator.
    batches = []
    for j in range(args.grad_accum):
        rows_j = range(j * args.batch_size, (j + 1) * args.batch_size)
        batch = trainer.data_collator([trainer.train_dataset[i] for i in rows_j])
        batches.append(
            {k: v.to(trainer.args.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        )
    entry = Entry(name=name, trainer=trainer, batches=batches)
    time_anchor_sampling(entry, args.device)
    return entry


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def train_step(entry: Entry, device: str) -> float:
    """One optimizer step through the public trainer API, as `Trainer.train()` runs it: fetch the step's
    micro-batches (`get_batch_samples`; tidpo samples their anchors together there), one
    `training_step` each, then the optimizer. Returns the summed loss."""
    trainer = entry.trainer
    fresh = [dict(batch) for batch in entry.batches]  # get_batch_samples may add keys (the anchors)
    # Every model forward runs under the autocast accelerate put into it (`build_entry`), also those
    # of get_batch_samples, which decodes the anchors of accumulated micro-batches (rounds 8-9 entered
    # autocast around training_step only, and timed those in float32).
    batches, _ = trainer.get_batch_samples(iter(fresh), len(fresh), trainer.args.device)
    loss = 0.0
    for batch in batches:
        loss += trainer.training_step(trainer.model, batch)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.state.global_step += 1  # new anchors every step, as in a real run
    _sync(device)
    return float(loss.detach())


def timed_step(entry: Entry, device: str) -> tuple[float, float]:
    """Run one step; return (wall seconds, CPU seconds of this process)."""
    _sync(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    entry.losses.append(train_step(entry, device))
    return time.perf_counter() - start, time.process_time() - cpu_start


def peak_step_bytes(entry: Entry, device: str) -> int:
    """Peak bytes of tensors allocated during one step, above the level at its start (see module doc)."""
    from tidpo.profiling import peak_tensor_bytes

    return peak_tensor_bytes(lambda: train_step(entry, device), device)


# --------------------------------------------------------------------------- checks


def first_batch_losses(entries: dict[str, Entry]) -> tuple[float, float] | None:
    """TRL's and our DPO loss on the same first batch, same model, before any step (no grad, eval)."""
    if "trl_dpo" not in entries or "dpo" not in entries:
        return None
    values = []
    for name in ("trl_dpo", "dpo"):
        trainer = entries[name].trainer
        trainer.model.eval()
        batch = entries[name].batches[0]
        if name == "trl_dpo":  # TRL's compute_loss forwards every key it gets to the model
            batch = {k: batch[k] for k in ("input_ids", "attention_mask", "completion_mask")}
        with torch.no_grad():
            values.append(float(trainer.compute_loss(trainer.model, batch)))
        trainer.model.train()
    return values[0], values[1]


def count_aten_calls(entry: Entry, device: str) -> int:
    """The aten operators one step dispatches that no other aten operator called (torch.profiler).

    Each is a dispatch on the host, and those that compute (all but views such as ``reshape``) launch a
    kernel on a GPU: what a host-bound GPU step costs. The count is deterministic where the step time of
    a small model on a GPU is not, so the layouts' launch costs can be compared on any machine. (Nested
    calls, e.g. ``linear`` -> ``mm``, count once.)
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train_step(entry, device)
    return sum(
        1
        for event in prof.events()
        if event.name.startswith("aten::")
        and not (event.cpu_parent is not None and event.cpu_parent.name.startswith("aten::"))
    )


def profile_config(entry: Entry, device: str, rows: int = 25) -> None:
    """Print torch.profiler's most expensive ops for one step of a configuration."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities, record_shapes=False) as prof:
        train_step(entry, device)
    print(f"\n== torch.profiler: one step of {entry.name} ==")
    table = prof.key_averages()
    # On a GPU, by device time (what the kernels cost) and by host time (what launching them costs).
    for sort in (["device_time_total"] if device == "cuda" else []) + ["cpu_time_total"]:
        print(table.table(sort_by=sort, row_limit=rows))


# --------------------------------------------------------------------------- report


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _fmt(x: float | None, spec: str) -> str:
    return "-".rjust(int(spec.split(".")[0])) if x is None else format(x, spec)


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def report(entries: dict[str, Entry], parity: tuple[float, float] | None, args) -> dict[str, Any]:
    clock = args.clock
    base = entries.get("dpo")

    def step_time(entry: Entry) -> float | None:
        return _median(entry.cpu_times if clock == "cpu" else entry.times)

    base_t = step_time(base) if base else None
    base_m = base.peak_bytes if base else None
    results: dict[str, Any] = {"clock": clock, "configs": {}}
    print(f"\nRatios use the median {'process CPU' if clock == 'cpu' else 'wall-clock'} time per step.")
    header = (
        f"{'config':<16} {'wall s':>7} {'cpu s':>7} {'cpu min':>7} {'cpu max':>7} {'peak MiB':>9} "
        f"{'time/dpo':>8} {'mem/dpo':>8} {'anchor s':>8}  description"
    )
    print(header + "\n" + "-" * len(header))
    for name, entry in entries.items():
        description = CONFIGS[name][1].replace("64-token", f"{args.anchor_tokens}-token")
        peak = entry.peak_bytes
        row = {
            "median_wall_s": _median(entry.times),
            "median_cpu_s": _median(entry.cpu_times),
            "wall_s": entry.times,
            "cpu_s": entry.cpu_times,
            "peak_mib": None if peak is None else peak / 2**20,
            "time_ratio": _ratio(step_time(entry), base_t),
            "mem_ratio": _ratio(peak, base_m),
            "median_anchor_wall_s": _median(entry.anchor_times) if any(entry.anchor_times) else None,
            "aten_calls": entry.aten_calls,
        }
        results["configs"][name] = row
        cpu = entry.cpu_times
        print(
            f"{name:<16} {_fmt(row['median_wall_s'], '7.2f')} {_fmt(row['median_cpu_s'], '7.2f')} "
            f"{_fmt(min(cpu) if cpu else None, '7.2f')} {_fmt(max(cpu) if cpu else None, '7.2f')} "
            f"{_fmt(row['peak_mib'], '9.1f')} {_fmt(row['time_ratio'], '8.2f')} "
            f"{_fmt(row['mem_ratio'], '8.2f')} {_fmt(row['median_anchor_wall_s'], '8.2f')}  {description}"
        )

    if any(entry.aten_calls for entry in entries.values()):
        base_ops = base.aten_calls if base else None
        print("\nTop-level aten calls per step (host dispatches; a GPU kernel launch each, views aside):")
        for name, entry in entries.items():
            ratio = _ratio(entry.aten_calls, base_ops)
            print(f"  {name:<16} {entry.aten_calls:>8}  {_fmt(ratio, '5.2f')}x dpo")

    checks: list[tuple[str, bool | None, str]] = []

    def ratio_of(name: str, key: str) -> float | None:
        return results["configs"].get(name, {}).get(key)

    for name, label in (("ti_fused", "gamma=0, alpha=0"), ("ti_fused_kl", "gamma=0, alpha=0.5")):
        t, m = ratio_of(name, "time_ratio"), ratio_of(name, "mem_ratio")
        if t is not None:
            checks.append((f"1. TI-DPO {label}: time <= 1.30x DPO", t <= 1.30, f"{t:.2f}x"))
        if m is not None:
            checks.append((f"1. TI-DPO {label}: peak memory <= 1.15x DPO", m <= 1.15, f"{m:.2f}x"))
    rows_t, rows_base = ratio_of("ti_fused_kl_rows", "time_ratio"), ratio_of("dpo_rows", "time_ratio")
    if rows_t is not None and rows_base:
        t = rows_t / rows_base
        label = "1. share_prompt=False, TI-DPO gamma=0, alpha=0.5: time <= 1.30x DPO with share_prompt=False"
        checks.append((label, t <= 1.30, f"{t:.2f}x"))
    t = ratio_of("ti_full", "time_ratio")
    if t is not None:
        checks.append(("2. full TI-DPO (anchors included): time <= 2.0x DPO", t <= 2.0, f"{t:.2f}x"))
    t = ratio_of("trl_dpo", "time_ratio")
    if t is not None:
        note = " (within 3%: a tie at this noise level)" if 0.97 <= t < 1.0 else ""
        checks.append(("3. our DPO at least as fast as TRL's", t >= 1.0, f"TRL/ours = {t:.2f}x{note}"))
    if parity is not None:
        trl_loss, our_loss = parity
        tol = 2e-2 if args.bf16 else 1e-5
        same = abs(trl_loss - our_loss) <= tol * max(1.0, abs(trl_loss))
        checks.append(
            ("3. same DPO loss as TRL on the first batch", same, f"TRL {trl_loss:.6f}, ours {our_loss:.6f}")
        )
        results["first_batch_loss"] = {"trl": trl_loss, "ours": our_loss}
    print("\nTargets (ratios measured side by side in this run):")
    for text, ok, value in checks:
        print(f"  [{'MET ' if ok else 'MISS'}] {text}: {value}")
    results["checks"] = [{"target": t, "met": ok, "value": v} for t, ok, v in checks]
    return results


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--model", choices=("tiny", "smollm2"), default="tiny")
    p.add_argument("--steps", type=int, default=8, help="measured steps per configuration")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per configuration first")
    p.add_argument("--batch-size", type=int, default=4, help="preference pairs per step")
    p.add_argument(
        "--grad-accum", type=int, default=1, help="micro-batches per optimizer step (gradient accumulation)"
    )
    p.add_argument("--seq-len", type=int, default=128, help="longest prompt + response, in tokens")
    p.add_argument("--anchor-tokens", type=int, default=64, help="anchor_max_new_tokens of full TI-DPO")
    p.add_argument(
        "--configs", default=",".join(DEFAULT_CONFIGS), help="comma-separated subset of " + ",".join(CONFIGS)
    )
    p.add_argument("--lora-r", type=int, default=16, help="smollm2: LoRA rank (0 = full fine-tuning)")
    p.add_argument(
        "--arch-dir",
        default="",
        help="smollm2: a folder with config.json + tokenizer: build that architecture with random weights",
    )
    p.add_argument("--hidden", type=int, default=256, help="tiny: hidden size")
    p.add_argument("--layers", type=int, default=4, help="tiny: number of layers")
    p.add_argument(
        "--vocab",
        type=int,
        default=0,
        help="tiny: output vocabulary (0 = the tokenizer's 320; the texts use those ids, a larger one "
        "gives the [B, T, V] tensors of a real model's size)",
    )
    p.add_argument(
        "--bf16", action="store_true", help="bf16 mixed precision as train() runs it (both trainers)"
    )
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument(
        "--share-prompt",
        choices=("auto", "true", "false"),
        default="auto",
        help="share_prompt of our configurations but the *_rows ones (auto: see TIDPOConfig.share_prompt)",
    )
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument(
        "--clock",
        choices=("auto", "wall", "cpu"),
        default="auto",
        help="time the ratios use; auto = process CPU time on CPU (robust to other processes on a "
        "shared machine), wall-clock on CUDA",
    )
    p.add_argument("--logits-chunk-size", type=int, default=0, help="logits_chunk_size (0 = config default)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory step")
    p.add_argument("--profile", default="", help="comma-separated configs to profile after the run")
    p.add_argument(
        "--count-ops", action="store_true", help="count each config's top-level aten calls in one more step"
    )
    p.add_argument("--json", default="", help="write the results here as JSON")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.clock == "auto":
        args.clock = "cpu" if args.device == "cpu" else "wall"
    unknown = [c for c in args.configs.split(",") if c not in CONFIGS]
    if unknown:
        p.error(f"unknown configs {unknown}; choose from {list(CONFIGS)}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    import transformers
    import trl

    print(
        f"device={args.device} ({torch.cuda.get_device_name() if args.device == 'cuda' else platform.processor() or platform.machine()}), "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}, "
        f"trl {trl.__version__}, python {sys.version.split()[0]}"
    )
    models = load_models(args)
    tokenizer = models[2]
    rows = make_rows(tokenizer, args.batch_size * args.grad_accum, args.seq_len, seed=args.seed)
    names = args.configs.split(",")
    with tempfile.TemporaryDirectory(prefix="tidpo-bench-") as workdir:
        entries: dict[str, Entry] = {}
        for name in names:
            start = time.perf_counter()
            entries[name] = build_entry(name, args, models, rows, workdir)
            print(f"built {name:<12} in {time.perf_counter() - start:5.1f}s", flush=True)
        if models[3] is not None:
            sync_lora(list(entries.values()), args.seed)
        first = next(iter(entries.values())).batches[0]
        n_tokens = int(first["attention_mask"].sum())
        print(
            f"model={args.model}{' + LoRA r=' + str(args.lora_r) if models[3] is not None else ''}, "
            f"batch {args.batch_size} pairs = {first['input_ids'].shape[0]} rows x {first['input_ids'].shape[1]} "
            f"positions ({n_tokens} real tokens) x {args.grad_accum} micro-batches per step, bf16={args.bf16}, gradient checkpointing="
            f"{args.gradient_checkpointing}, {args.warmup} warm-up + {args.steps} measured steps per config, "
            "interleaved"
        )
        parity = first_batch_losses(entries)
        for round_index in range(args.warmup + args.steps):
            cells = []
            for entry in entries.values():
                entry.anchor_clock = 0.0
                elapsed, cpu = timed_step(entry, args.device)
                if round_index >= args.warmup:
                    entry.times.append(elapsed)
                    entry.cpu_times.append(cpu)
                    entry.anchor_times.append(entry.anchor_clock)
                cells.append(f"{entry.name} {elapsed:.2f}s wall/{cpu:.2f}s cpu")
            tag = "warm-up" if round_index < args.warmup else f"step {round_index - args.warmup + 1}"
            print(f"{tag:>8}: " + ", ".join(cells), flush=True)
        if not args.no_memory:
            for entry in entries.values():
                entry.peak_bytes = peak_step_bytes(entry, args.device)
        if args.count_ops:
            for entry in entries.values():
                entry.aten_calls = count_aten_calls(entry, args.device)
        for name in filter(None, args.profile.split(",")):
            profile_config(entries[name], args.device)
        results = report(entries, parity, args)
    results["args"] = vars(args)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)
    return results


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
