"""The MoE layer's expert paths: each forced on CPU equals the per-token reference in values and gradients,
and the host syncs each would make on a GPU are counted; the path chosen per device."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moechat.model.auto import MoeChatConfig
from moechat.model.modeling_moechat import EXPERT_PATHS, MoeChatSparseMoeBlock, expert_path_for

# Ops that wait for the device on a GPU: reading a value on the host, sizing an output by data, and the grouped
# matmul off sm90/sm100 (PyTorch's _grouped_mm_fallback copies the offsets to the host) or transformers' loop op.
HOST_READS = ("_local_scalar_dense", "nonzero", "bincount", "unique", "masked_select", "repeat_interleave")
GROUPED = ("_grouped_mm", "grouped_mm_fallback")


class GpuSyncs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if any(op in name for op in HOST_READS + GROUPED) and str(func) != "aten.repeat_interleave.self_int":
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def block_with(path: str, capacity_factor: float = 0.0) -> MoeChatSparseMoeBlock:
    torch.manual_seed(0)
    cfg = MoeChatConfig(n_embd=32, n_inner=64, n_head=2, n_layer=2, num_experts=4, num_experts_per_tok=2,
                        capacity_factor=capacity_factor, dropout=0.0)
    block = MoeChatSparseMoeBlock(cfg).train()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    block.expert_path = path
    return block


def run(block: MoeChatSparseMoeBlock, x: torch.Tensor, mask: torch.Tensor):
    x = x.clone().requires_grad_(True)
    with GpuSyncs() as syncs:
        y, r = block(x, mask)
        y.square().sum().backward()  # the router's own losses are tested elsewhere
    grads = [p.grad.clone() for p in block.parameters()]
    return y.detach(), x.grad, grads, syncs.calls, int(r.dropped)


def reference(block: MoeChatSparseMoeBlock, x: torch.Tensor, mask: torch.Tensor):
    """Per token, the renormalised top-k weighted sum of its experts' outputs, each expert module called."""
    x = x.clone().requires_grad_(True)
    rows = []
    for n, x_D in enumerate(x.reshape(-1, x.shape[-1])):
        if not mask.reshape(-1)[n]:
            rows.append(torch.zeros_like(x_D))
            continue
        probs = torch.softmax(block.router(x_D), dim=-1)
        w, idx = probs.topk(block.top_k)
        w = w / w.sum()
        rows.append(sum(w[j] * block.experts[int(e)](x_D[None])[0] for j, e in enumerate(idx)))
    y = torch.stack(rows).view_as(x)
    y.square().sum().backward()
    return y.detach(), x.grad


def inputs():
    x = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False  # a padded tail
    return x, mask


@pytest.mark.parametrize("path", EXPERT_PATHS)
def test_each_path_equals_the_per_token_reference_dropless(path):
    x, mask = inputs()
    y, dx, grads, _, _ = run(block_with(path), x, mask)
    ref_block = block_with(path)
    y_ref, dx_ref = reference(ref_block, x, mask)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-4, atol=1e-5)
    for (name, p), g in zip(ref_block.named_parameters(), grads):  # router and every expert
        expected = p.grad if p.grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(g, expected, rtol=1e-4, atol=5e-4, msg=name)  # gradients of size ~100


def test_paths_agree_with_capacity_drops():
    x, mask = inputs()
    results = {path: run(block_with(path, capacity_factor=0.5), x, mask) for path in EXPERT_PATHS}
    base = results["grouped_mm"]
    assert base[4] > 0  # some assignments were dropped
    for path in ("capacity_bmm", "loop"):
        y, dx, grads, _, dropped = results[path]
        assert dropped == base[4]
        torch.testing.assert_close(y, base[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dx, base[1], rtol=1e-4, atol=1e-5)
        for g, g_base in zip(grads, base[2]):
            torch.testing.assert_close(g, g_base, rtol=1e-4, atol=5e-4)  # gradients of size ~100


@pytest.mark.parametrize("capacity_factor", [0.0, 0.5])
def test_host_syncs_per_path(capacity_factor):
    """capacity_bmm waits for nothing; the grouped matmul is called 6 times per layer with backward (2 forward,
    input and weight gradients of each), a sync each off sm90/sm100; transformers' loop op reads the offsets on
    the host in each of its 2 forward and 2 backward calls."""
    x, mask = inputs()
    counts = {path: run(block_with(path, capacity_factor), x, mask)[3] for path in EXPERT_PATHS}
    assert counts["capacity_bmm"] == []
    assert counts["grouped_mm"] == ["_grouped_mm"] * 6
    assert counts["loop"] == ["grouped_mm_fallback"] * 2 + ["grouped_mm_fallback_backward"] * 2


def test_path_chosen_per_device(monkeypatch):
    """Native grouped matmul (sm90/sm100, bf16): grouped_mm. An sm89 card (RTX 4060 Ti): capacity routing goes
    sync-free through capacity_bmm; dropless keeps grouped_mm, whose syncs `test_host_syncs_per_path` counts."""
    cuda = torch.device("cuda")
    for cc, dtype, capped, path in [((9, 0), torch.bfloat16, False, "grouped_mm"),
                                    ((10, 0), torch.bfloat16, True, "grouped_mm"),
                                    ((8, 9), torch.bfloat16, True, "capacity_bmm"),
                                    ((8, 9), torch.bfloat16, False, "grouped_mm"),
                                    ((9, 0), torch.float32, True, "capacity_bmm")]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, cc=cc: cc)
        assert expert_path_for(cuda, dtype, capped) == path, (cc, dtype, capped)
    assert expert_path_for(torch.device("cpu"), torch.float32, True) == "grouped_mm"
