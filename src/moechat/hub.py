"""Fail fast, and by name, when a params key points at the Hugging Face Hub and the Hub cannot serve it.

`datasets.load_dataset` and `from_pretrained` spend minutes retrying an unreachable Hub and then raise
transport tracebacks that do not say which params key was wrong. One metadata request through
huggingface_hub's own client (so `HTTPS_PROXY`, `HF_ENDPOINT` and tokens apply as for the real download)
answers in seconds, names the commit the download will read, and turns every failure into a `HubError`
that names the key, the value and what to do.
"""

from __future__ import annotations

import os
import threading
from typing import Literal

import httpx2  # huggingface_hub 2.x's transport: its network and timeout errors derive from httpx2.HTTPError
from huggingface_hub import HfApi, constants
from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, HFValidationError, OfflineModeIsEnabled,
                                    RepositoryNotFoundError, RevisionNotFoundError)

from moechat.errors import MoechatError

OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
TIMEOUT_S = 10.0
# What `load_dataset` / `from_pretrained` raise when the network or the repo fails mid-download: transport
# errors are httpx2's (not OSError), HTTP status errors are HfHubHTTPError (both), cache misses OSError.
HUB_LOAD_ERRORS: tuple[type[BaseException], ...] = (httpx2.HTTPError, OSError)


class HubError(MoechatError, RuntimeError):
    """A params key names a Hub repo the Hub cannot serve now; the message names the key and the fix."""


def looks_like_path(source: str) -> bool:
    """A value that can only be a local path (a Hub id is `name` or `org/name`): a missing one is a typo in a
    path, which must not be reported as an unreachable Hub."""
    return source.startswith((".", "/", "~")) or source.count("/") > 1 or "\\" in source


def hub_offline() -> bool:
    """True when the user asked the HF libraries to read only their local cache (any of `OFFLINE_VARS`)."""
    return constants.is_offline_mode() or any(
        os.environ.get(var, "").upper() in ("1", "ON", "YES", "TRUE") for var in OFFLINE_VARS)


def require_hub_repo(key: str, repo_id: str, kind: Literal["model", "dataset"], revision: str | None = None,
                     timeout_s: float = TIMEOUT_S, hint: str = "") -> str | None:
    """Check that the Hub serves `repo_id` at `revision`; return its commit sha, or None in offline mode
    (the caller then reads the local cache). Raises `HubError` naming `key` within about `timeout_s`
    seconds, DNS included: the request runs in a daemon thread that is abandoned when it overruns.

    `hint` is appended to the message: the local alternative for this key (a path to point it at).
    """
    if hub_offline():
        return None
    where = f"{key}={repo_id!r}" + (f" (revision {revision!r})" if revision else "")
    todo = "; ".join(part for part in (hint, "or set HF_HUB_OFFLINE=1 to use the local Hugging Face cache") if part)
    info = HfApi().dataset_info if kind == "dataset" else HfApi().model_info
    result: dict[str, object] = {}

    def call() -> None:
        try:
            result["sha"] = info(repo_id, revision=revision, timeout=timeout_s).sha
        except Exception as err:  # re-raised in the caller's thread below, translated or as is
            result["error"] = err

    thread = threading.Thread(target=call, name=f"hub-check-{key}", daemon=True)
    thread.start()
    thread.join(timeout_s + 1.0)
    if thread.is_alive():
        raise HubError(f"{where}: the Hugging Face Hub did not answer within {timeout_s:.0f}s (DNS or connect; "
                       f"proxies come from HTTPS_PROXY); {todo}")
    err = result.get("error")
    if err is None:
        return result["sha"]  # type: ignore[return-value]
    try:
        raise err
    except GatedRepoError:
        raise HubError(f"{where}: the {kind} is gated; accept its terms on huggingface.co and log in "
                       f"(`hf auth login` or HF_TOKEN); {todo}") from err
    except RevisionNotFoundError:
        raise HubError(f"{where}: the {kind} exists but has no revision {revision!r}; fix the revision "
                       f"(a branch, tag or commit sha); {todo}") from err
    except RepositoryNotFoundError:
        raise HubError(f"{where}: no such {kind} on the Hub (or it is private: log in with `hf auth login` "
                       f"or HF_TOKEN); check the id; {todo}") from err
    except HfHubHTTPError as http:
        raise HubError(f"{where}: the Hub answered HTTP {http.response.status_code} ({http}); retry later; "
                       f"{todo}") from err
    except HFValidationError:
        raise HubError(f"{where}: not a valid Hub id (`namespace/name`) nor an existing local path; "
                       f"fix the value; {todo}") from err
    except httpx2.TimeoutException:
        raise HubError(f"{where}: the Hugging Face Hub did not answer within {timeout_s:.0f}s; {todo}") from err
    except (httpx2.HTTPError, OfflineModeIsEnabled, OSError):
        raise HubError(f"{where}: the Hugging Face Hub is unreachable from this machine ({type(err).__name__}: "
                       f"{err}); {todo}") from err
