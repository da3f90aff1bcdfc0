"""Every measured figure the docs quote is the figure in the committed metrics/bench_*.json that a bench/ script
wrote: docs/benchmarks.md holds `bench/report.py`'s tables verbatim, and FIGURES ties each figure quoted
elsewhere to its file and key. Rerun a bench script and the docs must follow, or this test fails.
docs/configuration.md's key table names every key of params.yaml."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]

# (doc file, text quoted in it with {} where the figure goes, metrics file, key path, format of the figure)
FIGURES = [
    ("README.md", "times it stage by stage, {} in", "bench_pipeline.json", "total_seconds", "{:.0f} s"),
    ("docs/benchmarks.md", "the MoE layer is {} the dense FFN", "bench_moe_layer.json", "ratios.ours_over_dense_ffn",
     "{:.2f}x"),
    ("docs/benchmarks.md", "{} faster than the naive masked loop", "bench_moe_layer.json",
     "ratios.naive_masked_over_ours", "{:.1f}x"),
    ("docs/performance.md", "ours is **{} the dense FFN**", "bench_moe_layer.json", "ratios.ours_over_dense_ffn",
     "{:.2f}x"),
    ("docs/performance.md", "naive masked loop is **{} slower**", "bench_moe_layer.json",
     "ratios.naive_masked_over_ours", "{:.1f}x"),
    ("docs/performance.md", "halves the step's memory growth ({})", "bench_train_variants.json",
     "ratios.chunked_over_full_step_memory", "{:.2f}x"),
    ("docs/performance.md", "at {} the tokens/s, with the identical loss", "bench_train_variants.json",
     "ratios.chunked_over_full_tokens_per_s", "{:.2f}x"),
    ("docs/performance.md", "`train.compile`\nis {} on this CPU", "bench_train_variants.json",
     "ratios.compile_over_eager_tokens_per_s", "{:.2f}x"),
]
# The MoE-layer table of performance.md: (row label, variant); ms and "x ours" from bench_moe_layer.json.
MOE_ROWS = [("ours (two grouped matmuls", "ours"), ("stack_only (", "stack_only"), ("loop_sorted (", "loop_sorted"),
            ("dense_ffn (", "dense_ffn"), ("naive_masked (", "naive_masked"),
            ("transformers' experts, eager loop", "hf_eager"), ("transformers' experts, grouped_mm", "hf_grouped_mm")]
VARIANT_ROWS = [("full_logits (", "full_logits"), ("gelu_saved (", "gelu_saved"), ("chunked (", "chunked"),
                ("chunked + train.compile", "chunked+compile")]


def metric(file: str, key: str) -> float:
    value = json.loads((ROOT / "metrics" / file).read_text())
    for part in key.split("."):
        value = value[int(part)] if isinstance(value, list) else value[part]
    return value


def doc_text(doc: str) -> str:
    return re.sub(r"[ \t]+\n", "\n", (ROOT / doc).read_text())


def table_row(doc: str, label: str) -> list[str]:
    """The cells of the one table row of `doc` whose first cell starts with `label`."""
    rows = [line for line in doc_text(doc).splitlines() if line.startswith(f"| {label}")]
    assert len(rows) == 1, f"{doc}: {len(rows)} table rows start with {label!r}"
    return [cell.strip().strip("*") for cell in rows[0].strip("|").split("|")]


@pytest.mark.parametrize("doc, quoted, file, key, fmt", FIGURES, ids=[f"{f[0]}:{f[3]}" for f in FIGURES])
def test_quoted_figure_is_the_metrics_files(doc, quoted, file, key, fmt):
    figure = fmt.format(metric(file, key))
    assert quoted.format(figure) in doc_text(doc), f"{doc} should quote {quoted.format(figure)!r} (metrics/{file}: {key})"


def test_benchmarks_page_holds_the_report_verbatim():
    report = subprocess.run([sys.executable, "bench/report.py", "--metrics", "metrics"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout
    report = re.sub(r"[ \t]+\n", "\n", report).strip()
    assert report.startswith("#### 1.") and report in doc_text("docs/benchmarks.md"), \
        "docs/benchmarks.md: paste the output of `python bench/report.py`"


def test_learning_rate_table_is_the_sweeps():
    """docs/pipeline.md's table: train and val LM loss per rate, the best rate in bold, the aux loss quoted."""
    rows = {row["lr"]: row for row in metric("bench_lr_sweep.json", "rows")}
    best = metric("bench_lr_sweep.json", "best_lr")
    for lr, label in ((1e-3, "1e-3"), (3e-3, "3e-3"), (1e-2, "1e-2"), (3e-2, "3e-2")):
        bold = "**" if lr == best else ""
        cells = table_row("docs/pipeline.md", bold + label)
        assert cells[1] == f"{rows[lr]['train_lm_loss']:.3f}", (lr, cells)
        assert cells[2].split(" (")[0] == f"{rows[lr]['val_lm_loss']:.3f}", (lr, cells)
        if "aux loss" in cells[2]:
            assert f"aux loss {rows[lr]['aux_loss']:.2f}" in cells[2], (lr, cells)


def test_performance_tables_are_the_bench_files():
    ms = metric("bench_moe_layer.json", "results")
    ratios = metric("bench_moe_layer.json", "ratios")
    for label, variant in MOE_ROWS:
        cells = table_row("docs/performance.md", label)
        ratio = 1.0 if variant == "ours" else ratios[f"{variant}_over_ours"]
        assert cells[1:] == [f"{ms[variant]['ms']:.0f}" if isinstance(ms[variant], dict) else f"{ms[variant]:.0f}",
                             f"{ratio:.2f}"], (variant, cells)
    rows = {row["variant"]: row for row in metric("bench_train_variants.json", "rows")}
    for label, variant in VARIANT_ROWS:
        row = rows[variant]
        assert table_row("docs/performance.md", label)[1:] == [
            f"{row['tokens_per_s']:.1f}", f"{row['peak_rss_over_setup_gib']:.3f}", f"{row['last_loss']:.4f}"], variant


def test_configuration_table_names_every_params_key():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, keys in params.items():
        if not isinstance(keys, dict):
            cells = table_row("docs/configuration.md", "(top)")
            assert f"`{section}`" in cells[1], section
            continue
        cells = table_row("docs/configuration.md", f"`{section}`")
        missing = [key for key in keys if f"`{key}`" not in cells[1]]
        assert not missing, f"docs/configuration.md: the {section} row lacks {missing}"


def test_tiny_parameter_counts_are_the_planners():
    """README and experiments.md quote the tiny preset's parameter count with 4 and 8 experts; the planner's
    count (tested equal to the built model in tests/train/test_plan.py) gives them, for the preset's 512-token BPE."""
    import dataclasses

    from moechat.config.params import load_params
    from moechat.train.plan import count_params

    params = load_params(ROOT / "params.yaml", yaml.safe_load((ROOT / "presets" / "tiny.yaml").read_text()))
    vocab = params.tokenizer.vocab_size
    four, eight = (count_params(dataclasses.replace(params.model.architecture, num_experts=e), vocab).total
                   for e in (4, 8))
    assert f"total grows ({four:,} → {eight:,} in the tiny" in doc_text("docs/experiments.md")
    assert f"parameters grow ({round(eight, -3) // 1000}K vs {round(four, -3) // 1000}K)" in doc_text("README.md")


def test_the_reference_figures_quoted_in_the_docs_are_the_planners():
    """The reference model's size, its memory plan and its projected time are the planner's figures (torch-free
    code in the package, the same that `moechat plan` prints), at GPT-2's vocabulary of 50,257."""
    from moechat.config.params import load_params
    from moechat.train import plan

    params = load_params(ROOT / "params.yaml")
    arch, train = params.model.architecture, params.train
    counts = plan.count_params(arch, 50257)
    moe_layers = len(arch.moe_layer_indices())
    idle = moe_layers * (arch.num_experts - arch.num_experts_per_tok) * (2 * arch.n_embd * arch.n_inner
                                                                          + arch.n_inner + arch.n_embd)
    active = counts.total - idle
    assert f"| reference, vocab 50257 | {counts.total:,} | {active:,} |" in doc_text("docs/pipeline.md")
    assert f"{counts.total / 1e6:.0f}M parameters of which {active / 1e6:.0f}M are active" in doc_text("README.md")
    vocab = 50257 + plan.CHAT_TOKENS  # the chat tokens the prepare stage adds
    planned = f"{plan.estimate(arch, train, vocab, device_type='cuda').total_gb:.2f} GiB"
    for doc in ("docs/recipe.md", "docs/performance.md", "params.yaml"):
        assert planned in doc_text(doc), f"{doc} does not quote the reference plan, {planned}"
    minutes = plan.run_size(arch, train, vocab, plan.data_size(params.data, train.seq_len, None)).seconds / 60
    for doc in ("README.md", "docs/recipe.md", "params.yaml"):
        assert f"~{minutes:.0f} min" in doc_text(doc), f"{doc} does not quote the projected ~{minutes:.0f} min"
