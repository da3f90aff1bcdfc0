"""One label convention: IGNORE is defined once, is what the model ignores, and `target_mask` picks exactly the
positions the model's loss counts."""

from __future__ import annotations

import ast
from pathlib import Path

import torch
import torch.nn.functional as F

from moechat.data.labels import IGNORE, target_mask
from moechat.model.auto import MoeChatConfig, MoeChatForCausalLM

SRC = Path(__file__).resolve().parents[2] / "src" / "moechat"
SELF_CONTAINED = {"labels.py", "modeling_moechat.py"}  # the definition, and the file that imports nothing of ours


def minus_100_literals(path: Path) -> list[int]:
    return [node.lineno for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub)
            and isinstance(node.operand, ast.Constant) and node.operand.value == 100]


def test_the_ignore_label_is_spelled_once_in_the_library():
    found = {str(p.relative_to(SRC)): lines for p in sorted(SRC.rglob("*.py"))
             if p.name not in SELF_CONTAINED and (lines := minus_100_literals(p))}
    assert found == {}, f"-100 written out instead of moechat.data.labels.IGNORE: {found}"


def test_target_mask_is_what_the_model_loss_counts():
    torch.manual_seed(0)
    model = MoeChatForCausalLM(MoeChatConfig(vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                             n_inner=32, num_experts=2, num_experts_per_tok=1, moe_every=1,
                                             pad_token_id=0, eos_token_id=1)).eval()
    input_ids = torch.randint(2, 40, (2, 12), generator=torch.Generator().manual_seed(1))
    labels = input_ids.clone()
    labels[0, :5] = IGNORE
    labels[1, 8:] = IGNORE
    with torch.no_grad():
        out = model(input_ids=input_ids, labels=labels, num_items_in_batch=1)
    keep = target_mask(labels)
    assert keep.shape == (2, 11) and int(keep.sum()) == 7 + 7
    expected = F.cross_entropy(out.logits[:, :-1][keep].float(), labels[:, 1:][keep], reduction="sum")
    torch.testing.assert_close(out.lm_loss, expected)
