"""params.yaml validation: every bad value fails before any work, naming the key, the value and the fix."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from moechat.errors import ConfigError
from moechat.config.params import ModelConfig, Params, TrainConfig, load_params, params_from_dict
from moechat.model.configuration_moechat import MoeChatConfig, MoeChatConfigError
from tests.support.params import reference, with_change

ROOT = Path(__file__).resolve().parents[2]






def test_reference_params_load_into_typed_sections():
    params = load_params(ROOT / "params.yaml")
    assert isinstance(params, Params)
    arch = params.model.architecture
    assert (arch.n_layer, arch.n_embd, arch.n_head) == (8, 1024, 16)
    assert (arch.num_experts, arch.num_experts_per_tok, arch.moe_every) == (10, 2, 2)
    assert params.data.langs == ("en",) and params.tokenizer.source == "gpt2"
    assert params.train.seq_len == 1024 and params.train.optimizer == "adamw_8bit"


def test_tiny_preset_is_valid_and_overrides_only_what_it_names():
    tiny = yaml.safe_load((ROOT / "presets" / "tiny.yaml").read_text())
    params = load_params(ROOT / "params.yaml", overrides=tiny)
    assert params.model.architecture.n_embd == 64 and params.train.seq_len == 256
    assert params.model.architecture.aux_loss_coef == 0.01  # untouched keys keep the reference value


def test_sections_are_frozen():
    params = load_params(ROOT / "params.yaml")
    with pytest.raises(AttributeError):
        params.model.init_from = None


@pytest.mark.parametrize(
    "section, key, value, expected",
    [
        ("model", "num_experts_per_tok", 11, "model.num_experts_per_tok=11 must be <= model.num_experts=10"),
        ("model", "n_head", 7, "model.n_embd=1024 must be divisible by model.n_head=7"),
        ("model", "n_positions", 512, "train.seq_len=1024 must be <= model.n_positions=512"),
        ("data", "val_fraction", 1.0, "data.val_fraction=1.0 must lie strictly between 0 and 1"),
        ("data", "val_fraction", 0, "data.val_fraction=0.0 must lie strictly between 0 and 1"),
        ("data", "thread_policy", "longest", "data.thread_policy='longest' is not one of best | all"),
        ("model", "num_experts", "10", "model.num_experts='10' must be of type int, got str"),
        ("train", "gradient_checkpointing", "yes", "train.gradient_checkpointing='yes' must be of type bool"),
        ("model", "n_layer", True, "model.n_layer=True must be of type int, got bool"),
        ("data", "langs", "en", "data.langs='en' must be a list of strings"),
        ("train", "optimizer", "sgd", "train.optimizer='sgd' is not one of adamw_8bit | adamw"),
        ("quantize", "bits", 5, "quantize.bits=5 must be one of 2, 3, 4, 8"),
        ("model", "z_loss_coef", -0.1, "model.z_loss_coef=-0.1 must be >= 0"),
        ("eval", "max_new_tokens", 0, "eval.max_new_tokens=0 must be >= 1"),
        ("quantize", "calib_samples", 0, "quantize.calib_samples=0 must be >= 1"),
    ],
)
def test_bad_values_name_key_value_and_fix(section, key, value, expected):
    with pytest.raises(ConfigError) as err:
        params_from_dict(with_change(section, key, value))
    assert expected in str(err.value)


def test_unknown_key_is_named_with_the_known_ones():
    raw = reference()
    raw["model"]["n_experts"] = 8
    with pytest.raises(ConfigError, match=r"unknown key model\.n_experts; known keys in model: init_from"):
        params_from_dict(raw)


def test_unknown_section_is_named():
    raw = reference()
    raw["optimizer"] = {"lr": 1}
    with pytest.raises(ConfigError, match="unknown key optimizer"):
        params_from_dict(raw)


def test_int_is_accepted_where_a_float_is_expected():
    params = params_from_dict(with_change("train", "lr", 1))
    assert params.train.lr == 1.0 and isinstance(params.train.lr, float)


def test_missing_file_says_how_to_fix(tmp_path):
    with pytest.raises(ConfigError, match="not found; run from the project root"):
        load_params(tmp_path / "params.yaml")


def test_missing_key_is_named_not_defaulted():
    raw = reference()
    del raw["train"]["lr"]
    with pytest.raises(ConfigError, match=r"missing key train\.lr; every key of train must be set"):
        params_from_dict(raw)


def test_model_and_train_sections_have_no_second_copy_of_the_defaults():
    """params.yaml is the one source of the model and train values: the dataclasses repeat none of them."""
    for section in (ModelConfig, TrainConfig):
        for f in dataclasses.fields(section):
            assert f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING, f.name


def test_model_keys_are_the_model_configs_own_fields():
    """Every model key besides the three init keys is a MoeChatConfig field of the same name and value."""
    raw = reference()["model"]
    arch = load_params(ROOT / "params.yaml").model.architecture
    init_keys = {"init_from", "init_layers", "upcycle_reinit_ratio"}
    assert set(raw) - init_keys == set(MoeChatConfig.hyperparameters())
    assert {name: getattr(arch, name) for name in MoeChatConfig.hyperparameters()} == \
        {name: value for name, value in raw.items() if name not in init_keys}


def test_a_model_config_error_speaks_the_params_key(tmp_path):
    """The config's own check, with params.yaml's key and file in the message (one check, two callers)."""
    with pytest.raises(MoeChatConfigError, match=r"^MoeChatConfig.dropout=1.5 must be in \[0, 1\)$"):
        MoeChatConfig(dropout=1.5)
    with pytest.raises(ConfigError, match=r"^params.yaml: model.dropout=1.5 must be in \[0, 1\)$"):
        params_from_dict(with_change("model", "dropout", 1.5))


def test_upcycling_with_a_freshly_trained_tokenizer_is_refused():
    raw = reference()
    raw["model"]["init_from"] = "gpt2-medium"
    raw["tokenizer"]["source"] = "train"
    with pytest.raises(ConfigError, match="model.init_from='gpt2-medium' needs the parent's tokenizer"):
        params_from_dict(raw)


# ----------------------------------------------------------------------------------------------------
# Issue 12: values that passed validation and failed late, or were accepted silently


@pytest.mark.parametrize(
    "section, key, value, expected",
    [
        (None, "seed", -1, "seed=-1 must be in 0..4294967295"),
        (None, "seed", 2**32, "seed=4294967296 must be in 0..4294967295"),
        ("train", "beta1", 1.0, "train.beta1=1.0 must be in [0, 1)"),
        ("train", "beta2", -0.5, "train.beta2=-0.5 must be in [0, 1)"),
        ("model", "initializer_range", -0.02, "model.initializer_range=-0.02 must be > 0"),
        ("train", "weight_decay", -0.1, "train.weight_decay=-0.1 must be >= 0"),
        ("train", "grad_clip", -1.0, "train.grad_clip=-1.0 must be >= 0 (0 = no clipping)"),
        ("model", "moe_every", 9, "model.moe_every=9 must be <= model.n_layer=8"),
        ("eval", "prompts", [], "eval.prompts must list at least one non-empty prompt"),
        ("eval", "prompts", ["  "], "eval.prompts must list at least one non-empty prompt"),
        ("model", "layer_norm_epsilon", 0.0, "model.layer_norm_epsilon=0.0 must be > 0"),
        ("model", "aux_loss_coef", float("inf"), "model.aux_loss_coef=inf must be a finite number"),
        ("train", "lr", float("nan"), "train.lr=nan must be a finite number"),
        ("model", "n_positions", 10_000_000, "model.n_positions=10000000 must be <= 65536"),
    ],
)
def test_values_that_failed_late_are_refused_at_load(section, key, value, expected):
    raw = reference()
    (raw if section is None else raw[section])[key] = value
    with pytest.raises(ConfigError) as err:
        params_from_dict(raw)
    assert expected in str(err.value)


def test_tutel_backend_without_tutel_is_refused_at_load(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tutel" else real(name, *a))
    with pytest.raises(ConfigError, match=r"model.moe_backend=tutel but tutel is not installed.*moe_backend: torch"):
        params_from_dict(with_change("model", "moe_backend", "tutel"))


def test_yaml11_exponent_float_gets_the_spelling_that_works(tmp_path):
    text = (ROOT / "params.yaml").read_text().replace("lr: 1.0e-4", "lr: 3e-4", 1)
    assert "lr: 3e-4" in text
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(ConfigError, match=r"train.lr='3e-4' was read as a string.*write 3.0e-4"):
        load_params(tmp_path / "params.yaml")


def test_duplicate_yaml_key_is_named_with_both_lines(tmp_path):
    lines = (ROOT / "params.yaml").read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("  lr:"))
    lines.insert(at + 1, "  lr: 1.0e-3")
    (tmp_path / "params.yaml").write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError) as err:
        load_params(tmp_path / "params.yaml")
    assert f"params.yaml:{at + 2}: key 'lr' appears twice in one mapping (first at line {at + 1})" in str(err.value)


def test_duplicate_section_is_named_not_reported_as_missing_keys(tmp_path):
    text = (ROOT / "params.yaml").read_text() + "\nquantize:\n  bits: 4\n"
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(ConfigError, match=r"key 'quantize' appears twice"):
        load_params(tmp_path / "params.yaml")
