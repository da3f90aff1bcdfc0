"""MoeChatConfig: a GPT-2 layout in which every `moe_every`-th block has a Mixture-of-Experts MLP.

Self-contained (imports only transformers) so that a saved folder loads with `trust_remote_code=True`
in a process where the moechat package is not installed.
"""

from __future__ import annotations

from transformers import PretrainedConfig

MOE_BACKENDS = ("torch", "tutel")


class MoeChatConfigError(ValueError):
    """A MoeChatConfig value that no model can be built from; the message names the field and the fix.

    `template` writes each field as `{p}name`, so params.yaml's loader can name its own keys (`model.name`)
    with the same sentence the config speaks (`MoeChatConfig.name`)."""

    def __init__(self, field: str, template: str):
        self.field, self.template = field, template
        super().__init__(self.render("MoeChatConfig."))

    def render(self, prefix: str) -> str:
        return self.template.format(p=prefix)


# Fields set from the tokenizer (vocabulary, special ids) or at run time, not hyperparameters of params.yaml.
NOT_HYPERPARAMETERS = ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id", "use_cache")


class MoeChatConfig(PretrainedConfig):
    """Hyper-parameters of MoeChatForCausalLM.

    Block `i` (0-based) has an MoE MLP when `(i + 1) % moe_every == 0`: with `moe_every=2` and 8 layers the
    MoE blocks are 1, 3, 5, 7 (the 2nd, 4th, 6th and 8th). `capacity_factor=0` routes dropless; a positive
    value caps each expert, in training mode only, at `ceil(capacity_factor * B*T * num_experts_per_tok /
    num_experts)` assignments, earliest positions first (causal); eval mode and generation stay dropless.
    `aux_loss` is the Switch loss normalised by k (1 at perfect balance; transformers' Mixtral reports k).
    Every hyperparameter field is a key of params.yaml's `model` section under the same name
    (`hyperparameters()`); `num_experts_per_tok` is Mixtral's name, since a `top_k` field would be read by
    generate() as its top-k sampling flag.
    """

    model_type = "moechat"
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {
        "hidden_size": "n_embd",
        "max_position_embeddings": "n_positions",
        "num_attention_heads": "n_head",
        "num_hidden_layers": "n_layer",
        "intermediate_size": "n_inner",
        "num_local_experts": "num_experts",
    }

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 1024
    n_layer: int = 8
    n_head: int = 16
    n_inner: int = 4096
    num_experts: int = 10
    num_experts_per_tok: int = 2  # "top_k" would collide with the sampling flag of generate()
    moe_every: int = 2
    capacity_factor: float = 0.0
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001
    moe_backend: str = "torch"
    dropout: float = 0.0
    initializer_range: float = 0.02
    layer_norm_epsilon: float = 1e-5
    use_cache: bool = True
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self._validate()

    @classmethod
    def hyperparameters(cls) -> tuple[str, ...]:
        """The fields params.yaml's `model` section sets, under these names: the single list of them."""
        return tuple(name for name in cls.__annotations__ if name not in NOT_HYPERPARAMETERS)

    def _validate(self) -> None:
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner", "num_experts",
                     "num_experts_per_tok", "moe_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MoeChatConfigError(name, f"{{p}}{name}={value!r} must be an integer >= 1")
        if self.n_embd % self.n_head:
            raise MoeChatConfigError("n_embd", f"{{p}}n_embd={self.n_embd} must be divisible by {{p}}n_head="
                                               f"{self.n_head}; pick n_head from the divisors of n_embd")
        if self.num_experts_per_tok > self.num_experts:
            raise MoeChatConfigError(
                "num_experts_per_tok", f"{{p}}num_experts_per_tok={self.num_experts_per_tok} must be <= "
                                       f"{{p}}num_experts={self.num_experts}; lower num_experts_per_tok or add experts")
        if self.capacity_factor < 0:
            raise MoeChatConfigError(
                "capacity_factor", f"{{p}}capacity_factor={self.capacity_factor} must be >= 0 (0 = dropless)")
        for name in ("aux_loss_coef", "z_loss_coef"):
            if getattr(self, name) < 0:
                raise MoeChatConfigError(
                    name, f"{{p}}{name}={getattr(self, name)} must be >= 0 (0 switches the loss off)")
        if not 0.0 <= self.dropout < 1.0:
            raise MoeChatConfigError("dropout", f"{{p}}dropout={self.dropout} must be in [0, 1)")
        if self.initializer_range <= 0:
            raise MoeChatConfigError("initializer_range", f"{{p}}initializer_range={self.initializer_range} must "
                                                          f"be > 0 (the std of the weight init), e.g. 0.02")
        if self.layer_norm_epsilon <= 0:
            raise MoeChatConfigError(
                "layer_norm_epsilon", f"{{p}}layer_norm_epsilon={self.layer_norm_epsilon} must be > 0 (it keeps "
                                      f"LayerNorm from dividing by zero), e.g. 1.0e-5")
        if self.moe_backend not in MOE_BACKENDS:
            raise MoeChatConfigError("moe_backend", f"{{p}}moe_backend={self.moe_backend!r} is not one of "
                                                    f"{' | '.join(MOE_BACKENDS)}; pick one of those")
        for name in ("bos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                raise MoeChatConfigError(
                    name, f"{{p}}{name}={value} lies outside the vocabulary [0, {self.vocab_size}); "
                          f"build the config from the tokenizer the model is trained with")

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether block `layer_idx` (0-based) has an MoE MLP: the `moe_every`-th, 2·`moe_every`-th, ... block."""
        return (layer_idx + 1) % self.moe_every == 0

    def moe_layer_indices(self) -> list[int]:
        """0-based block index of each MoE layer, in order: row i of the model's `router_*` outputs is
        block `moe_layer_indices()[i]`."""
        return [i for i in range(self.n_layer) if self.is_moe_layer(i)]

    @property
    def moe_layers(self) -> list[int]:
        """0-based indices of the MoE blocks (same as `moe_layer_indices()`)."""
        return self.moe_layer_indices()


__all__ = ["MoeChatConfig", "MoeChatConfigError", "NOT_HYPERPARAMETERS"]
