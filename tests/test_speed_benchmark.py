"""``benchmarks/speed.py`` itself (issue 6's deliverable) runs end to end and reports what it claims.

Run in-process on a small random Llama with one step per configuration: no timing is asserted (the
numbers of one step on a shared machine mean nothing), only that every configuration ran through the
public trainers, the table's ratios are consistent with the recorded times, peak memory was
measured, anchors were sampled only where the triplet is on, and TRL's and our DPO loss agree on the
first batch.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from transformers.utils import logging as hf_logging

SPEED = Path(__file__).resolve().parents[1] / "benchmarks" / "speed.py"
CONFIGS = ("dpo", "trl_dpo", "ti_separate", "ti_fused", "ti_full", "ti_full_apart")


@pytest.fixture(scope="module")
def speed():
    # main() quietens transformers' logging for its table: give the rest of the suite its level back.
    verbosity = hf_logging.get_verbosity()
    spec = importlib.util.spec_from_file_location("tidpo_speed_benchmark", SPEED)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]
    hf_logging.set_verbosity(verbosity)


def test_speed_benchmark_runs_every_configuration(speed, tmp_path, capsys) -> None:
    out = tmp_path / "speed.json"
    argv = [
        "--model", "tiny", "--hidden", "64", "--layers", "2", "--seq-len", "48",
        "--batch-size", "2", "--grad-accum", "2", "--steps", "1", "--warmup", "0",
        "--anchor-tokens", "4", "--configs", ",".join(CONFIGS), "--json", str(out), "--count-ops",
    ]  # fmt: skip
    results = speed.main(argv)
    printed = capsys.readouterr().out

    assert json.loads(out.read_text())["configs"].keys() == set(CONFIGS)
    configs = results["configs"]
    base = configs["dpo"]["median_cpu_s"]
    for name in CONFIGS:
        row = configs[name]
        assert len(row["cpu_s"]) == 1 and row["median_cpu_s"] > 0, name
        assert row["time_ratio"] == pytest.approx(row["median_cpu_s"] / base), name
        assert row["peak_mib"] is not None and row["peak_mib"] > 0, name
        # Anchors are sampled (and timed) only by the configurations with the triplet term.
        assert (row["median_anchor_wall_s"] is not None) == name.startswith("ti_full"), name
        assert name in printed
    assert configs["dpo"]["time_ratio"] == 1.0 and configs["dpo"]["mem_ratio"] == 1.0
    assert "triplet, 4-token anchors" in printed and "64-token" not in printed  # follows --anchor-tokens

    losses = results["first_batch_loss"]
    assert losses["trl"] == pytest.approx(losses["ours"], abs=1e-5)
    checks = {c["target"]: c for c in results["checks"]}
    assert checks["3. same DPO loss as TRL on the first batch"]["met"] is True
    assert {
        "2. full TI-DPO (anchors included): time <= 2.0x DPO",
        "3. our DPO at least as fast as TRL's",
    } <= set(checks)
    assert results["args"]["grad_accum"] == 2
    # --count-ops: one more step per config under the profiler. Each extra pass adds its operators: the
    # attribution's backward, the separate pass's forward too, the anchors' decoding and passes.
    ops = {name: configs[name]["aten_calls"] for name in CONFIGS}
    assert all(isinstance(n, int) and n > 100 for n in ops.values()), ops
    assert ops["dpo"] < ops["ti_fused"] < ops["ti_separate"] < ops["ti_full"], ops
    assert "Top-level aten calls per step" in printed


def test_speed_benchmark_rejects_unknown_configs(speed, capsys) -> None:
    with pytest.raises(SystemExit):
        speed.parse_args(["--configs", "dpo,ti_fast"])
    assert "unknown configs ['ti_fast']" in capsys.readouterr().err


def test_speed_benchmark_runs_the_models_as_train_does(speed, monkeypatch) -> None:
    # In a real bf16 run accelerate wraps every model forward in autocast inside `train()`, also the
    # forwards that decode the anchors of accumulated micro-batches in get_batch_samples; the benchmark,
    # which calls the trainer's steps itself, must prepare the models the same way (rounds 8-9 timed
    # those decodes in float32): every layer of every forward, both trainers', runs under autocast.
    import torch

    import tidpo.generation as generation

    eager_step, decoding, autocast = generation._eager_step, [False], []

    def spy(model, *args):
        decoding[0] = True
        try:
            return eager_step(model, *args)
        finally:
            decoding[0] = False

    def linear_precision(module, _inputs):
        if isinstance(module, torch.nn.Linear):
            autocast.append((decoding[0], torch.is_autocast_enabled("cpu")))

    monkeypatch.setattr(generation, "_eager_step", spy)
    hook = torch.nn.modules.module.register_module_forward_pre_hook(linear_precision)
    argv = [
        "--model", "tiny", "--hidden", "64", "--layers", "2", "--seq-len", "48", "--batch-size", "2",
        "--grad-accum", "2", "--steps", "1", "--warmup", "0", "--anchor-tokens", "4", "--configs",
        "dpo,trl_dpo,ti_full", "--no-memory", "--bf16", "--device", "cpu",
    ]  # fmt: skip
    try:
        results = speed.main(argv)
    finally:
        hook.remove()
    assert any(decoded for decoded, _ in autocast), "no anchors were decoded"
    assert all(on for _, on in autocast), [call for call in autocast if not call[1]][:5]
    assert results["first_batch_loss"]["trl"] == pytest.approx(results["first_batch_loss"]["ours"], abs=1e-3)
