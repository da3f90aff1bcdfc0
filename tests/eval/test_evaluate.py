"""evaluate: packed-split metrics against conversation-by-conversation references, router statistics,
chat samples, and the stage script end to end."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moechat.errors import ConfigError
from moechat.config.params import EvalConfig
from moechat.data.chat_format import tokenize_conversation
from moechat.eval.evaluate import EvalDataError, evaluate, evaluate_lm, generate_samples, layer_metrics, share_rows
from moechat.eval.router_tally import RouterTally
from tests.support.tiny import conversations, packed, save_model, tiny_model, tiny_params, tiny_tokenizer, write_prepared

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(tok, seed=3)


def test_packed_loss_and_accuracy_equal_each_conversation_run_alone(tok, model):
    convs = conversations(6)
    metrics = evaluate_lm(model, packed(tok, convs), batch_size=2)
    nll, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for c in convs:
            t = tokenize_conversation(tok, c["messages"])
            logits = model(input_ids=torch.tensor([t.input_ids])).logits[0, :-1]
            targets = torch.tensor(t.labels[1:])
            keep = targets != -100
            nll += float(F.cross_entropy(logits[keep], targets[keep], reduction="sum"))
            correct += int((logits[keep].argmax(-1) == targets[keep]).sum())
            count += int(keep.sum())
    assert metrics["tokens"] == count
    assert metrics["loss"] == pytest.approx(nll / count, rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert metrics["accuracy"] == pytest.approx(correct / count)


def test_metrics_do_not_depend_on_batch_size(tok, model):
    ds = packed(tok, conversations(6))
    a, b = evaluate_lm(model, ds, batch_size=1), evaluate_lm(model, ds, batch_size=3)
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    assert a["layers"][0]["tokens_per_expert"] == b["layers"][0]["tokens_per_expert"]
    assert a["layers"][0]["entropy"] == pytest.approx(b["layers"][0]["entropy"], rel=1e-5)


def test_router_counts_cover_every_real_token_top_k_times(tok, model):
    convs = conversations(6)
    ds = packed(tok, convs)
    metrics = evaluate_lm(model, ds, batch_size=2)
    real_tokens = sum(len(tokenize_conversation(tok, c["messages"]).input_ids) for c in convs)
    (layer,) = metrics["layers"]
    assert layer["layer"] == 1  # moe_every=2: the second block
    assert sum(layer["tokens_per_expert"]) == real_tokens * model.config.num_experts_per_tok
    assert sum(layer["expert_share"]) == pytest.approx(1.0)
    assert 0.0 < layer["entropy"] <= math.log(4) + 1e-6
    rows = share_rows(metrics)
    assert [r["expert"] for r in rows] == [f"expert {e}" for e in range(4)]


def test_router_tally_sums_batches_as_one_batch_would(tok, model):
    """The one tally of train, evaluate and quantize: the sums over batches equal one forward over all rows
    (counts exactly, entropy weighted by assignments), on the rows the model's own outputs name."""
    ds = packed(tok, conversations(6))
    rows = ds[0:len(ds)]
    kwargs = dict(use_cache=False, output_router_stats=True)
    whole = RouterTally.for_model(model.config)
    whole.add(model(input_ids=rows["input_ids"], position_ids=rows["position_ids"], labels=rows["labels"], **kwargs))
    split = RouterTally.for_model(model.config)
    for b in range(len(ds)):
        row = ds[b:b + 1]
        split.add(model(input_ids=row["input_ids"], position_ids=row["position_ids"], labels=row["labels"], **kwargs))
    assert split.layers == whole.layers == model.config.moe_layer_indices() and split.batches == len(ds)
    assert torch.equal(split.tokens_per_expert_LE, whole.tokens_per_expert_LE)
    torch.testing.assert_close(split.entropy_sum_L, whole.entropy_sum_L, rtol=1e-5, atol=0)
    assert split.counts_by_layer() == {1: whole.tokens_per_expert_LE[0].tolist()}
    (shares,) = split.step_shares()
    assert shares["layer"] == 1 and sum(shares["expert_share"]) == pytest.approx(1.0)
    assert split.reduced(lambda t: 2 * t).tokens_per_expert_LE.tolist() == (2 * whole.tokens_per_expert_LE).tolist()
    assert RouterTally.for_model(model.config).counts_by_layer() == {}  # nothing added: no rows to report


def test_an_empty_val_split_is_a_one_line_error(model):
    with pytest.raises(EvalDataError, match=r"^the evaluation split is empty; rerun the prepare stage"):
        evaluate_lm(model, [], batch_size=2)


def test_layer_metrics_balanced_and_collapsed():
    balanced = layer_metrics(0, [10, 10, 10, 10], 0, 0.0, 0.01)
    assert balanced["cv"] == pytest.approx(0.0) and balanced["dead_experts"] == 0
    collapsed = layer_metrics(0, [40, 0, 0, 0], 8, 0.0, 0.01)
    # shares (1, 0, 0, 0): population std sqrt(3)/4 over mean 1/4 = sqrt(3)
    assert collapsed["cv"] == pytest.approx(math.sqrt(3))
    assert collapsed["dead_expert_ids"] == [1, 2, 3]
    assert collapsed["dropped_share"] == pytest.approx(8 / 40)
    # threshold is strict "below" threshold / E: a share exactly at it (0.4 / 4 = 0.1) is alive
    edge = layer_metrics(0, [1, 3, 3, 3], 0, 0.0, 0.4)
    assert edge["dead_experts"] == 0


def test_dead_experts_are_judged_against_the_uniform_share():
    # E=4, threshold 0.01: dead below 0.01 / 4 = 0.0025. Shares 0.005 and 0.002: only the second is dead
    # (an absolute 0.01 cut-off would call both dead).
    small = layer_metrics(0, [5000, 4030, 950, 20], 0, 0.0, 0.01)
    assert small["expert_share"][2:] == pytest.approx([0.095, 0.002])
    alive = layer_metrics(0, [5000, 4000, 950, 50], 0, 0.0, 0.01)
    assert alive["dead_experts"] == 0  # share 0.005 = 2% of the fair share 0.25
    assert small["dead_expert_ids"] == [3]
    # E=200, perfectly balanced: every share is 0.005 < 0.01, yet no expert is dead; one expert at 0.5% of
    # its fair share is.
    counts = torch.full((200,), 1000)
    assert layer_metrics(0, counts.tolist(), 0, 0.0, 0.01)["dead_experts"] == 0
    counts[7] = 5
    assert layer_metrics(0, counts.tolist(), 0, 0.0, 0.01)["dead_expert_ids"] == [7]


def test_samples_greedy_is_deterministic_and_seeded_sampling_repeats(tok, model):
    cfg = EvalConfig(max_new_tokens=6, temperature=1.0, top_p=0.9, prompts=("Tell me about the sea.", "More?"))
    a = generate_samples(model, tok, cfg, seed=7)
    b = generate_samples(model, tok, cfg, seed=7)
    assert [s["mode"].split()[0] for s in a] == ["greedy", "sample", "greedy", "sample"]
    assert a == b
    assert all(isinstance(s["response"], str) for s in a)


def test_max_new_tokens_beyond_the_model_is_a_named_error_before_the_val_pass(tok, model):
    cfg = EvalConfig(max_new_tokens=model.config.n_positions, prompts=("Hi?",))
    # An empty val split would fail in evaluate_lm: the params check must come first.
    with pytest.raises(ConfigError, match=r"eval\.max_new_tokens=128 must be < the model's n_positions=128"):
        evaluate(model, tok, [], cfg, seed=0)
    with pytest.raises(ConfigError, match=r"eval\.max_new_tokens=200 .* at most 127"):
        generate_samples(model, tok, EvalConfig(max_new_tokens=200, prompts=("Hi?",)), seed=0)
    ok = generate_samples(model, tok, EvalConfig(max_new_tokens=127, temperature=0.0, prompts=("Hi?",)), seed=0)
    assert len(ok) == 2  # n_positions - 1 still fits (the prompt is cut from the left to 1 token)


@pytest.mark.slow  # a subprocess through the entry point users run
def test_stage_writes_metrics_samples_and_plot_data(tok, tmp_path):
    model_dir = save_model(tiny_model(tok, seed=1), tok, tmp_path / "final")
    prepared = write_prepared(tok, tmp_path / "prepared")
    params = tiny_params(tmp_path / "params.yaml", eval={"max_new_tokens": 4, "prompts": ["Hi?"], "lm_eval_tasks": []})
    out = tmp_path / "metrics"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    subprocess.run([sys.executable, str(ROOT / "stages" / "evaluate.py"), "--model", str(model_dir), "--data",
                    str(prepared), "--metrics", str(out / "eval.json"), "--samples", str(out / "samples.json"),
                    "--plots", str(out / "eval"), "--params", str(params), "--device", "cpu"],
                   check=True, env=env, cwd=tmp_path)
    metrics = json.loads((out / "eval.json").read_text())
    assert metrics["tokens"] > 0 and math.isfinite(metrics["perplexity"])
    assert metrics["dead_expert_threshold"] == 0.01
    samples = json.loads((out / "samples.json").read_text())
    assert [s["prompt"] for s in samples] == ["Hi?", "Hi?"]
    shares = json.loads((out / "eval" / "expert_shares.json").read_text())
    assert len(shares) == 4 and sum(r["share"] for r in shares) == pytest.approx(1.0)
