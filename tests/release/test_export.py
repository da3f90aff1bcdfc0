"""export: the folder loads where moechat is not importable (trust_remote_code), chats through the template,
works with transformers.pipeline, shards, and carries a model card with measured figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import dataclasses

import pytest
import torch
import yaml
from safetensors.torch import load_file

from moechat.config.params import load_params
from moechat.release.export import ExportError, export_model, model_card, read_metrics
from tests.support.tiny import tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[2]

# Runs in a fresh interpreter where `import moechat` fails, as on a user's machine without this project.
OUTSIDE = textwrap.dedent('''
    import importlib.util, json, sys
    class _NoMoechat:
        def find_spec(self, name, path=None, target=None):
            if name == "moechat" or name.startswith("moechat."):
                raise ImportError("moechat is hidden in this test")
    sys.meta_path.insert(0, _NoMoechat())
    try:
        import moechat
        raise SystemExit("moechat is importable; the test would prove nothing")
    except ImportError:
        pass
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
    path = sys.argv[1]
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
    enc = tok.apply_chat_template([{"role": "user", "content": "Tell me about the sea."}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    text = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    pipe = pipeline("text-generation", model=model, tokenizer=tok, trust_remote_code=True)
    chat = pipe([{"role": "user", "content": "Hi"}], max_new_tokens=5, do_sample=False)
    logits = model(enc["input_ids"]).logits[0, -1].tolist()
    print(json.dumps({"class_module": type(model).__module__, "new_tokens": out.shape[1] - enc["input_ids"].shape[1],
                      "text": text, "chat": chat[0]["generated_text"], "logits": logits,
                      "eos": model.generation_config.eos_token_id, "pad": model.generation_config.pad_token_id}))
''')


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    tok = tiny_tokenizer()
    model = tiny_model(tok, seed=5)
    metrics_dir = tmp / "metrics"
    metrics_dir.mkdir()
    (metrics_dir / "eval.json").write_text(json.dumps({"loss": 2.5, "perplexity": 12.18, "accuracy": 0.41,
                                                       "tokens": 1234, "router": {"mean_cv": 0.2, "dead_experts": 1,
                                                                                  "dropped_share": 0.0, "mean_entropy": 1.3}}))
    (metrics_dir / "prepare.json").write_text(json.dumps({"train_blocks": 4321}))
    (metrics_dir / "train.json").write_text(json.dumps({"val_lm_loss": 3.25, "tokens_per_s": 987.5, "mfu": 0.31,
                                                        "peak_memory_gb": 1.5}))
    # Not export deps: a stale figure from these must never reach the card.
    for stage in ("download", "model", "quantize"):
        (metrics_dir / f"{stage}.json").write_text(json.dumps({f"{stage}_sentinel": 777777}))
    params = load_params(ROOT / "params.yaml")
    summary = export_model(model, tok, params, read_metrics(metrics_dir), tmp / "export", max_shard_size="200KB")
    return tmp / "export", model, tok, summary


def test_folder_layout_sharding_and_generation_config(exported):
    out, model, tok, summary = exported
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_moechat.MoeChatForCausalLM"
    assert config["model_type"] == "moechat"
    assert (out / "configuration_moechat.py").exists() and (out / "modeling_moechat.py").exists()
    assert len(summary["shards"]) > 1  # 200KB shards for a ~690KB model
    index = json.loads((out / "model.safetensors.index.json").read_text())
    state = {}
    for shard in summary["shards"]:
        state.update(load_file(str(out / shard)))
    assert set(index["weight_map"]) == set(state)
    for name, tensor in model.state_dict().items():
        assert torch.equal(state[name], tensor), name
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok.convert_tokens_to_ids("<|im_end|>")
    assert gen["pad_token_id"] == tok.convert_tokens_to_ids("<|pad|>")
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    template = tok_cfg.get("chat_template") or (out / "chat_template.jinja").read_text()
    assert "<|im_start|>" in template


def test_model_card_has_measured_counts_and_eval_metrics(exported):
    out, model, _, _ = exported
    card = (out / "README.md").read_text()
    counts = model.parameter_counts()
    assert f"| total | {counts['total']:,} |" in card
    assert f"| active per token | {counts['active']:,} |" in card
    assert "| perplexity | 12.18 |" in card
    assert "OpenAssistant/oasst1" in card and "| experts per MoE block | 4 |" in card


@pytest.mark.slow  # a subprocess through the entry point users run
def test_loads_and_chats_without_moechat(exported):
    out, model, tok, _ = exported
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH="")
    proc = subprocess.run([sys.executable, "-c", OUTSIDE, str(out)], capture_output=True, text=True, env=env,
                          cwd=out.parent, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip(), proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not result["class_module"].startswith("moechat")  # the folder's own code, not the package
    assert 1 <= result["new_tokens"] <= 8
    assert isinstance(result["text"], str)
    assert [m["role"] for m in result["chat"]] == ["user", "assistant"]
    assert result["eos"] == tok.eos_token_id and result["pad"] == tok.pad_token_id
    # Same weights, same code: the remote-code model computes what the in-process model computes.
    enc = tok.apply_chat_template([{"role": "user", "content": "Tell me about the sea."}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        expected = model(enc["input_ids"]).logits[0, -1]
    assert torch.allclose(torch.tensor(result["logits"]), expected, atol=1e-4)


def _front_matter(card: str) -> dict:
    return yaml.safe_load(card.split("---\n")[1])


def test_card_reads_only_the_metrics_export_depends_on(exported, tmp_path):
    out = exported[0]
    card = (out / "README.md").read_text()
    assert "| train blocks | 4,321 |" in card and "| val lm loss | 3.25 |" in card
    # figures of the machine, not the model: the card (an out that holds a model) hashes the same on a rerun
    assert "987.5" not in card and "| tokens per s |" not in card and "| peak memory gb |" not in card
    assert "| mfu |" not in card
    assert "sentinel" not in card and "777,777" not in card
    assert set(read_metrics(out.parent / "metrics")) == {"prepare", "train", "eval"}
    (tmp_path / "eval.json").write_text("{}")
    with pytest.raises(ExportError) as err:  # a one-line error naming the file and the stage that writes it
        read_metrics(tmp_path)
    assert str(err.value) == f"{tmp_path / 'prepare.json'}: not found; the model card needs it: run `dvc repro prepare`"


def test_card_datasets_come_from_data_source(exported, tmp_path):
    out, model, tok, _ = exported
    assert _front_matter((out / "README.md").read_text())["datasets"] == ["OpenAssistant/oasst1"]
    local = tmp_path / "my_chats.jsonl"
    local.write_text("")
    params = load_params(ROOT / "params.yaml")
    params = dataclasses.replace(params, data=dataclasses.replace(params.data, source=str(local)))
    card = model_card(model, tok, params, {})
    assert _front_matter(card)["datasets"] == ["my_chats.jsonl"]
    assert f"| seed | {params.seed:,} |" in card
