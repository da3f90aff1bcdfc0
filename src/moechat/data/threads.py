"""Message trees -> conversation threads: every root-to-assistant path (`all`) or the best-ranked reply per
branch (`best`), with paths bounded by what one `train.seq_len` block can hold.

OASST1 rows are a forest (message_id / parent_id); `oasst` loads, validates and filters them, and this module
turns the kept rows into the threads the chat format tokenizes.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal


def _sibling_key(row: dict[str, Any]) -> tuple:
    """Best first: ranked replies by rank (0 = best), then unranked ones; ties broken by message id, so
    the choice is deterministic and independent of row order."""
    return (row["rank"] is None, row["rank"] if row["rank"] is not None else 0, row["message_id"])


@dataclass
class Threads:
    conversations: list[dict[str, Any]]  # {"message_tree_id", "messages": [{"role", "content"}]}
    skipped: dict[str, int] = field(default_factory=dict)
    # Paths longer than `max_messages` (see `build_threads`): {"max_messages", "paths_cut", "paths_merged"}
    cut: dict[str, int] = field(default_factory=dict)


def max_messages_for(seq_len: int) -> int:
    """The most messages of a path that can reach the model: each message costs at least its two special
    tokens (<|im_start|> and <|im_end|>), so the first seq_len // 2 + 2 messages, trimmed to an assistant
    turn, hold more than seq_len tokens, and the overlong rule (chat.fit_to_length) keeps nothing beyond them."""
    return seq_len // 2 + 2


def build_threads(kept: dict[str, dict[str, Any]], policy: Literal["best", "all"], max_messages: int | None = None,
                  overlong: Literal["truncate", "drop"] = "truncate") -> Threads:
    """Turn kept messages into conversations that start with a user turn and end with an assistant turn.

    best: from the root, follow the best sibling (`_sibling_key`) at every branch; the thread stops at a
          leaf and is cut after its last assistant message (Guanaco-style, one thread per tree).
    all:  every assistant message with no assistant below it ends one thread (its root path), so every
          assistant reply is trained on and no thread is a prefix of another.
    Texts are stripped of surrounding whitespace (the chat template adds the separators).

    `max_messages` (`max_messages_for(seq_len)`) bounds the work by what can be kept, not by the number of
    paths: a path longer than it is cut there (overlong=truncate; the tokens kept are the same as from the
    whole path) and the cut paths that end on the same message are merged into one, or it is skipped and
    counted as `overlong` (overlong=drop, which would drop it whole). Without it, a comb-shaped tree (a chain
    thousands deep with an assistant leaf on every user turn) gives paths whose total length is quadratic.
    """
    children, roots = _children_by_parent(kept)
    skipped, cut = Counter(), Counter()
    paths: list[list[dict[str, Any]]] = []
    seen_cut_ends: set[str] = set()
    for root in roots:
        if root["role"] != "prompter":
            skipped["root_not_prompter"] += 1
            continue
        found = False
        for path, ends in (_best_path(root, children, max_messages) if policy == "best"
                           else _assistant_ends(root, children, max_messages)):
            path = _trim_to_assistant(path)
            if ends:  # a path cut at max_messages, standing for `ends` paths
                if overlong == "drop":
                    skipped["overlong"] += ends
                    continue
                cut["paths_cut"] += ends
                if path and path[-1]["message_id"] in seen_cut_ends:
                    cut["paths_merged"] += ends
                    continue
                cut["paths_merged"] += ends - 1
                if path:
                    seen_cut_ends.add(path[-1]["message_id"])
            if not path:  # no assistant turn within the cut: the user turns before it do not alternate
                if ends:
                    skipped["roles_not_alternating"] += ends
                continue
            if any(a["role"] == b["role"] for a, b in zip(path, path[1:])):
                skipped["roles_not_alternating"] += 1
                continue
            paths.append(path)
            found = True
        if not found:
            skipped["tree_without_assistant_reply"] += 1
    conversations = [{
        "message_tree_id": path[0]["message_tree_id"],
        "messages": [{"role": "user" if m["role"] == "prompter" else "assistant", "content": m["text"].strip()}
                     for m in path],
    } for path in paths]
    cut_report = {} if max_messages is None else {"max_messages": max_messages, "paths_cut": cut["paths_cut"],
                                                   "paths_merged": cut["paths_merged"]}
    return Threads(conversations, dict(skipped), cut_report)


def _children_by_parent(kept: dict[str, dict[str, Any]]) -> tuple[dict[str, list[dict[str, Any]]], list]:
    """Replies of each message, best first (`_sibling_key`), and the roots by id."""
    children: dict[str, list[dict[str, Any]]] = {}
    roots = []
    for row in kept.values():
        if row["parent_id"] is None:
            roots.append(row)
        else:
            children.setdefault(row["parent_id"], []).append(row)
    for siblings in children.values():
        siblings.sort(key=_sibling_key)
    roots.sort(key=lambda r: r["message_id"])
    return children, roots


def _trim_to_assistant(path: list[dict[str, Any]]) -> list[dict[str, Any]]:
    end = len(path)
    while end and path[end - 1]["role"] != "assistant":
        end -= 1
    return path[:end]


def _best_path(root: dict[str, Any], children: dict[str, list[dict[str, Any]]], max_messages: int | None
               ) -> Iterator[tuple[list, int]]:
    """The best-sibling path, with 1 when it runs past its last assistant turn beyond `max_messages` (then it
    is cut there), else 0."""
    path = [root]
    while children.get(path[-1]["message_id"]):
        path.append(children[path[-1]["message_id"]][0])
    path = _trim_to_assistant(path)
    if max_messages is not None and len(path) > max_messages:
        yield path[:max_messages], 1
    else:
        yield path, 0


def _assistant_ends(root: dict[str, Any], children: dict[str, list[dict[str, Any]]],
                    max_messages: int | None = None) -> Iterator[tuple[list, int]]:
    """Root paths of every assistant message that has no assistant message anywhere below it, in depth-first
    order, each with 0; iterative, with parent links instead of copied paths (chains run thousands deep).
    An end deeper than `max_messages` gives the path of its ancestor at that depth instead, once for all the
    ends below that ancestor, with their number: the work is O(tree + kept paths x max_messages)."""
    order, parent, depth = [], {root["message_id"]: None}, {root["message_id"]: 0}
    stack = [root]
    while stack:  # pre-order, children in sibling order
        node = stack.pop()
        order.append(node)
        for child in reversed(children.get(node["message_id"], [])):
            parent[child["message_id"]] = node
            depth[child["message_id"]] = depth[node["message_id"]] + 1
            stack.append(child)
    assistant_below: set[str] = set()
    for node in reversed(order):  # children before parents
        up = parent[node["message_id"]]
        if up is not None and (node["role"] == "assistant" or node["message_id"] in assistant_below):
            assistant_below.add(up["message_id"])
    cut_at: dict[str, dict[str, Any]] = {}  # a node at depth >= max_messages -> its ancestor at max_messages - 1
    ends_below: Counter = Counter()
    for node in order:  # parents before children
        mid = node["message_id"]
        if max_messages is not None and depth[mid] >= max_messages - 1:
            cut_at[mid] = node if depth[mid] == max_messages - 1 else cut_at[parent[mid]["message_id"]]
        if node["role"] == "assistant" and mid not in assistant_below:
            if max_messages is None or depth[mid] < max_messages:
                yield _root_path(node, parent), 0
            else:
                ends_below[cut_at[mid]["message_id"]] += 1
    for node in order:  # the cut paths, in the order of their ancestors
        if ends_below[node["message_id"]]:
            yield _root_path(node, parent), ends_below[node["message_id"]]


def _root_path(node: dict[str, Any], parent: dict[str, Any]) -> list[dict[str, Any]]:
    path = [node]
    while parent[path[-1]["message_id"]] is not None:
        path.append(parent[path[-1]["message_id"]])
    return path[::-1]


