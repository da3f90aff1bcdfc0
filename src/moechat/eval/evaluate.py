"""Evaluate a trained model: assistant-token loss and perplexity, next-token accuracy, router health per MoE
layer, and chat samples through the chat template.

Every figure is accumulated as sums over the whole split (never a mean of batch means), so the result does
not depend on the batch size. Router statistics come from the model's own `output_router_stats`, i.e. the
exact top-k assignments it made.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional, Sequence

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from moechat.eval.generate import check_max_new_tokens, generate_reply
from moechat.errors import MoechatError
from moechat.config.params import EvalConfig
from moechat.eval.router_tally import RouterTally
from moechat.eval.val_loss import count_batches, val_sums


class EvalDataError(MoechatError, ValueError):
    """The prepared val split cannot be evaluated; the message says which stage to rerun."""


def iter_batches(dataset: Any, batch_size: int, max_batches: Optional[int]) -> Iterable[dict[str, torch.Tensor]]:
    """Consecutive rows of a torch-formatted packed Dataset, `max_batches` at most (None = all)."""
    for b in range(count_batches(len(dataset), batch_size, max_batches)):
        yield dataset[b * batch_size:(b + 1) * batch_size]


def evaluate_lm(model: PreTrainedModel, dataset: Any, batch_size: int, max_batches: Optional[int] = None,
                dead_expert_threshold: float = 0.01, desc: str = "eval") -> dict[str, Any]:
    """Loss over assistant tokens (the targets of `moechat.data.labels`), perplexity, next-token accuracy and
    router statistics, from one `val_sums` pass.

    `dataset` rows hold `input_ids`, `labels`, `position_ids` (packed blocks; position ids restarting at
    0 keep attention inside each conversation). Returns a JSON-ready dict; `layers` has one entry per
    MoE layer (see `layer_metrics`).
    """
    if len(dataset) == 0:
        raise EvalDataError("the evaluation split is empty; rerun the prepare stage (dvc repro prepare) with "
                            "data that leaves data.val_fraction of the trees for validation")
    model.eval()
    device = next(model.parameters()).device
    router = RouterTally.for_model(model.config, device)
    batches = tqdm(iter_batches(dataset, batch_size, max_batches), desc=desc, disable=None,
                   total=count_batches(len(dataset), batch_size, max_batches))
    sums = val_sums(model, batches, device, accuracy=True, router=router).values()
    if sums["targets"] == 0:
        raise EvalDataError("the evaluation split has no assistant tokens (every label is -100); rerun the "
                            "prepare stage (dvc repro prepare)")
    loss = sums["nll"] / sums["targets"]
    metrics: dict[str, Any] = {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "accuracy": sums["correct"] / sums["targets"],
        "tokens": int(sums["targets"]),
        "batches": int(sums["batches"]),
    }
    return {**metrics, **router_metrics(router, dead_expert_threshold)}


def router_metrics(router: RouterTally, dead_expert_threshold: float) -> dict[str, Any]:
    """`layers` (one `layer_metrics` per MoE layer) and `router` (their averages); {} for a dense model."""
    layers = [layer_metrics(*sums, dead_expert_threshold) for sums in router.layer_sums()]
    if not layers:
        return {}
    return {"layers": layers, "router": {
        "mean_cv": sum(l["cv"] for l in layers) / len(layers),
        "dead_experts": sum(l["dead_experts"] for l in layers),
        "dropped_share": sum(l["dropped_share"] for l in layers) / len(layers),
        "mean_entropy": sum(l["entropy"] for l in layers) / len(layers),
    }}


def layer_metrics(layer: int, tokens_per_expert: Sequence[int], dropped: int, entropy_sum: float,
                  dead_expert_threshold: float) -> dict[str, Any]:
    """One MoE layer: expert shares (of all top-k assignments), their coefficient of variation
    (std / mean, population std; 0 = perfectly balanced), dead experts, the share of assignments dropped
    by capacity routing, and the mean router entropy in nats and relative to ln E. The arguments are one
    row of `RouterTally.layer_sums()`.

    `dead_expert_threshold` is a fraction of the uniform share 1/E: an expert is dead when its share is
    below `dead_expert_threshold / E` (0.01 = it gets under 1% of the tokens perfect balance would give
    it). Relative to 1/E so the same setting means the same thing for 4 or 200 experts; an absolute
    share would call every expert dead once 1/E drops under it."""
    counts = torch.tensor(list(tokens_per_expert), dtype=torch.float64)
    assigned = float(counts.sum())
    n_experts = counts.numel()
    shares = (counts / assigned) if assigned > 0 else torch.zeros_like(counts)
    mean = 1.0 / n_experts
    cv = float(shares.std(unbiased=False) / mean) if assigned > 0 else 0.0
    dead = [e for e in range(n_experts) if float(shares[e]) * n_experts < dead_expert_threshold]
    entropy = entropy_sum / assigned if assigned > 0 else 0.0
    return {
        "layer": layer,
        "expert_share": [float(s) for s in shares],
        "tokens_per_expert": [int(c) for c in tokens_per_expert],
        "cv": cv,
        "dead_experts": len(dead),
        "dead_expert_ids": dead,
        "dropped_share": dropped / assigned if assigned > 0 else 0.0,
        "entropy": entropy,
        "entropy_normalized": entropy / math.log(n_experts) if n_experts > 1 else 0.0,
    }


def share_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows `{layer, expert, share}` for the DVC bar/heatmap plot of expert shares."""
    return [{"slot": f"layer {l['layer']} / expert {e}", "layer": f"layer {l['layer']}", "expert": f"expert {e}",
             "share": share}
            for l in metrics.get("layers", []) for e, share in enumerate(l["expert_share"])]








def generate_samples(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cfg: EvalConfig,
                     seed: int) -> list[dict[str, Any]]:
    """Greedy and seeded-sampling replies to each of `cfg.prompts` (single-turn chats)."""
    check_max_new_tokens(model, cfg.max_new_tokens)
    samples = []
    for i, prompt in enumerate(tqdm(cfg.prompts, desc="samples", disable=None)):
        messages = [{"role": "user", "content": prompt}]
        greedy = generate_reply(model, tokenizer, messages, cfg.max_new_tokens)
        sampled = generate_reply(model, tokenizer, messages, cfg.max_new_tokens, cfg.temperature, cfg.top_p,
                                 seed=seed + i)
        samples.append({"prompt": prompt, "mode": "greedy", "response": greedy})
        samples.append({"prompt": prompt, "mode": f"sample (T={cfg.temperature}, top_p={cfg.top_p}, "
                                                  f"seed={seed + i})", "response": sampled})
    return samples


def evaluate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, val: Any, cfg: EvalConfig,
             seed: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The evaluate stage's work: val metrics (eval.json) and chat samples (samples.json)."""
    check_max_new_tokens(model, cfg.max_new_tokens)  # before the val pass, which can take minutes
    metrics = evaluate_lm(model, val, cfg.batch_size, cfg.max_batches, cfg.dead_expert_threshold)
    metrics["dead_expert_threshold"] = cfg.dead_expert_threshold
    samples = generate_samples(model, tokenizer, cfg, seed)
    return metrics, samples
