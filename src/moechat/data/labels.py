"""What a label means, defined once for the data, training and evaluation code.

A packed row's `labels` hold the token id where a position is trained on (assistant content and its
<|im_end|>) and `IGNORE` everywhere else (prompts, turn headers, the pad tail). The model shifts them:
the label at t + 1 is predicted at t. `modeling_moechat.py` spells the same value as the literal -100
(transformers' `ignore_index`), since that file imports nothing of this package.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

IGNORE = -100


def target_mask(labels_BT: torch.Tensor) -> torch.Tensor:
    """[B, T - 1] True where a position carries a loss after the model's shift (label t + 1, predicted at t)."""
    return labels_BT[:, 1:] != IGNORE
