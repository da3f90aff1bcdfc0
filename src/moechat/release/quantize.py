"""GPTQ 4-bit quantization of the exported model with GPTQModel, MoE-aware, in the standard GPTQ format.

Why GPTQModel: it is the maintained successor of auto-gptq (archived; 0.7.1 does not import with
transformers 5), quantizes and runs on CPU here (7.6.0; 7.7.0 needs a newer torch), writes the
standard on-disk format (`qweight`, `qzeros`, `scales`, `g_idx` per Linear, `quantization_config` with
`quant_method: gptq`) that vLLM / SGLang / transformers read, and knows MoE experts: each expert's
Hessian is built from the calibration tokens the router actually sends it.

What is quantized (`moechat.model.gptq.MOECHAT_MODULE_TREE`): per block `attn.c_attn`, `attn.c_proj`, and
either the dense `mlp.c_fc` / `mlp.c_proj` or every expert's `c_fc` / `c_proj`. The router, embeddings,
LayerNorms and lm_head stay in full precision.

Fallback rule: an expert (any quantized Linear, in fact) whose calibration inputs number fewer than
`quantize.min_expert_tokens` tokens is quantized with RTN (round-to-nearest, same bits / group size /
format, no Hessian) instead of GPTQ, because a Hessian from a handful of tokens is rank-deficient and
over-fits them. An expert that receives no token at all always falls back (GPTQ is undefined there).
metrics/quantize.json carries the totals (calibration tokens, the fewest and median tokens an expert saw,
fallback counts); the per-expert detail (router counts, GPTQ sample counts, fallback flags) goes to a
separate JSON file, so `dvc metrics show` stays readable.

Device: the stage picks one device (a visible CUDA GPU, else the CPU) for the GPTQ run and both perplexity
passes, and names it in the metrics. Both run in fp32 on either device, so the saved folder (scales and
the unquantized tensors in fp32) and its size do not depend on the machine.

The 4-bit perplexity is measured by unpacking the saved tensors (`dequantize_gptq`) into the fp32 model:
exactly the weights every GPTQ kernel multiplies by, independent of which kernel a machine has. The
full-precision baseline is the fp32 export (train saves fp32 master weights; export keeps their dtype).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import safe_open
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from moechat.atomic import atomic_dir
from moechat.release.export import AUTO_MAP
from moechat.config.params import QuantizeConfig
from moechat.quiet import library_output
from moechat.model.gptq import QuantizeError, qmodel_class, require_gptqmodel
from moechat.model.code_free import code_free_view
from moechat.model.folder import load_model, load_tokenizer
from moechat.eval.router_tally import RouterTally

CALIB_MIN_TOKENS = 2  # a calibration conversation needs at least one next-token pair
# GPTQModel's full console output and its per-module table (losses and seconds): run facts, so they go to a
# log folder outside the model folder, whose hash then depends only on the inputs.
GPTQMODEL_LOG = "gptqmodel.log"
QUANT_LOG = "quant_log.csv"  # what GPTQModel's save() writes beside the weights







# ---------------------------------------------------------------------------------------- calibration
def read_conversations(path: Path) -> list[list[dict[str, str]]]:
    """The `messages` lists of a conversations_*.jsonl file written by the prepare stage."""
    path = Path(path)
    if not path.exists():
        raise QuantizeError(f"{path}: not found; run `dvc repro prepare` (it writes conversations_train.jsonl)")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        messages = row.get("messages")
        if not isinstance(messages, list) or not messages:
            raise QuantizeError(f"{path}:{n}: expected {{\"messages\": [{{\"role\", \"content\"}}, ...]}}, "
                                f"got keys {sorted(row)}; regenerate it with `dvc repro prepare`")
        out.append(messages)
    if not out:
        raise QuantizeError(f"{path}: no conversations; check the prepare stage's output")
    return out


def calibration_set(conversations: list[list[dict[str, str]]], tokenizer: PreTrainedTokenizerBase, n: int,
                    max_tokens: int, seed: int, n_positions: Optional[int] = None) -> list[list[int]]:
    """`n` conversations drawn with `seed`, rendered through the chat template and cut to `max_tokens`, and
    never past the model's `n_positions` (quantize.calib_max_tokens may exceed an upcycled or small model's
    length; the windows are cut to fit instead of failing the last stage)."""
    if n_positions is not None:
        max_tokens = min(max_tokens, n_positions)
    rng = random.Random(seed)
    picked = rng.sample(conversations, min(n, len(conversations)))
    ids = [list(tokenizer.apply_chat_template(m, tokenize=True, return_dict=True)["input_ids"])[:max_tokens]
           for m in picked]
    ids = [x for x in ids if len(x) >= CALIB_MIN_TOKENS]
    if not ids:
        raise QuantizeError("no calibration conversation has 2 or more tokens; check conversations_train.jsonl")
    return ids


@torch.no_grad()
def router_token_counts(model: PreTrainedModel, calib: list[list[int]]) -> dict[int, list[int]]:
    """Tokens each expert receives from the full-precision router over the calibration set, per MoE layer
    (each conversation run alone, as GPTQModel feeds them)."""
    device = next(model.parameters()).device
    tally = RouterTally.for_model(model.config, device)
    for ids in calib:
        tally.add(model(input_ids=torch.tensor([ids], device=device), use_cache=False, output_router_stats=True))
    return tally.counts_by_layer()


# ------------------------------------------------------------------------------------------- quantize
def gptq_config(cfg: QuantizeConfig):
    """GPTQModel's QuantizeConfig from params.yaml's `quantize` section (plus the fallback rule)."""
    require_gptqmodel()
    from gptqmodel import QuantizeConfig as GPTQConfig
    from gptqmodel.quantization.config import Fallback, FallbackStrategy

    # threshold: observed < min_expert_tokens falls back; `True` = only modules that saw no token at all.
    threshold: Any = cfg.min_expert_tokens if cfg.min_expert_tokens > 0 else True
    return GPTQConfig(bits=cfg.bits, group_size=cfg.group_size, desc_act=cfg.desc_act, sym=cfg.sym,
                      fallback=Fallback(strategy=FallbackStrategy.RTN, threshold=threshold),
                      # plain GPTQ column order (g_idx = i // group_size when desc_act is off): the layout
                      # every GPTQ kernel and loader expects
                      act_group_aware=False, offload_to_disk=False)


def complete_auto_map(folder: Path) -> None:
    """Give the saved folder's config.json the export's whole `auto_map`: GPTQModel writes only the saved
    class's entries (AutoConfig, AutoModelForCausalLM), and loaders that build the base model (vLLM's
    Transformers backend, `AutoModel`) look for `AutoModel`."""
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["auto_map"] = {**(config.get("auto_map") or {}), **AUTO_MAP}
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def run_gptq(model_dir: Path, tokenizer: PreTrainedTokenizerBase, calib: list[list[int]], cfg: QuantizeConfig,
             out_dir: Path, device: torch.device = torch.device("cpu"), log_dir: Optional[Path] = None
             ) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Quantize `model_dir` on `device` and save it to `out_dir` atomically; returns GPTQModel's per-module
    log (one dict per quantized Linear: layer, module, samples, loss) and the seconds spent loading the
    model (`load_seconds`) and quantizing it (`quantize_seconds`, the GPTQ / RTN pass alone).
    GPTQModel's console output (hundreds of lines) and its quant_log.csv go to `log_dir` (gptqmodel.log,
    quant_log.csv; dropped when None), never into `out_dir`: they hold timings, and `out_dir` must hash the
    same for the same inputs.

    fp32 on every device: CPUs here run fp16 ~100x slower, and on a GPU fp32 keeps the output identical
    in format and size to a CPU run (a ~0.5B model fits a 16 GB GPU in fp32 with room to spare)."""
    import moechat.model.auto  # noqa: F401  (registers the installed classes with the Auto classes)

    fd, log_name = tempfile.mkstemp(prefix="moechat-gptqmodel-", suffix=".log")
    os.close(fd)
    log_path = Path(log_name)  # outside out_dir, so it survives a failed run (its path is printed then)
    # GPTQModel sees a code-free view of model_dir (alive until the save: it reads weights lazily), so it
    # builds the installed moechat classes and never imports the folder's code files.
    with open(log_path, "w+", encoding="utf-8") as log_file, library_output(log_file, str(log_path)), \
            code_free_view(model_dir) as view:
        qcls = qmodel_class()
        start = time.perf_counter()
        qmodel = qcls.from_pretrained(str(view), quantize_config=gptq_config(cfg), device=str(device),
                                      dtype=torch.float32, trust_remote_code=False)
        loaded = time.perf_counter()
        data = [{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids in calib]
        # GPTQModel writes a per-run log file under ./logs; keep it out of the user's project folder
        with tempfile.TemporaryDirectory(prefix="moechat-gptq-") as scratch, contextlib.chdir(scratch):
            log = qmodel.quantize(data, batch_size=1, tokenizer=tokenizer,
                                  calibration_data_min_length=CALIB_MIN_TOKENS)
        seconds = {"load_seconds": loaded - start, "quantize_seconds": time.perf_counter() - loaded}
        with atomic_dir(out_dir) as tmp:
            qmodel.save(str(tmp))
            tokenizer.save_pretrained(str(tmp))
            complete_auto_map(tmp)
            table = tmp / QUANT_LOG
            table_text = table.read_text() if table.exists() else None
            table.unlink(missing_ok=True)
    _keep_logs(log_path, table_text, log_dir)
    rows = log.get("gptq", []) if isinstance(log, dict) else []
    if not rows:
        raise QuantizeError(f"GPTQModel returned no per-module log ({type(log).__name__}); no module was quantized "
                            f"— check that the model at {model_dir} is a moechat model")
    return rows, seconds


def _keep_logs(log_path: Path, table: Optional[str], log_dir: Optional[Path]) -> None:
    """Move GPTQModel's console log and quant_log.csv text into `log_dir` (replacing an older run's), or drop them."""
    if log_dir is None:
        log_path.unlink()
        return
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    shutil.move(str(log_path), log_dir / GPTQMODEL_LOG)
    if table is not None:
        (log_dir / QUANT_LOG).write_text(table)
    else:
        (log_dir / QUANT_LOG).unlink(missing_ok=True)


def expert_report(rows: list[dict[str, Any]], fp_counts: dict[int, list[int]], num_experts: int
                  ) -> dict[str, Any]:
    """Per-expert calibration tokens (router count in full precision, and what GPTQModel saw after the
    earlier blocks were quantized) and the fallback flag, from GPTQModel's per-module log."""
    by_module = {(int(r["layer"]), r["module"]): r for r in rows}
    experts: dict[str, dict[str, Any]] = {}
    for layer, counts in fp_counts.items():
        per_layer = {}
        for e in range(num_experts):
            entries = [by_module.get((layer, f"mlp.experts.{e}.{m}")) for m in ("c_fc", "c_proj")]
            if any(x is None for x in entries):
                raise QuantizeError(f"GPTQModel did not quantize expert {e} of block {layer}; "
                                    f"the module tree does not match the model")
            per_layer[f"expert_{e}"] = {
                "calib_tokens_router": counts[e],
                "calib_tokens_gptq": int(entries[0]["samples"]),
                "fallback": int(any(_is_fallback(x) for x in entries)),
            }
        experts[f"layer_{layer}"] = per_layer
    return experts


def _is_fallback(row: dict[str, Any]) -> bool:
    return str(row.get("loss", "")).startswith("fallback")


def expert_totals(experts: dict[str, dict[str, dict[str, int]]]) -> dict[str, Any]:
    """The fewest and the median calibration tokens the full-precision router sent one expert, over every
    expert of every MoE layer (an empty dict for a model without MoE layers)."""
    counts = [e["calib_tokens_router"] for layer in experts.values() for e in layer.values()]
    if not counts:
        return {}
    return {"calib_tokens_per_expert_min": min(counts), "calib_tokens_per_expert_median": statistics.median(counts)}


# ------------------------------------------------------------------------------------- 4-bit weights
def dequantize_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                    bits: int) -> torch.Tensor:
    """Unpack one GPTQ Linear (checkpoint_format "gptq", int32 packing) into a float weight [out, in].

    qweight [in * bits / 32, out] packs `32 / bits` input rows per int32 (low bits first); qzeros
    [groups, out * bits / 32] packs zero points along the output dim and stores zero - 1 (the v1 format
    auto-gptq established); W[o, i] = scales[g_idx[i], o] * (q[i, o] - (z[g_idx[i], o] + 1)).
    """
    mask = (1 << bits) - 1
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    q = (qweight.unsqueeze(1) >> shifts.view(1, -1, 1)) & mask  # [in / per_int, per_int, out]
    q = q.reshape(-1, qweight.shape[1])  # [in, out]
    z = (qzeros.unsqueeze(2) >> shifts.view(1, 1, -1)) & mask  # [groups, out / per_int, per_int]
    z = z.reshape(qzeros.shape[0], -1) + 1  # [groups, out]
    g = g_idx.long()
    w = scales.float()[g] * (q.float() - z.float()[g])  # [in, out]
    return w.t().contiguous()


def quantized_tensor_names(quant_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """All tensors of a saved quantized folder, grouped by module prefix for the GPTQ ones."""
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(Path(quant_dir).glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        prefix, _, leaf = k.rpartition(".")
        modules.setdefault(prefix, {})[leaf] = v
    return modules


def dequantized_model(fp_model: PreTrainedModel, quant_dir: Path) -> tuple[PreTrainedModel, int]:
    """A copy of `fp_model` carrying the saved 4-bit weights (unpacked to fp32) and every other saved
    tensor; returns it and the number of quantized Linears. This is the function the GPTQ kernels compute."""
    bits = json.loads((Path(quant_dir) / "config.json").read_text())["quantization_config"]["bits"]
    model = copy.deepcopy(fp_model)
    modules = quantized_tensor_names(quant_dir)
    n_quant = 0
    with torch.no_grad():
        for prefix, parts in modules.items():
            module = model.get_submodule(prefix)
            if "qweight" in parts:
                w = dequantize_gptq(parts["qweight"], parts["qzeros"], parts["scales"], parts["g_idx"], bits)
                if tuple(w.shape) != tuple(module.weight.shape):
                    raise QuantizeError(f"{quant_dir}: {prefix} unpacks to {tuple(w.shape)}, the model has "
                                        f"{tuple(module.weight.shape)}; the folder does not match the model")
                module.weight.copy_(w)
                n_quant += 1
            else:
                for leaf, tensor in parts.items():
                    getattr(module, leaf).copy_(tensor)
                continue
            if "bias" in parts and module.bias is not None:
                module.bias.copy_(parts["bias"])
    return model, n_quant


def weight_bytes(folder: Path) -> int:
    """Bytes of the safetensors weight files in a folder."""
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


# ------------------------------------------------------------------------------------------- the stage
def quantize_stage(model_dir: Path, conversations_path: Path, val: Any, cfg: QuantizeConfig, seed: int,
                   out_dir: Path, batch_size: int = 4, max_batches: Optional[int] = None,
                   device: torch.device = torch.device("cpu"), log_dir: Optional[Path] = None
                   ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Calibrate, quantize, save, and measure, all on `device`: returns the metrics/quantize.json dict
    (totals) and the per-expert detail (`{"layer_L": {"expert_E": {calib_tokens_router,
    calib_tokens_gptq, fallback}}}`). GPTQModel's logs go to `log_dir` (see run_gptq)."""
    from moechat.eval.evaluate import evaluate_lm

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    fp_model = load_model(model_dir, device, torch.float32)  # fp32 on every device: see run_gptq
    tokenizer = load_tokenizer(model_dir)
    calib = calibration_set(read_conversations(conversations_path), tokenizer, cfg.calib_samples,
                            cfg.calib_max_tokens, seed, n_positions=fp_model.config.n_positions)
    fp_counts = router_token_counts(fp_model, calib)
    rows, seconds = run_gptq(model_dir, tokenizer, calib, cfg, out_dir, device, log_dir)
    experts = expert_report(rows, fp_counts, fp_model.config.num_experts)
    q_model, n_quant = dequantized_model(fp_model, out_dir)
    fp_eval = evaluate_lm(fp_model, val, batch_size, max_batches, desc="val fp32")
    q_eval = evaluate_lm(q_model, val, batch_size, max_batches, desc=f"val {cfg.bits}-bit")
    fp_bytes, q_bytes = weight_bytes(model_dir), weight_bytes(out_dir)
    fallback_experts = sum(e["fallback"] for layer in experts.values() for e in layer.values())
    metrics = {
        "bits": cfg.bits, "group_size": cfg.group_size, "desc_act": cfg.desc_act, "sym": cfg.sym,
        "device": device.type,
        "calib_samples": len(calib), "calib_tokens": sum(len(x) for x in calib), **expert_totals(experts),
        **seconds,
        "quantized_linears": n_quant,
        "loss_fp32": fp_eval["loss"], "loss_quantized": q_eval["loss"],
        "perplexity_fp32": fp_eval["perplexity"], "perplexity_quantized": q_eval["perplexity"],
        "perplexity_ratio": q_eval["perplexity"] / fp_eval["perplexity"],
        "weight_bytes_fp32": fp_bytes, "weight_bytes_quantized": q_bytes, "size_ratio": q_bytes / fp_bytes,
        "fallback": {"strategy": "rtn", "min_expert_tokens": cfg.min_expert_tokens,
                     "experts": fallback_experts, "modules": sum(_is_fallback(r) for r in rows)},
    }
    return metrics, experts
