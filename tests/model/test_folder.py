"""The one model loader: a folder is checked before any slow import (one line naming the folder and the fix),
the caller picks the dtype, and the model comes back in eval mode on the device asked for."""

from __future__ import annotations

import pytest
import torch

from moechat.model.folder import ModelFolderError, load_model, load_tokenizer, read_config
from tests.support.tiny import save_model, tiny_model, tiny_tokenizer

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    tok = tiny_tokenizer()
    return save_model(tiny_model(tok, seed=2), tok, tmp_path_factory.mktemp("loader") / "final")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_caller_chooses_the_dtype(folder, dtype):
    model = load_model(folder, CPU, dtype)
    assert {p.dtype for p in model.parameters()} == {dtype} and not model.training
    assert type(model).__module__ == "moechat.model.modeling_moechat"  # the installed classes, not the folder's copy
    assert load_tokenizer(folder).eos_token == "<|im_end|>"


def test_a_missing_folder_or_config_is_one_line_naming_the_fix(tmp_path):
    with pytest.raises(ModelFolderError) as err:
        load_model(tmp_path / "final", CPU, torch.float32)
    assert str(err.value) == f"{tmp_path / 'final'}: no such folder; run the stage that writes it (dvc repro)"
    (tmp_path / "final").mkdir()
    with pytest.raises(ModelFolderError) as err:
        load_model(tmp_path / "final", CPU, torch.float32)
    assert str(err.value) == f"{tmp_path / 'final'}: no config.json; run the stage that writes it (dvc repro)"
    with pytest.raises(ModelFolderError) as err:
        read_config(tmp_path / "final", fix="pass models/export")
    assert str(err.value) == f"{tmp_path / 'final'}: no config.json; pass models/export"
