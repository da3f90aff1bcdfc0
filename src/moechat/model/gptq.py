"""GPTQModel's view of moechat: the model definition it quantizes and runs, and loading a quantized folder.

`MOECHAT_MODULE_TREE` / `qmodel_class` tell GPTQModel which Linears of a MoeChatForCausalLM to quantize (per
block `attn.c_attn`, `attn.c_proj`, and the dense MLP or every expert's `c_fc` / `c_proj`); `load_quantized`
runs a saved quantized folder through GPTQModel's kernels. Apart from the quantize stage (`moechat.release.quantize`)
because the one model loader, `moechat.model.folder.load_model`, hands quantized folders to `load_quantized`:
every stage that loads a model can reach this file, and only this one of the GPTQ code.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
from pathlib import Path

import torch
from transformers import PreTrainedModel

from moechat.errors import MoechatError
from moechat.model.code_free import code_free_view
from moechat.model.folder import finish_loading, read_checked

# GPTQModel's module tree for MoeChatForCausalLM: "#" = the block index; ":0"/":1" = the order in which
# modules of one block are quantized (inputs before outputs); ":!" = run but do not quantize; "mlp:moe"
# holds either the dense MLP ("") or the router plus the experts ("experts" -> "#" = expert index).
MOECHAT_MODULE_TREE = [
    "transformer", "h", "#",
    {
        "ln_1": ("ln_1:!",),
        "attn": ("c_attn:0", "c_proj:1"),
        "ln_2": ("ln_2:!",),
        "mlp:moe": {
            "": ("c_fc:0", "c_proj:1"),
            "router": ("router:!",),
            "experts": {"#": ("c_fc:0", "c_proj:1")},
        },
    },
]


class QuantizeError(MoechatError, RuntimeError):
    """Quantization cannot run on this input; the message names the file, row or value and the fix."""


def require_gptqmodel() -> None:
    """Import GPTQModel, or a one-line error saying how to install it."""
    try:
        import gptqmodel  # noqa: F401
    except ImportError as err:
        raise QuantizeError(f"the quantize stage needs GPTQModel ({err}); install the extra: "
                            f"pip install -e \".[gptq]\" (gptqmodel==7.6.0)") from err
    # GPTQModel sizes its CPU worker pool from this; on a 2-core machine the default stalls.
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(1, min(os.cpu_count() or 1, 8))))


@functools.cache
def qmodel_class() -> type:
    """GPTQModel's model definition for moechat (built on first use: importing gptqmodel takes seconds)."""
    require_gptqmodel()
    from gptqmodel.models.base import BaseQModel

    class MoeChatQModel(BaseQModel):
        pre_lm_head_norm_module = "transformer.ln_f"
        dynamic_expert_index = "num_experts"  # config attribute with the expert count
        layer_modules_strict = False  # a block has either the dense MLP or the experts
        module_tree = MOECHAT_MODULE_TREE

        def prepare_layer_replay_kwargs(self, layer, layer_input, additional_inputs, target_device):
            """GPTQModel replays each block with HF-style kwargs (attention_mask, position_ids, use_cache);
            MoeChatBlock takes the mask it was captured with (`mask_B1TK`, `token_mask_BT`), so pass only
            the keywords its forward accepts."""
            accepted = set(inspect.signature(type(layer).forward).parameters)
            return {k: v for k, v in additional_inputs.items() if k in accepted}

    return MoeChatQModel


def load_quantized(quant_dir: Path, device: torch.device, dtype: torch.dtype, trust_remote_code: bool = False
                   ) -> PreTrainedModel:
    """The HF model (with `generate`) of a quantized folder, through GPTQModel's kernels: on the CPU its CPU
    kernel (TorchInt8Linear, which repacks the 4-bit weights per channel to int8 for `_weight_int8pack_mm`;
    fp32 activations), on a GPU the fastest kernel GPTQModel finds. The folder's own Python files run only
    with `trust_remote_code`; otherwise GPTQModel gets a `code_free_view` and builds the installed
    MoeChatForCausalLM. The folder gets the full-precision loader's checks before and after (`read_checked`,
    `finish_loading`)."""
    read_checked(quant_dir, trust_remote_code)
    qcls = qmodel_class()
    from gptqmodel import BACKEND

    backend = BACKEND.GPTQ_TORCH_INT8 if torch.device(device).type == "cpu" else BACKEND.AUTO
    with contextlib.ExitStack() as stack:
        folder = Path(quant_dir) if trust_remote_code else stack.enter_context(code_free_view(quant_dir))
        wrapper = qcls.from_quantized(str(folder), device=str(device), backend=backend, dtype=dtype,
                                      trust_remote_code=trust_remote_code)
    return finish_loading(quant_dir, wrapper.model.eval())
