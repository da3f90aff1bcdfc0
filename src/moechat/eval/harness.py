"""lm-evaluation-harness tasks on the trained model, scored into metrics/eval.json.

The evaluate stage hands lm-eval's Hugging Face backend (`HFLM`) the model object it already loaded with
moechat's own classes, so no code is run from the model folder (no `trust_remote_code`). Tasks come from
lm-eval's registry (Hub datasets, e.g. arc_easy) or from YAML files in `eval.lm_eval_include_path`
(local data files: these run offline). Multiple-choice tasks score by the summed log-likelihood of each
choice (acc) and by its per-byte average (acc_norm), zero-shot.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from moechat.errors import ConfigError
from moechat.config.params import EvalConfig
from moechat.quiet import library_bars_off

LM_EVAL_PIN = "lm-eval==0.4.13"  # the version checked against this project's transformers / datasets / torch


def _import_lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError as err:
        raise ConfigError(f"params.yaml: eval.lm_eval_tasks is set but lm-evaluation-harness is not installed: "
                          f"pip install 'moechat[eval]' ({LM_EVAL_PIN}), or set eval.lm_eval_tasks: []") from err
    return lm_eval


def task_manager(cfg: EvalConfig) -> Any:
    """lm-eval's TaskManager with the local task folder, or None when no task is listed. Every listed task
    must be known to it: the stage calls this before the val pass, so a typo fails in seconds."""
    if not cfg.lm_eval_tasks:
        return None
    _import_lm_eval()
    from lm_eval.tasks import TaskManager

    include = cfg.lm_eval_include_path
    if include is not None and not Path(include).is_dir():
        raise ConfigError(f"params.yaml: eval.lm_eval_include_path={include!r} is not a folder; point it at a "
                          f"folder of lm-eval task YAMLs (relative to the project root) or set it to null")
    manager = TaskManager(include_path=include)
    unknown = [t for t in cfg.lm_eval_tasks if t not in manager.all_tasks]
    if unknown:
        where = f" or in {include}" if include else ""
        raise ConfigError(f"params.yaml: eval.lm_eval_tasks names {unknown[0]!r}, which is not an lm-eval task "
                          f"(none such in lm-eval's registry{where}); run `lm-eval ls tasks` or fix the name")
    return manager


def scores(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from simple_evaluate's results, without lm-eval's ',none' filter suffix
    (`acc,none` -> `acc`, `acc_stderr,none` -> `acc_stderr`), so `dvc metrics diff` shows
    `lm_eval.arc_easy.acc`."""
    out = {}
    for task, metrics in results["results"].items():
        out[task] = {key.split(",")[0]: float(value) for key, value in metrics.items()
                     if "," in key and isinstance(value, (int, float))}
    return out


def run_lm_eval(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cfg: EvalConfig, seed: int,
                manager: Any = None) -> dict[str, Any]:
    """Zero-shot scores of `cfg.lm_eval_tasks` (`cfg.lm_eval_limit` examples each) for metrics/eval.json;
    an empty dict when no task is listed. `manager`: task_manager(cfg), built here when not given."""
    if not cfg.lm_eval_tasks:
        return {}
    lm_eval = _import_lm_eval()
    from lm_eval.models.huggingface import HFLM

    manager = manager or task_manager(cfg)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    device = next(model.parameters()).device
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size, device=str(device),
              max_length=model.config.n_positions)
    with torch.no_grad(), library_bars_off():  # lm-eval's bars: "Tokenizing inputs", one per task's documents
        results = lm_eval.simple_evaluate(model=lm, tasks=list(cfg.lm_eval_tasks), limit=cfg.lm_eval_limit,
                                          task_manager=manager, log_samples=False, bootstrap_iters=1000,
                                          random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                          fewshot_random_seed=seed)
    return {"tasks": scores(results), "limit": cfg.lm_eval_limit,
            "examples": {task: n["effective"] for task, n in results.get("n-samples", {}).items()},
            "version": lm_eval.__version__ if hasattr(lm_eval, "__version__") else LM_EVAL_PIN}
