"""Hub checks: offline switches, and every failure huggingface_hub 2.x raises becomes a HubError naming the key."""

from __future__ import annotations

import time
from types import SimpleNamespace

import httpx2
import pytest
from huggingface_hub import HfApi, constants
from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, HFValidationError, OfflineModeIsEnabled,
                                    RepositoryNotFoundError, RevisionNotFoundError)

from moechat import hub


@pytest.fixture()
def online(monkeypatch):
    """No offline switch set, whatever the environment running the tests says."""
    for var in hub.OFFLINE_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def _response(status: int) -> httpx2.Response:
    return httpx2.Response(status, request=httpx2.Request("GET", "https://huggingface.co/api/models/x/y"))


def _raising(err: BaseException):
    def info(self, repo_id, *, revision=None, timeout=None):
        raise err
    return info


@pytest.mark.parametrize("err, message", [
    (httpx2.ConnectError("[Errno -2] Name or service not known"), "unreachable from this machine .ConnectError"),
    (httpx2.ProxyError("407 Proxy Authentication Required"), "unreachable from this machine .ProxyError"),
    (httpx2.ConnectTimeout("timed out"), "did not answer within 3s"),
    (OfflineModeIsEnabled("offline"), "unreachable"),
    (RepositoryNotFoundError("404", response=_response(404)), "no such model on the Hub"),
    (GatedRepoError("403", response=_response(403)), "the model is gated"),
    (RevisionNotFoundError("404", response=_response(404)), "has no revision 'v9'"),
    (HfHubHTTPError("503 Service Unavailable", response=_response(503)), "answered HTTP 503"),
    (HFValidationError("Repo id must be in the form"), "not a valid Hub id"),
])
def test_hub_failures_name_the_key_value_and_fix(online, monkeypatch, err, message):
    monkeypatch.setattr(HfApi, "model_info", _raising(err))
    with pytest.raises(hub.HubError, match=rf"model.init_from='org/tiny' \(revision 'v9'\): .*{message}.*"
                                           rf"use a local folder; or set HF_HUB_OFFLINE=1") as info:
        hub.require_hub_repo("model.init_from", "org/tiny", "model", revision="v9", timeout_s=3,
                             hint="use a local folder")
    assert info.value.__cause__ is err


def test_returns_the_commit_sha_and_asks_the_right_endpoint(online, monkeypatch):
    calls = []

    def info(kind):
        def call(self, repo_id, *, revision=None, timeout=None):
            calls.append((kind, repo_id, revision, timeout))
            return SimpleNamespace(sha=f"{kind}-sha")
        return call

    monkeypatch.setattr(HfApi, "dataset_info", info("dataset"))
    monkeypatch.setattr(HfApi, "model_info", info("model"))
    assert hub.require_hub_repo("data.source", "OpenAssistant/oasst1", "dataset", "main", timeout_s=4) == "dataset-sha"
    assert hub.require_hub_repo("tokenizer.source", "gpt2", "model") == "model-sha"
    assert calls == [("dataset", "OpenAssistant/oasst1", "main", 4), ("model", "gpt2", None, hub.TIMEOUT_S)]


def test_offline_env_skips_the_check(online, monkeypatch):
    monkeypatch.setattr(HfApi, "dataset_info", _raising(AssertionError("the Hub must not be asked offline")))
    assert hub.hub_offline() is False
    for var in hub.OFFLINE_VARS:
        monkeypatch.setenv(var, "1")
        assert hub.hub_offline() is True
        assert hub.require_hub_repo("data.source", "OpenAssistant/oasst1", "dataset") is None
        monkeypatch.delenv(var)


def test_a_hanging_request_is_cut_at_the_timeout(online, monkeypatch):
    # DNS resolution is outside httpx's timeouts; the thread bound covers it.
    def hang(self, repo_id, *, revision=None, timeout=None):
        time.sleep(10)

    monkeypatch.setattr(HfApi, "dataset_info", hang)
    start = time.perf_counter()
    with pytest.raises(hub.HubError, match=r"data.source='a/b': the Hugging Face Hub did not answer within 1s"):
        hub.require_hub_repo("data.source", "a/b", "dataset", timeout_s=1)
    assert time.perf_counter() - start < 3


def test_real_request_to_a_closed_port_fails_fast(online, monkeypatch):
    # The real client, no mock: nothing listens on the discard port, so the connect is refused.
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    start = time.perf_counter()
    with pytest.raises(hub.HubError,
                       match=r"tokenizer.source='gpt2': the Hugging Face Hub is unreachable .*ConnectError"):
        hub.require_hub_repo("tokenizer.source", "gpt2", "model", timeout_s=2)
    assert time.perf_counter() - start < 3
