"""Generation: the one leaf that chat, evaluate and quantize share (greedy or sampled replies, the length
budget a prompt leaves).

Importing it loads neither torch nor transformers (the functions do, when they run): `moechat chat` checks
its arguments and the folder with `leaves_room_for_a_prompt` before the slow imports."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from moechat.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def leaves_room_for_a_prompt(max_new_tokens: int, n_positions: Optional[int]) -> bool:
    """The one rule for a reply cap (chat's --max-new-tokens, eval.max_new_tokens, generate_reply): the
    prompt needs at least one of the model's positions."""
    return n_positions is None or max_new_tokens < n_positions


def generate_reply(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]],
                   max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                   seed: Optional[int] = None, streamer: Any = None) -> str:
    """One assistant turn for `messages` through the chat template (see `generate_continuation`).
    The prompt is cut from the left (whole tokens) so prompt + reply fits the model's positions."""
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)
    input_ids = enc["input_ids"]
    limit = getattr(model.config, "n_positions", None)
    if limit is not None:
        if not leaves_room_for_a_prompt(max_new_tokens, limit):
            raise ValueError(f"max_new_tokens={max_new_tokens} must be < the model's n_positions={limit}")
        input_ids = input_ids[:, -(limit - max_new_tokens):]
    return generate_continuation(model, tokenizer, input_ids, max_new_tokens, temperature, top_p, seed, streamer)


def generate_continuation(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, input_ids_1T: torch.Tensor,
                          max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                          seed: Optional[int] = None, streamer: Any = None) -> str:
    """The text generated after the prompt `input_ids_1T` [1, T], up to `max_new_tokens` or <|im_end|>.
    temperature 0 = greedy; otherwise nucleus sampling with `seed` (torch.manual_seed, so the same seed
    gives the same text on the same device)."""
    import torch

    input_ids = input_ids_1T.to(next(model.parameters()).device)
    kwargs: dict[str, Any] = {"do_sample": False}
    if temperature > 0:
        kwargs = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
        if seed is not None:
            torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=tokenizer.pad_token_id, streamer=streamer, **kwargs)
    return tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True)


def check_max_new_tokens(model: PreTrainedModel, max_new_tokens: int) -> None:
    """`eval.max_new_tokens` must leave room for the prompt in the model's positions; checked before any
    work so a bad value fails with its params key, not from inside `generate` after the val pass."""
    limit = getattr(model.config, "n_positions", None)
    if not leaves_room_for_a_prompt(max_new_tokens, limit):
        raise ConfigError(f"params.yaml: eval.max_new_tokens={max_new_tokens} must be < the model's "
                          f"n_positions={limit} (the prompt needs positions too); set eval.max_new_tokens to at "
                          f"most {limit - 1}, e.g. {max(1, limit // 2)}")


