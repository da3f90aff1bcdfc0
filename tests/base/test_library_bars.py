"""lm-eval's progress bars (its per-task document bar, `Tokenizing inputs`, `Running loglikelihood requests`)
stay off the console and out of demo.log, though lm-eval passes `disable=False` explicitly, which beats
TQDM_DISABLE; MOECHAT_VERBOSE=1 shows them (moechat.quiet.library_bars_off)."""

from __future__ import annotations

import pytest

from moechat.config.params import EvalConfig
from moechat.eval.harness import run_lm_eval
from tests.support.tiny import tiny_model, tiny_tokenizer

pytest.importorskip("lm_eval")  # the `eval` extra

LOCAL = EvalConfig(lm_eval_tasks=("moechat_tiny_mc",), lm_eval_limit=4, lm_eval_include_path="tests/fixtures/lm_eval_tasks")
BARS = ("Tokenizing inputs", "Running loglikelihood requests", "%|")


@pytest.fixture()
def model_and_tokenizer(monkeypatch):
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).resolve().parents[2])  # the task's data_files are relative to the root
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    tok = tiny_tokenizer()
    return tiny_model(tok, seed=3), tok


@pytest.mark.slow  # lm-eval builds its task index: tens of seconds on a loaded 2-core machine
def test_lm_eval_bars_are_quiet_by_default(model_and_tokenizer, monkeypatch, capfd):
    monkeypatch.delenv("MOECHAT_VERBOSE", raising=False)
    run_lm_eval(*model_and_tokenizer, LOCAL, seed=0)
    err = capfd.readouterr().err
    assert not [bar for bar in BARS if bar in err], err[-2000:]


@pytest.mark.parametrize("verbose", [False, True])
def test_a_bar_that_passes_disable_false_is_off_unless_verbose(verbose, monkeypatch):
    """What lm-eval does: `tqdm(..., disable=False)`, which TQDM_DISABLE cannot turn off."""
    import io

    from tqdm import tqdm

    from moechat.quiet import library_bars_off

    monkeypatch.setenv("TQDM_DISABLE", "1")
    if verbose:
        monkeypatch.setenv("MOECHAT_VERBOSE", "1")
    else:
        monkeypatch.delenv("MOECHAT_VERBOSE", raising=False)
    shown, hidden = io.StringIO(), io.StringIO()
    list(tqdm(range(3), desc="outside", disable=False, file=shown))
    with library_bars_off():
        list(tqdm(range(3), desc="Tokenizing inputs", disable=False, file=hidden))
    assert "outside" in shown.getvalue()  # the library's argument wins over TQDM_DISABLE, as in lm-eval
    assert ("Tokenizing inputs" in hidden.getvalue()) == verbose
    assert list(tqdm(range(2), disable=False, file=io.StringIO())) == [0, 1]  # the class is put back
