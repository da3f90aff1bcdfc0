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

Before transformers sees a folder, its files are checked (`moechat.model.folder_checks`, JSON and safetensors
headers only): the tokenizer is a transformers class unless the caller trusts the folder's code, every
weight file an index names is a safetensors file in the folder, and the tensors are exactly those of the
model config.json describes (a missing one would be random weights, silently). After loading, NaN or inf
weights are refused, and the folder's generation_config.json is replaced by the token ids alone: callers
generate with their own settings.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moechat.errors import MoechatError
from moechat.model.folder_checks import PIPELINE_NO_CODE

if TYPE_CHECKING:  # torch and transformers load in the functions that need them, after the folder is checked
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

MODEL_TYPE = "moechat"  # MoeChatConfig.model_type, read here without importing transformers
TRUST_FLAG = "--trust-remote-code"
PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")
REBUILD = "run the stage that writes it (dvc repro)"  # the fix for a pipeline folder that is missing or incomplete
CHAT_NO_CODE = f"pass {TRUST_FLAG} to run it, only for a folder you trust"


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
    which runs the same checks), so nothing that trains, evaluates or exports depends on GPTQModel."""
    config = read_checked(folder, trust_remote_code)
    if "quantization_config" in config:
        raise ModelFolderError(f"{folder}: a quantized (GPTQ) folder; it loads for inference only "
                               f"(`moechat chat {folder}`), pass a full-precision folder such as models/export")
    model = _load_full_precision(Path(folder), dtype, trust_remote_code).to(device).eval()
    return finish_loading(folder, model)


def read_checked(folder: Path, trust_remote_code: bool) -> dict[str, Any]:
    """config.json after every check that needs no model code (`read_config`, `check_weight_files`), with the
    installed classes registered unless `trust_remote_code`: what both loaders do before loading."""
    config = read_config(folder, trust_remote_code)
    check_weight_files(Path(folder), config)
    if not trust_remote_code:  # registered classes win over a folder's auto_map, so register only without it
        import moechat.model.auto  # noqa: F401
    return config


def finish_loading(folder: Path, model: PreTrainedModel) -> PreTrainedModel:
    """What both loaders do after loading: finite weights only, and the folder's generation settings dropped."""
    check_finite(Path(folder), model)
    model.generation_config = own_generation_config(model)
    return model


# generation_config.json keys not worth a notice: ids, and what every caller sets itself (chat's flags, eval.*);
# GPTQModel saves `do_sample: true` into every quantized folder
GENERATION_IDS = {"bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "transformers_version",
                  "_from_model_config", "do_sample", "temperature", "top_p", "top_k", "max_new_tokens"}


def own_generation_config(model: PreTrainedModel) -> Any:
    """A GenerationConfig with only the model's token ids: moechat generates with its own settings (params.yaml
    eval.*, chat's flags); the folder's generation_config.json (`num_beams: 1000`, `max_length: 3`, ...) would
    otherwise fill every setting they leave unset."""
    from transformers import GenerationConfig

    return GenerationConfig(bos_token_id=model.config.bos_token_id, eos_token_id=model.config.eos_token_id,
                            pad_token_id=model.config.pad_token_id)


def ignored_generation_settings(folder: Path) -> dict[str, Any]:
    """The settings of the folder's generation_config.json that differ from transformers' defaults, which
    `load_model` drops (see own_generation_config); {} when none or no such file."""
    from transformers import GenerationConfig

    path = Path(folder) / "generation_config.json"
    try:
        saved = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {"generation_config.json": "unreadable"}
    defaults = GenerationConfig().to_dict()
    return {k: v for k, v in (saved.items() if isinstance(saved, dict) else ())
            if k not in GENERATION_IDS and defaults.get(k, object()) != v}


def check_weight_files(folder: Path, config: dict[str, Any]) -> None:
    """Before anything is imported or allocated: the weights are safetensors files in the folder (never a
    pickle an index points at), and for a moechat model their tensors are exactly the model's, in config.json's
    sizes (a missing tensor would silently be random)."""
    from moechat.model.folder_checks import check_sizes, check_tensors, header_shapes

    found = header_shapes(folder)
    if config.get("model_type") == MODEL_TYPE:
        check_sizes(folder, config, found)
        expected, tied = expected_shapes(folder)
        check_tensors(folder, expected, {k: v for k, v in found.items() if k not in tied})


def expected_shapes(folder: Path) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """Tensor name -> shape the installed moechat model builds from the folder's config.json (on the meta
    device: nothing allocated), and the tied names left out of it: a head tied to the embedding is not saved
    (and would be overwritten by the embedding if it were)."""
    import torch

    from moechat.model.configuration_moechat import MoeChatConfig
    from moechat.model.modeling_moechat import MoeChatForCausalLM

    try:
        config = MoeChatConfig.from_json_file(str(folder / "config.json"))  # the class itself: no auto_map lookup
        with torch.device("meta"):
            model = MoeChatForCausalLM(config)
    except (ValueError, TypeError, ArithmeticError, AssertionError) as err:  # e.g. n_head: 0, n_embd: "64"
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ModelFolderError(f"{folder / 'config.json'}: the installed moechat model cannot be built from it "
                               f"({type(err).__name__}: {first}); re-export the folder (dvc repro export)") from None
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    tied = set(model._tied_weights_keys) if config.tie_word_embeddings else set()
    return {k: v for k, v in shapes.items() if k not in tied}, tied


def _load_full_precision(folder: Path, dtype: torch.dtype, trust_remote_code: bool) -> PreTrainedModel:
    """from_pretrained, safetensors only; with the folder's own code (not checked by name beforehand), a
    tensor transformers reports missing, unexpected or mis-shaped is refused too."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, trust_remote_code=trust_remote_code,
                                                       use_safetensors=True, output_loading_info=True)
    problems = {kind: [str(k) for k in info.get(kind) or []] for kind in ("missing_keys", "unexpected_keys",
                                                                         "mismatched_keys")}
    problems = {kind: keys for kind, keys in problems.items() if keys}
    if problems:
        from moechat.model.folder_checks import INTACT, listed

        raise ModelFolderError(f"{folder}: the tensors do not match the model: " + "; ".join(
            f"{len(keys)} {kind.split('_')[0]}: {listed(keys)}" for kind, keys in problems.items()) + f"; {INTACT}")
    return model


def check_finite(folder: Path, model: PreTrainedModel) -> None:
    """Refuse weights holding NaN or inf (one pass over the parameters): they answer with garbage or crash
    sampling (`probability tensor contains inf/nan`)."""
    import torch

    bad = [name for name, p in model.named_parameters() if p.is_floating_point() and not torch.isfinite(p).all()]
    if bad:
        from moechat.model.folder_checks import listed

        raise ModelFolderError(f"{folder}: {len(bad)} weight tensors hold NaN or inf ({listed(bad)}); use an intact "
                               f"model (the last checkpoint with finite weights, then dvc repro export)")


def load_tokenizer(folder: Path, trust_remote_code: bool = False, fix: str = PIPELINE_NO_CODE
                   ) -> PreTrainedTokenizerBase:
    """The tokenizer (with its chat template) saved in a model folder. A folder whose tokenizer is its own code
    (auto_map, a class transformers lacks) is refused with `fix` unless `trust_remote_code`: no prompt, ever."""
    from transformers import AutoTokenizer

    from moechat.model.folder_checks import check_tokenizer_code

    check_tokenizer_code(Path(folder), trust_remote_code, fix)
    return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)


