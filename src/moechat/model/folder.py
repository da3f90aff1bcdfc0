"""Open a model folder without running the Python files it carries: the one loader of every caller.

`load_model` is how train (models/init), evaluate, export, quantize and `moechat chat` open a folder: checked
by `read_config` first (one-line errors naming the folder and the fix), weights from safetensors only, in
the dtype the caller chose, and a quantized (GPTQ) folder through GPTQModel's kernels.

A save_pretrained folder of a custom model ships `configuration_moechat.py` / `modeling_moechat.py` and an
`auto_map` in config.json that names them; with `trust_remote_code=True`, transformers imports those files,
so a folder downloaded from anywhere can run any code. moechat loads model folders with the classes of the
installed package instead (registered with the Auto classes by `moechat.model.auto`) and runs a folder's own
code only when the user asks for it (`moechat chat --trust-remote-code`).

GPTQModel imports the module named by `auto_map` even under `trust_remote_code=False` (its remote-code
compatibility shims) and copies a folder's `*.py` files into the transformers module cache, so a quantized
folder reaches it as a `code_free_view`: links to the folder's data files and a config.json without
`auto_map`. Weights are read from safetensors only; a folder holding only pickled weights is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moechat.errors import MoechatError

if TYPE_CHECKING:  # torch and transformers load in the functions that need them, after the folder is checked
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

MODEL_TYPE = "moechat"  # MoeChatConfig.model_type, read here without importing transformers
TRUST_FLAG = "--trust-remote-code"
PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")
REBUILD = "run the stage that writes it (dvc repro)"  # the fix for a pipeline folder that is missing or incomplete


class ModelFolderError(MoechatError, ValueError):
    """A model folder cannot be loaded; the message names the folder or file and what to pass instead."""


def read_config(folder: Path, trust_remote_code: bool = False, fix: str = REBUILD) -> dict[str, Any]:
    """config.json of a model folder, checked before any slow import: it exists, is a JSON object, the folder
    has safetensors weights, and (unless `trust_remote_code`) it is a moechat model the installed code loads.
    `fix` ends the message of a missing folder, config.json or weights file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFolderError(f"{folder}: {'not a folder' if folder.exists() else 'no such folder'}; {fix}")
    path = folder / "config.json"
    if not path.is_file():
        raise ModelFolderError(f"{folder}: no config.json; {fix}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ModelFolderError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); re-export the "
                               f"folder (dvc repro export)") from None
    except json.JSONDecodeError as err:
        raise ModelFolderError(f"{path}: invalid JSON ({err.msg} at line {err.lineno} column {err.colno}); "
                               f"re-export the folder (dvc repro export)") from None
    if not isinstance(config, dict):
        raise ModelFolderError(f"{path}: expected a JSON object with the model's settings, got a "
                               f"{type(config).__name__}; re-export the folder (dvc repro export)")
    _check_weights(folder, fix)
    if not trust_remote_code and config.get("model_type") != MODEL_TYPE:
        raise ModelFolderError(f"{path}: model_type={config.get('model_type')!r}, not {MODEL_TYPE!r}; the installed "
                               f"moechat code loads only moechat models ({TRUST_FLAG} runs the folder's own "
                               f"code instead, only for a folder you trust)")
    return config


def _check_weights(folder: Path, fix: str) -> None:
    if any(folder.glob("*.safetensors")):
        return
    pickled = sorted(p.name for pattern in PICKLED_WEIGHTS for p in folder.glob(pattern))
    if pickled:
        raise ModelFolderError(f"{folder}: weights only in pickle files ({', '.join(pickled)}), which can run code "
                               f"when loaded; moechat reads safetensors only: re-save the model with "
                               f"save_pretrained(safe_serialization=True)")
    raise ModelFolderError(f"{folder}: no weights (*.safetensors); {fix}")


def is_quantized_dir(folder: Path) -> bool:
    """Whether `folder` holds a quantized (GPTQ) model, from its config.json."""
    config = Path(folder) / "config.json"
    return config.exists() and "quantization_config" in json.loads(config.read_text())


def load_model(folder: Path, device: torch.device, dtype: torch.dtype, trust_remote_code: bool = False
               ) -> PreTrainedModel:
    """The model of a folder, in eval mode, in `dtype` on `device`, built from the installed moechat classes
    unless `trust_remote_code` (then from the folder's own code files), its weights from safetensors only.
    A quantized folder is refused here: it loads through GPTQModel's kernels (`moechat.model.gptq.load_quantized`,
    which checks the folder the same way), so nothing that trains or evaluates depends on GPTQModel."""
    config = read_config(folder, trust_remote_code)
    if "quantization_config" in config:
        raise ModelFolderError(f"{folder}: a quantized (GPTQ) folder; it loads for inference only "
                               f"(`moechat chat {folder}`), pass a full-precision folder such as models/export")
    if not trust_remote_code:  # registered classes win over a folder's auto_map, so register only without it
        import moechat.model.auto  # noqa: F401
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, trust_remote_code=trust_remote_code,
                                                 use_safetensors=True)
    return model.to(device).eval()


def load_tokenizer(folder: Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer (with its chat template) saved in a model folder."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)


