"""vLLM plugin for moechat's exported MoeChatForCausalLM folders.

vLLM calls `register()` in every process it starts (the `vllm.general_plugins` entry point of this
distribution). The model class is registered by name, so nothing heavier than vLLM's registry is imported
until a MoeChat folder is actually loaded.
"""

ARCHITECTURE = "MoeChatForCausalLM"


def register() -> None:
    """Tell vLLM which class serves `architectures: ["MoeChatForCausalLM"]` (vLLM's general-plugin hook)."""
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "moechat_vllm.model:MoeChatForCausalLM")
