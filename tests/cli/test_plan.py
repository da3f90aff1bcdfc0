"""`moechat plan`: the reference config's plan and run size as JSON and text, and its exit codes."""

from __future__ import annotations

import json

from moechat.cli import plan


def test_cli_reports_the_reference_config(capsys, tmp_path):
    assert plan.main(["--params", "params.yaml", "--tokenizer", str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["params"] == 506_968_064 and out["fits"] and out["micro_batch_size"] == 16
    assert out["largest_micro_batch"] >= 16
    assert plan.main(["--params", "params.yaml", "--tokenizer", str(tmp_path), "--micro-batch", "128"]) == 1
    text = capsys.readouterr().out
    assert "DOES NOT FIT in 16 GiB" in text and f"largest micro-batch that fits: {out['largest_micro_batch']}" in text
    assert "fastest that fits 16 GiB: train.micro_batch_size: " in text


def test_cli_prints_tokens_steps_warmup_and_time_beside_the_memory(capsys, tmp_path):
    assert plan.main(["--params", "params.yaml", "--tokenizer", str(tmp_path),
                      "--prepare-metrics", str(tmp_path / "absent.json")]) == 0
    text = capsys.readouterr().out
    assert "total" in text and "fits in 16 GiB" in text
    assert "7.14M train tokens per epoch in 7,264 blocks [estimate (English OASST1, thread_policy all" in text
    assert "optimizer steps 454 (227 per epoch), warmup 22" in text
    assert "min at 30% MFU (assumed) of 44.1 TFLOP/s per GPU" in text
    assert plan.main(["--params", "params.yaml", "--tokenizer", str(tmp_path), "--json",
                      "--prepare-metrics", str(tmp_path / "absent.json")]) == 0
    run = json.loads(capsys.readouterr().out)["run"]
    assert run["total_steps"] == 454 and run["warmup_steps"] == 22


def test_cli_plans_the_cpu_preset_without_gpu_advice(capsys, tmp_path):
    """The tiny preset (fp32, the CPU demo) is planned as host memory: MiB rows, no CUDA context, no GPU
    budget or micro-batch advice; --device cuda plans the same config for a GPU."""
    args = ["--params", "params.yaml", "--preset", "tiny", "--tokenizer", str(tmp_path)]
    assert plan.main(args) == 0
    text = capsys.readouterr().out
    assert "sdpa attention, on cpu" in text and "peak (host memory)" in text and plan.CPU_NOTE in text
    assert "GiB" not in text and "CUDA context" not in text.replace(plan.CPU_NOTE, "")
    assert "fastest that fits" not in text and "0.00 MiB" not in text
    assert plan.main(args + ["--device", "cuda"]) == 0
    text = capsys.readouterr().out
    assert "on cuda" in text and "fits in 16 GiB" in text and "CUDA context + fragm." in text


