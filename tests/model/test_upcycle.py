"""The init stage: config from params + tokenizer, seeded GPT-2 init, sparse upcycling, the saved folder."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
)

from moechat.config.params import ModelConfig
from moechat.model.configuration_moechat import MoeChatConfig
from moechat.model.upcycle import (UpcycleError, build_config, init_scratch, initialize, load_dense_parent, parent_layers, upcycle)

ROOT = Path(__file__).resolve().parents[2]
PARENT_VOCAB = 40


def make_tokenizer(n_words: int = PARENT_VOCAB) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose first n_words ids play the dense parent's vocabulary, plus chat tokens."""
    vocab = {f"w{i}": i for i in range(n_words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|pad|>")
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    return fast


def tiny_params(init_from=None, init_layers=None, upcycle_reinit_ratio=0.5, **shape) -> ModelConfig:
    shape = {**dict(n_positions=32, n_embd=32, n_layer=2, n_head=4, n_inner=128, num_experts=4,
                    num_experts_per_tok=2), **shape}
    return ModelConfig(init_from, init_layers, upcycle_reinit_ratio, architecture=MoeChatConfig(**shape))


def dense_parent(n_layer: int = 2, seed: int = 0, tied: bool = True) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=PARENT_VOCAB, n_positions=32, n_embd=32, n_layer=n_layer, n_head=4,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=tied,
                        bos_token_id=None, eos_token_id=None)
    return GPT2LMHeadModel(config).eval()


def test_build_config_takes_vocab_and_special_ids_from_tokenizer():
    tok = make_tokenizer()
    config = build_config(tiny_params(num_experts_per_tok=1), tok)
    assert config.vocab_size == len(tok) == PARENT_VOCAB + 3
    assert config.pad_token_id == tok.convert_tokens_to_ids("<|pad|>")
    assert config.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert config.num_experts_per_tok == 1 and config.moe_layers == [1]


def test_scratch_init_is_seeded_and_scales_residual_projections():
    config = build_config(tiny_params(n_layer=4, n_embd=64, n_inner=256), make_tokenizer())
    a, b, c = init_scratch(config, 1), init_scratch(config, 1), init_scratch(config, 2)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.transformer.wte.weight, c.transformer.wte.weight)
    std = 0.02 / math.sqrt(2 * 4)
    expert = a.transformer.h[1].mlp.experts[2]
    for residual in (a.transformer.h[0].attn.c_proj, a.transformer.h[0].mlp.c_proj, expert.c_proj):
        assert residual.weight.std().item() == pytest.approx(std, rel=0.05)
        assert torch.all(residual.bias == 0)
    assert expert.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert a.transformer.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)


@pytest.mark.parametrize("top_k", [1, 2])
def test_upcycled_model_reproduces_its_dense_parent(top_k):
    parent = dense_parent()
    config = build_config(tiny_params(num_experts_per_tok=top_k), make_tokenizer())
    model = upcycle(config, parent, seed=0).eval()
    x = torch.randint(0, PARENT_VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(x).logits
        theirs = parent(x).logits
    torch.testing.assert_close(ours[..., :PARENT_VOCAB], theirs, rtol=1e-5, atol=1e-5)
    experts = model.transformer.h[1].mlp.experts
    assert all(torch.equal(e.c_fc.weight, experts[0].c_fc.weight) for e in experts)
    torch.testing.assert_close(experts[0].c_fc.weight, parent.transformer.h[1].mlp.c_fc.weight.t())
    assert model.transformer.h[1].mlp.router.weight.std() > 0  # fresh router, not copied zeros
    new_rows = model.transformer.wte.weight[PARENT_VOCAB:]
    torch.testing.assert_close(new_rows, parent.transformer.wte.weight.mean(0).expand_as(new_rows))


def test_upcycle_copies_an_untied_parent_head_and_refuses_to_tie_it():
    parent = dense_parent(tied=False)
    assert not torch.equal(parent.lm_head.weight, parent.transformer.wte.weight)
    model = upcycle(build_config(tiny_params(), make_tokenizer()), parent, seed=0).eval()
    x = torch.randint(0, PARENT_VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits[..., :PARENT_VOCAB], parent(x).logits, rtol=1e-5, atol=1e-5)
    new_rows = model.lm_head.weight[PARENT_VOCAB:]
    torch.testing.assert_close(new_rows, parent.lm_head.weight.mean(0).expand_as(new_rows))
    with pytest.raises(UpcycleError, match="model.tie_word_embeddings=true"):
        upcycle(build_config(tiny_params(tie_word_embeddings=True), make_tokenizer()), parent, seed=0)


def assert_block_is_a_copy(block, parent_block) -> None:
    torch.testing.assert_close(block.attn.c_attn.weight, parent_block.attn.c_attn.weight.t(), rtol=0, atol=0)
    torch.testing.assert_close(block.attn.c_proj.bias, parent_block.attn.c_proj.bias, rtol=0, atol=0)
    torch.testing.assert_close(block.ln_1.weight, parent_block.ln_1.weight, rtol=0, atol=0)
    for mlp in (block.mlp.experts if block.is_moe else [block.mlp]):
        torch.testing.assert_close(mlp.c_fc.weight, parent_block.mlp.c_fc.weight.t(), rtol=0, atol=0)
        torch.testing.assert_close(mlp.c_proj.weight, parent_block.mlp.c_proj.weight.t(), rtol=0, atol=0)


def test_default_parent_blocks_are_evenly_spaced_keeping_first_and_last():
    assert parent_layers(8, 24) == [0, 3, 7, 10, 13, 16, 20, 23]  # gpt2-medium into the reference depth
    assert parent_layers(2, 2) == [0, 1] and parent_layers(1, 12) == [11] and parent_layers(3, 3) == [0, 1, 2]


@pytest.mark.parametrize("init_layers, expected", [(None, [0, 3, 5]), ((1, 2, 4), [1, 2, 4])])
def test_upcycle_copies_the_selected_parent_blocks(init_layers, expected):
    parent = dense_parent(n_layer=6)
    model = upcycle(build_config(tiny_params(n_layer=3, moe_every=1), make_tokenizer()), parent, seed=0,
                    init_layers=init_layers)
    for block, parent_index in zip(model.transformer.h, expected):
        assert_block_is_a_copy(block, parent.transformer.h[parent_index])
    others = set(range(6)) - set(expected)
    for block in model.transformer.h:  # and not one of the others (they all differ: random init)
        assert not any(torch.equal(block.ln_1.weight, parent.transformer.h[o].ln_1.weight)
                       and torch.equal(block.attn.c_attn.weight, parent.transformer.h[o].attn.c_attn.weight.t())
                       for o in others)
    torch.testing.assert_close(model.transformer.ln_f.weight, parent.transformer.ln_f.weight)


def test_init_layers_beyond_the_parent_is_a_named_error():
    with pytest.raises(UpcycleError, match=r"model.init_layers=\[0, 1, 6\] must name 3 blocks .* 0..5"):
        upcycle(build_config(tiny_params(n_layer=3), make_tokenizer()), dense_parent(n_layer=6), seed=0,
                init_layers=(0, 1, 6))


def test_drop_upcycling_reinitialises_a_different_share_of_units_per_expert():
    parent = dense_parent()
    model = upcycle(build_config(tiny_params(), make_tokenizer()), parent, seed=0, reinit_ratio=0.5)
    dense_fc = parent.transformer.h[1].mlp.c_fc.weight.t()  # [n_inner, n_embd]
    dense_proj = parent.transformer.h[1].mlp.c_proj.weight.t()  # [n_embd, n_inner]
    changed_sets = []
    for expert in model.transformer.h[1].mlp.experts:
        changed = (expert.c_fc.weight != dense_fc).any(dim=1)
        assert int(changed.sum()) == 64  # 0.5 x n_inner=128 units, every other row an exact copy
        assert torch.equal((expert.c_proj.weight != dense_proj).any(dim=0), changed)  # the same units
        fresh = expert.c_fc.weight[changed]
        assert fresh.std().item() == pytest.approx(dense_fc.std().item(), rel=0.15)
        torch.testing.assert_close(expert.c_fc.bias, parent.transformer.h[1].mlp.c_fc.bias)
        changed_sets.append(frozenset(changed.nonzero().flatten().tolist()))
    assert len(set(changed_sets)) == 4  # a different draw per expert
    assert_block_is_a_copy(model.transformer.h[0], parent.transformer.h[0])  # dense blocks are untouched


def expert_weights(model) -> list[torch.Tensor]:
    return [torch.cat([e.c_fc.weight.flatten(), e.c_proj.weight.flatten()]).detach().clone()
            for e in model.transformer.h[1].mlp.experts]


@pytest.mark.parametrize("reinit_ratio", [0.0, 0.5])
def test_experts_of_a_layer_are_no_longer_equal_after_a_few_steps(reinit_ratio):
    """Exact copies give the router no LM-loss gradient (every choice computes the same MLP); with
    Drop-Upcycling it gets one at step 0, and after a few steps no two experts are equal."""
    parent = dense_parent()
    config = build_config(tiny_params(num_experts_per_tok=2, aux_loss_coef=0.0, z_loss_coef=0.0), make_tokenizer())
    model = upcycle(config, parent, seed=0, reinit_ratio=reinit_ratio).train()
    x = torch.randint(0, PARENT_VOCAB, (4, 16), generator=torch.Generator().manual_seed(5))
    model(input_ids=x, labels=x).loss.backward()
    router_grad = model.transformer.h[1].mlp.router.weight.grad.abs().max().item()
    if reinit_ratio == 0:
        assert router_grad < 1e-6
        return
    assert router_grad > 1e-4
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = expert_weights(model)
    for _ in range(3):
        optimizer.step()
        optimizer.zero_grad()
        model(input_ids=x, labels=x).loss.backward()
    after = expert_weights(model)
    assert all(not torch.equal(a, b) for a, b in zip(before, after))  # every expert was trained
    assert all(not torch.allclose(after[i], after[j]) for i in range(4) for j in range(i + 1, 4))


@pytest.mark.parametrize("overrides, key", [
    ({"n_embd": 64}, "model.n_embd=64"),
    ({"n_inner": 64}, "model.n_inner=64"),
    ({"n_head": 8}, "model.n_head=8"),
    ({"n_layer": 4}, "model.n_layer=4"),
    ({"n_positions": 64}, "model.n_positions=64"),
])
def test_upcycle_dimension_mismatch_is_a_named_error(overrides, key):
    config = build_config(tiny_params(**overrides), make_tokenizer())
    with pytest.raises(UpcycleError, match=key):
        upcycle(config, dense_parent(), seed=0)


def test_upcycle_rejects_a_smaller_vocabulary():
    config = build_config(tiny_params(), make_tokenizer(n_words=20))
    with pytest.raises(UpcycleError, match="tokenizer has 23 tokens"):
        upcycle(config, dense_parent(), seed=0)


def test_load_dense_parent_errors_name_the_key(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(UpcycleError, match="model.init_from=.*is a file"):
        load_dense_parent(str(tmp_path / "weights.bin"))
    with pytest.raises(UpcycleError, match="model.init_from="):
        load_dense_parent(str(tmp_path / "missing_dir"))


def test_load_dense_parent_rejects_a_checkpoint_with_missing_tensors(tmp_path):
    dense_parent().save_pretrained(tmp_path / "parent")
    weights = tmp_path / "parent" / "model.safetensors"
    tensors = load_file(weights)
    assert "transformer.h.1.mlp.c_fc.weight" in tensors
    # Old GPT-2 checkpoints (the Hub's gpt2-*) also carry the causal-mask buffers `attn.bias`, which
    # transformers ignores by design: they must not count as a problem.
    tensors["transformer.h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 32, 32))
    save_file(tensors, weights, metadata={"format": "pt"})
    assert isinstance(load_dense_parent(str(tmp_path / "parent")), GPT2LMHeadModel)
    save_file({k: v for k, v in tensors.items() if not k.startswith("transformer.h.1.mlp.")}, weights,
              metadata={"format": "pt"})
    with pytest.raises(UpcycleError, match=r"missing keys: transformer\.h\.1\.mlp\.c_fc\.bias, "
                                           r"transformer\.h\.1\.mlp\.c_fc\.weight, transformer\.h\.1\.mlp\.c_proj"):
        load_dense_parent(str(tmp_path / "parent"))


def test_initialize_upcycles_from_a_local_folder_and_writes_a_loadable_model(tmp_path):
    parent = dense_parent()
    parent.save_pretrained(tmp_path / "parent")
    tokenizer = make_tokenizer()
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    report = initialize(tiny_params(init_from=str(tmp_path / "parent"), upcycle_reinit_ratio=0.0), seed=3,
                        seq_len=16, tokenizer_dir=tmp_path / "tokenizer", out_dir=tmp_path / "init")
    assert report["layers"] == ["dense", "moe"] and report["moe_layers"] == [1]
    assert report["upcycling"] == {"parent_layers": [0, 1], "parent_n_layer": 2, "reinit_ratio": 0.0}
    assert report["params"]["active"] < report["params"]["total"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "init").eval()
    x = torch.randint(0, PARENT_VOCAB, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits[..., :PARENT_VOCAB], parent(x).logits, rtol=1e-5, atol=1e-5)
    assert len(AutoTokenizer.from_pretrained(tmp_path / "init")) == len(tokenizer)
    assert report["train_flops_per_token"] == model.flops_per_token(16)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".init")]  # no temp folder left


@pytest.mark.slow  # a subprocess through the entry point users run
def test_init_stage_script_writes_model_and_metrics(tmp_path):
    make_tokenizer().save_pretrained(tmp_path / "tokenizer")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"].update(init_from=None, n_positions=32, n_embd=32, n_layer=4, n_head=4, n_inner=64,
                           num_experts=4)
    params["train"]["seq_len"] = 32
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    cmd = [sys.executable, str(ROOT / "stages" / "init.py"), "--tokenizer", "tokenizer", "--out", "models/init",
           "--metrics", "metrics/model.json", "--params", "params.yaml"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=180,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("init: scratch -> models/init")
    metrics = json.loads((tmp_path / "metrics" / "run" / "model.json").read_text())  # the layout is a run fact
    assert metrics["layers"] == ["dense", "moe", "dense", "moe"]
    config = MoeChatConfig.from_pretrained(tmp_path / "models" / "init")
    assert config.n_layer == 4 and config.pad_token_id == 41


def test_unreachable_hub_parent_fails_fast_and_names_the_key(monkeypatch):
    """A Hub id for model.init_from is checked before from_pretrained, which would retry for minutes."""
    import httpx2
    from huggingface_hub import HfApi

    from moechat.hub import HubError
    from moechat.model.upcycle import load_dense_parent

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)

    def unreachable(self, repo_id, **kwargs):
        raise httpx2.ConnectError("[Errno 101] Network is unreachable")

    monkeypatch.setattr(HfApi, "model_info", unreachable)
    with pytest.raises(HubError, match=r"model\.init_from='gpt2-medium'"):
        load_dense_parent("gpt2-medium")
