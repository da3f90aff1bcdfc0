"""docs/troubleshooting.md quotes metrics/bench_inputs.json (bench/input_bounds.py), and the comb's counts there
are what the code gives now."""

from __future__ import annotations

import json
from pathlib import Path

from moechat.config.params import DataConfig
from moechat.data import fixture, oasst
from moechat.data.threads import build_threads, max_messages_for

ROOT = Path(__file__).resolve().parents[2]


def test_troubleshooting_quotes_the_bench_file_and_the_comb_counts_are_current():
    bench = json.loads((ROOT / "metrics" / "bench_inputs.json").read_text())
    doc = " ".join((ROOT / "docs" / "troubleshooting.md").read_text().split())
    dvc, comb = bench["alias_bomb"]["dvc_status"], bench["comb"]
    assert not dvc["finished"]
    assert (f"{dvc['params_bytes']}-byte params file of nine levels of nine aliases was still running when stopped "
            f"after {dvc['seconds']:.0f} s, at {dvc['peak_rss_mb']} MB") in doc
    assert (f"{comb['depth']:,}-deep comb of {comb['rows']:,} rows at `seq_len` {comb['seq_len']}, the whole paths are "
            f"{comb['whole']['threads']:,} threads holding {comb['whole']['messages']:,} messages "
            f"({comb['whole']['seconds']:.1f} s to build, before any tokenizing); cut, {comb['cut']['threads']} "
            f"threads holding {comb['cut']['messages']:,} messages ({comb['cut']['seconds']:.2f} s)") in doc
    depth, cap = comb["depth"], max_messages_for(comb["seq_len"])
    assert comb["whole"]["messages"] == sum(2 * k + 2 for k in range(depth // 2)) + depth
    rows = fixture.comb_tree(depth, "c")
    threads = build_threads(oasst.filter_messages(rows, DataConfig()).kept, "all", cap)
    assert (len(threads.conversations), sum(len(c["messages"]) for c in threads.conversations)) == \
        (comb["cut"]["threads"], comb["cut"]["messages"])
    assert threads.cut == comb["cut"]["cut"]
