"""Training's attention backend: chosen by device, refused in one line where it cannot run, and equal to sdpa."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moechat.train.backends import resolve_attention
from moechat.errors import ConfigError
from moechat.config.params import load_params
from moechat.model.auto import MoeChatConfig, MoeChatForCausalLM

PARAMS = Path(__file__).resolve().parents[2] / "params.yaml"


def test_auto_skips_masked_tiles_on_cuda_and_keeps_sdpa_on_cpu():
    assert resolve_attention("auto", "cuda", flash_installed=False) == "flex_attention"
    assert resolve_attention("auto", "cuda", flash_installed=True) == "flash_attention_2"
    assert resolve_attention("auto", "cuda", flash_installed=True, precision="fp32") == "flex_attention"
    assert resolve_attention("auto", "cpu", flash_installed=True) == "sdpa"
    assert resolve_attention("sdpa", "cuda", flash_installed=True) == "sdpa"


@pytest.mark.parametrize("requested, device, flash, precision, line", [
    ("flex_attention", "cpu", False, "fp32",
     "params.yaml: train.attn_implementation=flex_attention cannot train on cpu: torch's FlexAttention has no "
     "backward there; use auto or sdpa"),
    ("flash_attention_2", "cpu", True, "fp32",
     "params.yaml: train.attn_implementation=flash_attention_2 needs a CUDA GPU (this run is on cpu); use auto or "
     "sdpa"),
    ("flash_attention_2", "cuda", False, "bf16",
     "params.yaml: train.attn_implementation=flash_attention_2 but flash-attn is not installed: `pip install "
     "flash-attn --no-build-isolation`, or use auto (flex_attention)"),
    ("flash_attention_2", "cuda", True, "fp32",
     "params.yaml: train.attn_implementation=flash_attention_2 computes in bf16/fp16 only, and train.precision is "
     "fp32; use train.precision: bf16, or auto / flex_attention"),
])
def test_a_backend_that_cannot_run_is_refused_in_one_line(requested, device, flash, precision, line):
    with pytest.raises(ConfigError) as err:
        resolve_attention(requested, device, flash, precision)
    assert str(err.value) == line


def test_params_refuse_an_unknown_backend():
    with pytest.raises(ConfigError, match=r"train.attn_implementation='eagerr' is not one of auto \| sdpa \| "
                                          r"flex_attention \| flash_attention_2; pick one of those"):
        load_params(PARAMS, {"train": {"attn_implementation": "eagerr"}})


def test_flex_attention_loss_equals_sdpa_on_packed_rows(monkeypatch):
    """Packed rows (position ids restart): flex_attention with transformers' document block mask gives sdpa's
    loss. Forward only, and the eager FlexAttention (torch.compile patched out to keep CI fast): torch 2.13 has
    no FlexAttention backward on CPU, so the gradient equality is checked on a GPU by bench/gpu_check.py."""
    monkeypatch.setattr(torch, "compile", lambda fn=None, **kw: fn if fn is not None else (lambda f: f))
    cfg = MoeChatConfig(vocab_size=128, n_positions=64, n_embd=32, n_layer=2, n_head=2, n_inner=64, num_experts=2,
                        num_experts_per_tok=1, moe_every=2, pad_token_id=None)
    torch.manual_seed(0)
    model = MoeChatForCausalLM(cfg).train()
    ids = torch.randint(0, 128, (2, 64), generator=torch.Generator().manual_seed(0))
    packed = torch.cat([torch.arange(40), torch.arange(24)]).expand(2, 64)
    with torch.no_grad():
        sdpa = model(input_ids=ids, position_ids=packed, labels=ids, use_cache=False).loss
        model.set_attn_implementation("flex_attention")
        flex = model(input_ids=ids, position_ids=packed, labels=ids, use_cache=False).loss
        model.set_attn_implementation("sdpa")
        unpacked = model(input_ids=ids, labels=ids, use_cache=False).loss  # one document a row: differs
    torch.testing.assert_close(flex, sdpa, rtol=1e-5, atol=1e-5)
    assert not torch.isclose(unpacked, sdpa)
