"""scripts/bench_memory.py on a tiny UNet: the rows it plans, what one row measures through the real trainer, the
LoRA / full-weight table, a row stopped at the memory cap, and bad input. Its numbers are not asserted."""

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_memory.py"


@pytest.fixture
def bench(monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_memory", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_memory", module)  # dataclasses resolve annotations through it
    spec.loader.exec_module(module)
    # SD1.5's layout, but one layer per block on 16x16 latents: seconds per step at width 0.1 (32..128 channels)
    monkeypatch.setitem(module.SD15_UNET, "layers_per_block", 1)
    monkeypatch.setitem(module.SD15_UNET, "sample_size", 16)
    return module


def test_widths_keep_the_norm_groups(bench):
    assert bench.channels(0.5) == (160, 320, 640, 640) and bench.channels(1.0) == (320, 640, 1280, 1280)
    with pytest.raises(ValueError, match="multiples of 32"):
        bench.channels(0.75)


def test_one_row_runs_the_trainer_and_accounts_for_its_memory(bench):
    rows = {}
    for weights in ("full", "lora"):
        row = bench.Row("sid", weights, 0.1, "fp32", checkpointing=weights == "lora", lora_rank=4)
        rows[weights] = bench.measure(row, warmup=1, steps=1)
    full, lora = rows["full"], rows["lora"]
    for r in (full, lora):
        assert r["status"] == "ok" and r["mixed_precision"] == "no" and len(r["step_seconds"]) == 2
        assert r["s_per_step"] > 0 and r["peak_gb"] >= r["after_build_gb"] > 0
        assert r["block_out_channels"] == [32, 64, 128, 128] and "sid.guidance_scale=1.5" in r["overrides"]
    # full weights: two trained copies of the UNet beside the frozen one, Adam's two moments of each trained weight
    assert full["trained_parameters_M"] == pytest.approx(2 * full["unet_parameters_M"])
    assert full["weights_gb"] == pytest.approx(3 * full["unet_parameters_M"] * 1e6 * 4 / bench.GB)
    assert full["adam_gb"] == pytest.approx(2 * full["grads_gb"])
    # LoRA: one base (the same UNet) with two small adapters
    assert lora["unet_parameters_M"] == pytest.approx(full["unet_parameters_M"])
    assert lora["trained_parameters_M"] < 0.2 * full["trained_parameters_M"]
    assert "student.lora_rank=4" in lora["overrides"] and "train.gradient_checkpointing=true" in lora["overrides"]
    table = bench.markdown({"rows": [full, {**lora, "checkpointing": False}]})
    ratio = f"{lora['peak_gb'] / full['peak_gb']:.2f}"
    assert f"| {ratio} |" in table and "LoRA r4" in table and "0.1 (32, 64, 128, 128)" in table


def test_a_row_past_the_memory_cap_is_stopped_and_reported(bench):
    row = bench.Row("dmd2", "full", 1.0, "fp32", checkpointing=False)
    result = bench.run_row(row, warmup=1, steps=1, max_rss_gb=0.05, timeout=120)
    assert result["status"] == "over 0.05 GB" and result["wall_s"] < 60
    assert "did not fit: over 0.05 GB" in bench.markdown({"rows": [result]})


@pytest.mark.parametrize("argv, message", [(["--methods", "dmd"], "--methods dmd: choose from dmd2, sid"),
                                           (["--width-scale", "0.75"], "multiples of 32"),
                                           (["--precisions", "fp16"], "choose from fp32, bf16, bf16-pure")])
def test_bad_input_is_refused_before_anything_runs(bench, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        bench.main([*argv, "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
