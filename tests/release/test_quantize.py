"""quantize: GPTQ on a tiny MoeChat model — on-disk format, MoE calibration counts, the RTN fallback,
reload + generate on CPU through GPTQModel, and the fp vs 4-bit perplexity."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from moechat.config.params import QuantizeConfig
from moechat.data.chat_format import load_packed
import moechat.release.quantize
from moechat.model.gptq import QuantizeError, load_quantized
from moechat.model.folder import load_tokenizer
from moechat.release.quantize import (GPTQMODEL_LOG, calibration_set, dequantize_gptq, qmodel_class, quantize_stage, quantized_tensor_names, read_conversations, router_token_counts, run_gptq)
from moechat.quiet import library_output
from tests.support.tiny import save_model, tiny_model, tiny_params, tiny_tokenizer, write_prepared
from moechat.release.export import AUTO_MAP

ROOT = Path(__file__).resolve().parents[2]

CFG = QuantizeConfig(bits=4, group_size=32, desc_act=False, sym=True, calib_samples=8, calib_max_tokens=64,
                     min_expert_tokens=4)


def _dead_experts_model(tok):
    """Block 1's router always picks experts 0 and 1: LayerNorm output is the constant b, and the router rows
    score b as 10, 5, 0, -10. Experts 2 and 3 receive no calibration token."""
    model = tiny_model(tok, seed=4)
    b = torch.zeros(model.config.n_embd)
    b[0] = 1.0
    with torch.no_grad():
        block = model.transformer.h[1]
        block.ln_2.weight.fill_(1e-3)
        block.ln_2.bias.copy_(b)
        block.mlp.router.weight.zero_()
        for e, score in enumerate((10.0, 5.0, 0.0, -10.0)):
            block.mlp.router.weight[e] = score * b
    return model


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """"normal" and "top1" (top-1 routing) through the library function, "dead" through the stage script (metrics
    and experts files)."""
    tmp = tmp_path_factory.mktemp("quantize")
    tok = tiny_tokenizer()
    out = {}
    for name, model in (("normal", tiny_model(tok, seed=2)), ("top1", tiny_model(tok, seed=2, num_experts_per_tok=1)),
                        ("dead", _dead_experts_model(tok))):
        folder = save_model(model, tok, tmp / name / "export")
        prepared = write_prepared(tok, tmp / name / "prepared")
        if name != "dead":
            metrics, experts = quantize_stage(folder, prepared / "conversations_train.jsonl",
                                              load_packed(prepared, "val"), CFG, seed=1337,
                                              out_dir=tmp / name / "quantized", log_dir=tmp / name / "metrics/run/quantize_gptq")
        else:
            params = tiny_params(tmp / "params.yaml", seed=1337, quantize=dataclasses.asdict(CFG))
            files = tmp / name / "metrics"
            proc = subprocess.run([sys.executable, str(ROOT / "stages" / "quantize.py"), "--model", str(folder),
                                   "--data", str(prepared), "--out", str(tmp / name / "quantized"),
                                   "--metrics", str(files / "quantize.json"), "--experts", str(files / "experts.json"),
                                   "--params", str(params), "--device", "cpu"],
                                  env=dict(os.environ, HF_HUB_OFFLINE="1"), cwd=tmp, capture_output=True, text=True,
                                  check=False)
            assert proc.returncode == 0, proc.stderr[-3000:]
            out["stage_output"] = proc
            metrics = {**json.loads((files / "quantize.json").read_text()),  # what the stage reported, both files
                       **json.loads((files / "run" / "quantize.json").read_text())}
            experts = json.loads((files / "experts.json").read_text())
        out[name] = (model, tok, tmp / name / "quantized", metrics, prepared, experts)
    return out


def gptq_logs(run, name: str) -> Path:
    """GPTQModel's console log and quant_log.csv: run facts, beside the metrics (the stage's default
    --log-dir for "dead"), never inside the quantized folder."""
    return run[name][2].parent / "metrics" / "run" / "quantize_gptq"


@pytest.mark.slow
def test_standard_gptq_format_on_disk(run):
    model, _, qdir, metrics, _, _ = run["normal"]
    config = json.loads((qdir / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP  # every Auto class, as in the export (GPTQModel writes two)
    qcfg = config["quantization_config"]
    assert qcfg["quant_method"] == "gptq"
    assert (qcfg["bits"], qcfg["group_size"], qcfg["desc_act"], qcfg["sym"]) == (4, 32, False, True)
    tensors = {}
    for shard in qdir.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            tensors.update({k: f.get_slice(k).get_shape() for k in f.keys()})
    quantized = ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_fc",
                 "transformer.h.0.mlp.c_proj", "transformer.h.1.attn.c_attn", "transformer.h.1.attn.c_proj"]
    quantized += [f"transformer.h.1.mlp.experts.{e}.{m}" for e in range(4) for m in ("c_fc", "c_proj")]
    for name in quantized:
        linear = model.get_submodule(name)
        out_f, in_f = linear.weight.shape
        assert tensors[f"{name}.qweight"] == [in_f * 4 // 32, out_f]
        assert tensors[f"{name}.qzeros"] == [in_f // 32, out_f * 4 // 32]
        assert tensors[f"{name}.scales"] == [in_f // 32, out_f]
        assert tensors[f"{name}.g_idx"] == [in_f]
        assert f"{name}.weight" not in tensors
    for name in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.h.1.mlp.router.weight",
                 "transformer.h.0.ln_1.weight", "transformer.ln_f.weight", "lm_head.weight"):
        assert name in tensors, f"{name} must stay unquantized"
    assert metrics["quantized_linears"] == len(quantized)
    assert metrics["weight_bytes_quantized"] < metrics["weight_bytes_fp32"]
    assert metrics["weight_bytes_fp32"] == sum(p.stat().st_size for p in (qdir.parent / "export").glob("*.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["normal", "top1"])
def test_perplexity_ratio_is_finite_and_close_to_one(run, name):
    metrics = run[name][3]
    assert math.isfinite(metrics["perplexity_quantized"])
    assert 0.9 < metrics["perplexity_ratio"] < 1.1
    assert metrics["loss_quantized"] != metrics["loss_fp32"]  # the weights did change


@pytest.mark.slow
@pytest.mark.parametrize("name", ["normal", "top1"])
def test_calibration_counts_sum_to_tokens_times_top_k(run, name):
    model, tok, _, metrics, prepared, all_experts = run[name]
    calib = calibration_set(read_conversations(prepared / "conversations_train.jsonl"), tok, CFG.calib_samples,
                            CFG.calib_max_tokens, 1337)
    assert metrics["calib_tokens"] == sum(len(x) for x in calib)
    experts = all_experts["layer_1"]
    top_k = model.config.num_experts_per_tok
    assert sum(e["calib_tokens_router"] for e in experts.values()) == metrics["calib_tokens"] * top_k
    assert sum(e["calib_tokens_gptq"] for e in experts.values()) == metrics["calib_tokens"] * top_k
    assert router_token_counts(model, calib)[1] == [experts[f"expert_{e}"]["calib_tokens_router"] for e in range(4)]
    assert metrics["fallback"]["experts"] == 0
    router = sorted(e["calib_tokens_router"] for e in experts.values())
    assert metrics["calib_tokens_per_expert_min"] == router[0]
    assert metrics["calib_tokens_per_expert_median"] == (router[1] + router[2]) / 2


@pytest.mark.slow
def test_metrics_hold_totals_only(run):
    """metrics/quantize.json stays a short list of scalars for `dvc metrics show`; the detail is elsewhere."""
    for name in ("normal", "dead"):
        metrics, experts = run[name][3], run[name][5]
        assert "experts" not in metrics
        assert set(metrics["fallback"]) == {"strategy", "min_expert_tokens", "experts", "modules"}
        assert len(metrics) <= 24
        assert set(experts) == {"layer_1"} and len(experts["layer_1"]) == 4
        assert metrics["device"] == "cpu"


@pytest.mark.slow
def test_experts_without_tokens_fall_back_to_rtn_and_are_counted(run):
    _, _, qdir, metrics, _, all_experts = run["dead"]
    experts = all_experts["layer_1"]
    assert [experts[f"expert_{e}"]["calib_tokens_router"] for e in range(4)][2:] == [0, 0]
    assert [experts[f"expert_{e}"]["fallback"] for e in range(4)] == [0, 0, 1, 1]
    assert metrics["fallback"] == {"strategy": "rtn", "min_expert_tokens": 4, "experts": 2, "modules": 4}
    assert metrics["calib_tokens_per_expert_min"] == 0
    assert math.isfinite(metrics["perplexity_quantized"])
    log = (gptq_logs(run, "dead") / "quant_log.csv").read_text()
    assert not (qdir / "quant_log.csv").exists()  # timings stay out of the model folder
    assert "mlp.experts.2.c_fc,fallback(rtn)" in log


@pytest.mark.slow
def test_unpacking_matches_gptqmodel_and_reloaded_model_generates_on_cpu(run):
    model, tok, qdir, _, _, _ = run["normal"]
    from gptqmodel import BACKEND

    # GPTQModel's own dequantization (reference kernel) equals ours for every quantized Linear.
    ref = qmodel_class().from_quantized(str(qdir), device="cpu", backend=BACKEND.GPTQ_TORCH, dtype=torch.float16,
                                        trust_remote_code=True).model
    disk = quantized_tensor_names(qdir)  # on-disk (v1) tensors; GPTQModel repacks zeros in memory
    checked = 0
    for name, module in ref.named_modules():
        if hasattr(module, "qweight") and hasattr(module, "dequantize_weight"):
            t = disk[name.removeprefix("model.")]
            ours = dequantize_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4)
            theirs = module.dequantize_weight().float().t()  # GPTQModel returns [in, out]
            assert torch.allclose(ours, theirs, atol=1e-3), name
            checked += 1
    assert checked == 14
    # The CPU inference path: load (the one loader hands a quantized folder to GPTQModel), then generate
    # through the chat template.
    qmodel, qtok = load_quantized(qdir, torch.device("cpu"), torch.float32), load_tokenizer(qdir)
    assert type(qmodel.transformer.h[0].attn.c_attn) is not torch.nn.Linear  # a GPTQModel kernel module
    enc = qtok.apply_chat_template([{"role": "user", "content": "Tell me about the sea."}],
                                   add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = qmodel.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=qtok.pad_token_id)
    assert 1 <= out.shape[1] - enc["input_ids"].shape[1] <= 6
    with torch.no_grad():
        q_logits = qmodel(enc["input_ids"]).logits[0, -1].float()
        fp_logits = model(enc["input_ids"]).logits[0, -1]
    assert torch.isfinite(q_logits).all()
    assert (q_logits - fp_logits).abs().max() < 0.25 * fp_logits.abs().max() + 0.05


@pytest.mark.slow
def test_stage_console_shows_its_summary_and_gptqmodel_output_goes_to_the_log(run):
    """GPTQModel's banner, warnings, progress and timing tables (~440 lines on this model) land in
    metrics/run/quantize_gptq/gptqmodel.log; the stage prints its one summary line."""
    proc = run["stage_output"]
    assert proc.stdout.splitlines() == [line for line in proc.stdout.splitlines() if line.startswith("quantize: ")]
    assert len(proc.stdout.splitlines()) == 1
    for marker in ("GPT-QModel", "Calibration dataset size", "INFO  ", "WARN  ", "rope_scaling",
                   "HF: overriding trust_remote_code"):
        assert marker not in proc.stdout + proc.stderr, marker
    for name in ("normal", "dead"):
        assert not (run[name][2] / GPTQMODEL_LOG).exists()
        log = (gptq_logs(run, name) / GPTQMODEL_LOG).read_text()
        assert "GPT-QModel" in log or name == "normal"  # the banner prints once per process (at import)
        assert "Calibration dataset size should be more than 256" in log
        assert "Kernel" in log and len(log.splitlines()) > 100


def test_library_output_moves_chatter_and_keeps_errors_visible(capsys):
    log = io.StringIO()
    with library_output(log, "test log"):
        print("INFO  Kernel: selected TorchLinear")
        print("\r\x1b[2KERROR Quantization: Module `x` -> Hessian contains non-finite values.")
        logging.getLogger("tokenicer").warning("Auto fixed pad_token_id=0")
        warnings.warn("moechat-test: `rope_scaling` is deprecated", FutureWarning)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [
        "ERROR Quantization: Module `x` -> Hessian contains non-finite values. (from test log)"]
    for text in ("Kernel: selected", "Hessian contains", "WARNING tokenicer: Auto fixed", "rope_scaling"):
        assert text in log.getvalue()
    assert logging.getLogger("tokenicer").propagate and not logging.getLogger("tokenicer").handlers  # restored

    with pytest.raises(RuntimeError, match="boom"), library_output(io.StringIO(), "test log"):
        print("INFO  last words before the failure")
        raise RuntimeError("boom")
    err = capsys.readouterr().err
    assert "last 1 lines of test log" in err and "INFO  last words before the failure" in err


def test_quantize_seconds_exclude_model_loading(monkeypatch, tmp_path):
    """A stand-in GPTQModel class whose load takes 0.6 s and whose quantization takes 0.05 s."""
    class SlowLoad:
        @classmethod
        def from_pretrained(cls, *args, **kwargs):
            time.sleep(0.6)
            return cls()

        def quantize(self, *args, **kwargs):
            time.sleep(0.05)
            return {"gptq": [{"layer": 0, "module": "attn.c_attn", "samples": 3, "loss": "0.1"}]}

        def save(self, folder):  # as GPTQModel's: weights and the config (whose auto_map run_gptq completes)
            Path(folder, "model.safetensors").write_bytes(b"")
            Path(folder, "config.json").write_text("{}")

    monkeypatch.setattr(moechat.release.quantize, "qmodel_class", lambda: SlowLoad)
    tok = tiny_tokenizer()
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "config.json").write_text("{}")  # run_gptq hands GPTQModel a code-free view of it
    _, seconds = run_gptq(tmp_path / "export", tok, [[1, 2, 3]], CFG, tmp_path / "quantized")
    assert seconds["load_seconds"] >= 0.6
    assert 0.05 <= seconds["quantize_seconds"] < 0.5


def test_calibration_windows_are_cut_to_the_models_length():
    """quantize.calib_max_tokens above the model's n_positions used to fail the last stage in the forward."""
    from tests.support.tiny import conversations

    tok = tiny_tokenizer()
    model = tiny_model(tok, n_positions=16)
    convs = [c["messages"] for c in conversations(8)]
    calib = calibration_set(convs, tok, 8, 1024, seed=1, n_positions=model.config.n_positions)
    assert max(len(ids) for ids in calib) == 16
    assert calib == calibration_set(convs, tok, 8, 16, seed=1)  # the same windows as calib_max_tokens: 16
    counts = router_token_counts(model, calib)  # runs: every window fits the model
    assert sum(counts[1]) == sum(len(ids) for ids in calib) * model.config.num_experts_per_tok


def test_missing_calibration_conversations_are_one_line(tmp_path):
    with pytest.raises(QuantizeError) as err:
        read_conversations(tmp_path / "conversations_train.jsonl")
    assert str(err.value) == (f"{tmp_path / 'conversations_train.jsonl'}: not found; run `dvc repro prepare` "
                              f"(it writes conversations_train.jsonl)")
