"""Registers MoeChatConfig / MoeChatModel / MoeChatForCausalLM with the transformers Auto classes.

Importing this module is enough for `AutoConfig`, `AutoModel` and `AutoModelForCausalLM` `.from_pretrained`
to load a moechat folder without `trust_remote_code`. `register_for_auto_class` makes `save_pretrained`
write `auto_map` into config.json and copy the two self-contained code files next to the weights, so
the folder also loads with `trust_remote_code=True` where moechat is not installed.
"""

from __future__ import annotations

from moechat.quiet import quiet_loggers

quiet_loggers()  # before transformers, which imports torchao (and its warnings) when GPTQModel installed it

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM  # noqa: E402

from moechat.model.configuration_moechat import MoeChatConfig, MoeChatConfigError  # noqa: E402
from moechat.model.modeling_moechat import (MoeChatBackendError, MoeChatCausalLMOutput, MoeChatForCausalLM, MoeChatModel, MoeChatModelOutput)

AutoConfig.register(MoeChatConfig.model_type, MoeChatConfig, exist_ok=True)
AutoModel.register(MoeChatConfig, MoeChatModel, exist_ok=True)
AutoModelForCausalLM.register(MoeChatConfig, MoeChatForCausalLM, exist_ok=True)
MoeChatConfig.register_for_auto_class()
MoeChatModel.register_for_auto_class("AutoModel")
MoeChatForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["MoeChatConfig", "MoeChatConfigError", "MoeChatModel", "MoeChatModelOutput", "MoeChatForCausalLM",
           "MoeChatCausalLMOutput", "MoeChatBackendError"]
