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
        ("quantize", "bits", 5, "quantize.bits=5 must be one of 2, 4, 8"),
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


# ----------------------------------------------------------------------------------------------------
# Issue 21: hostile params files and values that passed validation and crashed later


def _params_file(tmp_path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def _line_of(text: str, fragment: str) -> int:
    return text[:text.index(fragment)].count("\n") + 1


def _alias_bomb(levels: int = 9) -> str:
    """A billion-laughs file: 9 aliases per level, 9^levels strings once expanded, in ~1 KB."""
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def test_alias_bomb_is_refused_at_its_first_anchor(tmp_path):
    text = _alias_bomb() + (ROOT / "params.yaml").read_text()
    assert len(text.encode()) < 8000 and 9**9 > 3 * 10**8  # ~1 KB of bomb, 387M strings expanded
    path = _params_file(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_params(path)
    assert str(err.value) == f"{path}:1: YAML anchor &l0: params files take no anchors or aliases; write the value out"


def test_alias_bomb_through_a_stage_is_one_line(tmp_path):
    import subprocess
    import sys

    path = _params_file(tmp_path, (ROOT / "params.yaml").read_text().replace(
        "  lr: 1.0e-4", "  lr: *l8") + _alias_bomb())
    line = _line_of(path.read_text(), "*l8")
    done = subprocess.run([sys.executable, str(ROOT / "stages" / "download.py"), "--params", str(path), "--out",
                           str(tmp_path / "raw"), "--metrics", str(tmp_path / "m.json")],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == (f"download: error: {path}:{line}: YAML alias *l8: params files take no anchors or "
                           f"aliases; write the value out\n")


@pytest.mark.parametrize("old, new, fragment, expected", [
    ("quantize:\n", "quantize:\n  <<: {sym: true}\n", "<<",
     "the YAML merge key `<<` is not supported in params files; write the keys out in the section"),
    ("data:\n", "data:\n  1: x\n  foo: y\n", "1: x",
     "key '1' is not a name; params keys are names such as lr (quote it if it must be text)"),
    ("data:\n", "data:\n  ~: x\n", "~: x",
     "key '~' is not a name; params keys are names such as lr (quote it if it must be text)"),
    ("  lr: 1.0e-4", "  ? [a, b]\n  : 1\n  lr: 1.0e-4", "[a, b]",
     "a sequence key is not a name; params keys are names such as lr (quote it if it must be text)"),
    ("seed: 1337", "seed: " + "9" * 5000, "seed:",
     "an integer of 5000 digits; no params value needs more than 30 (seed < 2^32, sizes far below); fix the value"),
])
def test_yaml_that_params_never_need_is_named_with_its_line(tmp_path, old, new, fragment, expected):
    text = (ROOT / "params.yaml").read_text().replace(old, new, 1)
    path = _params_file(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_params(path)
    assert str(err.value) == f"{path}:{_line_of(text, fragment)}: {expected}"


def test_quoted_keys_that_look_like_numbers_reach_the_unknown_key_check(tmp_path):
    # '1' and foo side by side used to end in "'<' not supported between str and int"
    path = _params_file(tmp_path, (ROOT / "params.yaml").read_text().replace("data:\n", "data:\n  '1': x\n  foo: y\n"))
    with pytest.raises(ConfigError, match=r"unknown key data\.1; known keys in data: source"):
        load_params(path)
    raw = with_change("data", 1, "x")  # an int key from a preset or an overrides dict
    raw["data"]["foo"] = "y"
    with pytest.raises(ConfigError, match=r"unknown key data\.1; known keys"):
        params_from_dict(raw)


def test_non_utf8_params_and_a_folder_are_named(tmp_path):
    text = (ROOT / "params.yaml").read_text()
    path = tmp_path / "params.yaml"
    path.write_bytes(text.replace("  lr: 1.0e-4", "  lr: 1.0e-4  # caf\udce9", 1).encode("utf-8", "surrogateescape"))
    with pytest.raises(ConfigError) as err:
        load_params(path)
    line = _line_of(text, "  lr: 1.0e-4")
    assert str(err.value) == f"{path}:{line}: not valid UTF-8 (byte 0xe9); save the file as UTF-8"
    with pytest.raises(ConfigError) as err:
        load_params(tmp_path)
    assert str(err.value) == (f"{tmp_path}: is a folder, not a params file; pass the YAML file "
                              f"(e.g. --params params.yaml)")


@pytest.mark.parametrize("section, key, value, expected", [
    ("model", "capacity_factor", 1.0e308,
     "model.capacity_factor=1e+308 must be <= model.num_experts / model.num_experts_per_tok = 5 (there every "
     "expert can take every token, so no token is dropped); use 0 for dropless routing"),
    ("quantize", "bits", 3, "quantize.bits=3 must be one of 2, 4, 8 (GPTQ packs 32/bits weights per int32; 3-bit "
                            "rows straddle words)"),
    ("quantize", "group_size", 7, "quantize.group_size=7 must be one of -1, 16, 32, 64, 128, 256, 512, 1024 (-1 = "
                                  "one group per column; the sizes GPTQModel's kernels take), e.g. 128"),
    ("tokenizer", "vocab_size", 10**9, "tokenizer.vocab_size=1000000000 must be <= 1048576 (2^20; the largest "
                                       "published vocabularies hold ~256k tokens), e.g. 50257"),
    ("eval", "prompts", ["hi", 3], "eval.prompts=['hi', 3] must be a list of strings, e.g. [\"Write a haiku about "
                                   "autumn.\"]"),
    ("train", "lr", [1, 2], "train.lr=[1, 2] must be of type float, got list"),
    ("eval", "lm_eval_tasks", "piqa", "eval.lm_eval_tasks='piqa' must be a list of strings, e.g. [arc_easy, piqa]"),
])
def test_values_that_crashed_later_are_refused_at_load_with_one_line(section, key, value, expected):
    with pytest.raises(ConfigError) as err:
        params_from_dict(with_change(section, key, value))
    assert str(err.value) == f"params.yaml: {expected}"


def test_capacity_factor_at_the_no_drop_bound_is_accepted():
    assert params_from_dict(with_change("model", "capacity_factor", 5.0)).model.architecture.capacity_factor == 5.0


@pytest.mark.parametrize("key, value", [("n_embd", 1048576), ("n_inner", 10**10)])
def test_a_model_whose_weights_cannot_fit_this_machine_is_refused_before_allocating(key, value):
    from moechat.config import params as config
    from moechat.train.plan import count_params

    raw = with_change("model", key, value)
    shape = {k: v for k, v in raw["model"].items() if k in MoeChatConfig.hyperparameters()}
    count = count_params(MoeChatConfig(**shape), 50257).total  # the planner's count, independent of config.py
    with pytest.raises(ConfigError) as err:
        params_from_dict(raw)
    m = dict(reference()["model"], **{key: value})
    assert str(err.value) == (
        f"params.yaml: model sizes n_layer={m['n_layer']}, n_embd={m['n_embd']}, n_inner={m['n_inner']}, "
        f"num_experts={m['num_experts']} (vocabulary 50257) give {count:.3g} parameters, {4 * count / 2**30:,.1f} "
        f"GiB of fp32 weights, more than this machine's {config.physical_memory_bytes() / 2**30:,.1f} GiB of "
        f"memory; lower them (`moechat plan` sizes a model for a GPU)")


def test_the_weights_bound_is_the_planners_count_against_this_machines_memory(monkeypatch):
    from moechat.config import params as config
    from moechat.train.plan import count_params

    for overrides in ({}, yaml.safe_load((ROOT / "presets" / "tiny.yaml").read_text())):
        params = load_params(ROOT / "params.yaml", overrides=overrides)
        arch, vocab = params.model.architecture, params.tokenizer.vocab_size
        assert config.weight_count(arch, vocab) == count_params(arch, vocab).total
    reference_bytes = 4 * config.weight_count(load_params(ROOT / "params.yaml").model.architecture, 50257)
    monkeypatch.setattr(config, "physical_memory_bytes", lambda: reference_bytes)
    load_params(ROOT / "params.yaml")  # exactly fits
    monkeypatch.setattr(config, "physical_memory_bytes", lambda: reference_bytes - 1)
    with pytest.raises(ConfigError, match=r"give 5.07e\+08 parameters, 1.9 GiB of fp32 weights, more than this"):
        load_params(ROOT / "params.yaml")


@pytest.mark.parametrize("content, expected", [
    (b"[1, 2]", "holds a JSON list, not an object of DeepSpeed keys such as {\"zero_optimization\": {\"stage\": 2}}"),
    (b'{"zero_optimization": "\xff"}', "not valid UTF-8 (invalid start byte at byte 23); save the DeepSpeed config "
                                       "as UTF-8 JSON"),
    (b'{"zero_optimization": ', "not valid JSON (Expecting value: line 1 column 23 (char 22)); fix the file"),
])
def test_deepspeed_json_is_read_and_checked_at_load(tmp_path, content, expected):
    path = tmp_path / "ds.json"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as err:
        params_from_dict(with_change("train", "deepspeed", str(path)))
    assert str(err.value) == f"params.yaml: train.deepspeed={path}: {expected}"
    path.write_text('{"zero_optimization": {"stage": 2}}')
    assert params_from_dict(with_change("train", "deepspeed", str(path))).train.deepspeed == str(path)


def test_a_preset_is_read_with_the_same_refusals(tmp_path):
    from moechat.config.presets import merged_params

    preset = tmp_path / "bomb.yaml"
    preset.write_text(_alias_bomb())
    with pytest.raises(ConfigError) as err:
        merged_params(ROOT / "params.yaml", str(preset), ROOT / "presets")
    assert str(err.value) == (f"{preset}:1: YAML anchor &l0: params files take no anchors or aliases; "
                              f"write the value out")
