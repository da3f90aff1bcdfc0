"""The errors a user can fix. Every stage and command prints a MoechatError as one line (moechat.stage)."""

from __future__ import annotations


class MoechatError(Exception):
    """An error the user can fix from its message; stage scripts print it as one line, no traceback."""


class ConfigError(MoechatError, ValueError):
    """A params.yaml value that cannot work; the message names the key, the value and the fix."""


