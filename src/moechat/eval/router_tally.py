"""One tally of router statistics, used by training (per optimizer step), evaluation and quantization.

The model returns its routing per forward as plain tensors with one row per MoE layer
(`output_router_stats=True`: `router_tokens_per_expert` [L, E], `router_dropped` [L], `router_entropy`
[L]). A `RouterTally` sums them over batches on the device they come from, so a loop pays no host sync
per batch; the readers below turn the sums into what each stage reports.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass
class RouterTally:
    """Router counts summed over batches; row i is MoE block `layers[i]` (`config.moe_layer_indices()`)."""

    layers: list[int]
    tokens_per_expert_LE: torch.Tensor  # int64: top-k assignments chosen per expert, before capacity
    dropped_L: torch.Tensor  # int64: assignments dropped by capacity routing (training mode only)
    entropy_sum_L: torch.Tensor  # float64: each batch's mean router entropy (nats) x its assignments
    batches: int = 0

    @classmethod
    def for_model(cls, config: Any, device: torch.device | str = "cpu") -> "RouterTally":
        """An empty tally for a model with this config (a MoeChatConfig), on the device of its outputs."""
        layers = config.moe_layer_indices()
        n_layers = len(layers)
        return cls(layers, torch.zeros(n_layers, config.num_experts, dtype=torch.long, device=device),
                   torch.zeros(n_layers, dtype=torch.long, device=device),
                   torch.zeros(n_layers, dtype=torch.float64, device=device))

    def add(self, out: Any) -> None:
        """Add one forward's `router_*` outputs (the model was called with output_router_stats=True)."""
        counts_LE = out.router_tokens_per_expert.detach().long()
        self.tokens_per_expert_LE += counts_LE
        self.dropped_L += out.router_dropped.detach().long()
        # weight each batch's mean entropy by its assignments, so the mean is over tokens, not batches
        self.entropy_sum_L += out.router_entropy.detach().double() * counts_LE.sum(-1).double()
        self.batches += 1

    def reduced(self, sum_over_processes: Callable[[torch.Tensor], torch.Tensor]) -> "RouterTally":
        """The tally summed over processes with the given all-reduce (e.g. accelerator.reduce, "sum")."""
        if not self.layers:
            return self
        return RouterTally(self.layers, sum_over_processes(self.tokens_per_expert_LE),
                           sum_over_processes(self.dropped_L), sum_over_processes(self.entropy_sum_L),
                           self.batches)

    def step_shares(self) -> list[dict[str, Any]]:
        """Per MoE layer: block index, each expert's share of the assignments and the dropped share (the
        training curves); one host sync for all layers."""
        if not self.layers:
            return []
        counts_LE = self.tokens_per_expert_LE.float()
        assigned_L1 = counts_LE.sum(-1, keepdim=True).clamp(min=1)
        rows = torch.cat([counts_LE / assigned_L1, self.dropped_L.float().unsqueeze(-1) / assigned_L1], -1).tolist()
        return [{"layer": layer, "expert_share": row[:-1], "dropped_share": row[-1]}
                for layer, row in zip(self.layers, rows)]

    def counts_by_layer(self) -> dict[int, list[int]]:
        """Assignments per expert, keyed by block index; {} when nothing was added."""
        if self.batches == 0:
            return {}
        return dict(zip(self.layers, self.tokens_per_expert_LE.tolist()))

    def layer_sums(self) -> list[tuple[int, list[int], int, float]]:
        """Per MoE layer, on the host: (block index, assignments per expert, dropped, entropy sum)."""
        return list(zip(self.layers, self.tokens_per_expert_LE.tolist(), self.dropped_L.tolist(),
                        self.entropy_sum_L.tolist()))
