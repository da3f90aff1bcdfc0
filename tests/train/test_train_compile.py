"""train.compile (one graph per block), and what train does to the engine's outputs."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo as dynamo
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from moechat.errors import ConfigError
from moechat.config.params import params_from_dict
from moechat.train.engine import compile_blocks, drop_fp32_output_copy
from tests.support.modeling import tiny_model, tokens


@pytest.mark.parametrize("capacity_factor", [0.0, 0.75])
@pytest.mark.parametrize("autocast", [False, True])
def test_every_block_is_one_graph(capacity_factor, autocast):
    """torch._dynamo.explain over each block (dense and MoE, padding mask on): no graph break."""
    model = tiny_model(capacity_factor=capacity_factor).train()
    x = torch.randn(2, 8, 32, requires_grad=True)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, 5:] = False
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        for block in model.transformer.h:
            dynamo.reset()
            explained = dynamo.explain(block)(x, mask_B1TK=None, token_mask_BT=mask, past_key_values=None)
            assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_compiled_blocks_keep_names_and_match_eager():
    """Captured graphs + AOT autograd (aot_eager: inductor's code generation is torch's to test, and takes
    minutes on two cores) give the eager loss and gradients; the names checkpoints use are unchanged."""
    eager = tiny_model().train()
    compiled = tiny_model().train()
    compile_blocks(compiled, backend="aot_eager")
    assert list(compiled.state_dict()) == list(eager.state_dict())
    x = tokens(16, seed=4)
    out_eager, out_compiled = eager(x, labels=x), compiled(x, labels=x)
    torch.testing.assert_close(out_compiled.loss, out_eager.loss, rtol=1e-5, atol=1e-6)
    out_eager.loss.backward()
    out_compiled.loss.backward()
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_train_compile_is_a_validated_bool():
    from tests.support.params import with_change

    assert params_from_dict(with_change("train", "compile", True)).train.compile is True
    with pytest.raises(ConfigError, match=r"train.compile='yes' must be of type bool"):
        params_from_dict(with_change("train", "compile", "yes"))


def test_mixed_precision_keeps_autocast_but_no_fp32_copy_of_logits():
    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(mixed_precision="bf16", cpu=True)
    model = accelerator.prepare(tiny_model())
    x = tokens(8, seed=5)
    assert model.eval()(x).logits.dtype == torch.float32  # accelerate's wrapper upcast the bf16 logits
    drop_fp32_output_copy(model)
    out = model.eval()(x, labels=x)
    assert out.logits.dtype == torch.bfloat16  # autocast still on, no fp32 copy
    assert out.loss.dtype == torch.float32
    AcceleratorState._reset_state(reset_partial_state=True)
