"""Hostile inputs, bounded: a params.yaml alias bomb read by moechat and by DVC, and a comb-shaped message
tree threaded with and without the seq_len bound. Prints the figures and writes metrics/bench_inputs.json.

- alias bomb: nine levels of nine aliases (9^9 strings once expanded) in ~500 bytes. `load_params` time to
  refuse it; `dvc status` in a scratch repo whose stage lists another key, stopped after --dvc-timeout s
  (finished or not, and its peak resident memory).
- comb: a chain --depth messages deep with an assistant leaf on every user turn. Messages in all threads
  (the work of building and tokenizing them) with thread_policy all, whole paths and cut at
  max_messages_for(seq_len), and the seconds each takes.

    python bench/input_bounds.py [--dvc-timeout 60] [--depth 6000] [--seq-len 1024]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from benchlib import device_name  # noqa: E402
from moechat.errors import ConfigError  # noqa: E402
from moechat.config.params import DataConfig, load_params  # noqa: E402
from moechat.data import fixture, oasst  # noqa: E402
from moechat.data.threads import build_threads, max_messages_for  # noqa: E402
from moechat.atomic import write_json  # noqa: E402


def alias_bomb(levels: int = 9) -> str:
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "\n".join(lines) + "\nlr: 0.1\n"


def peak_rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def dvc_status_on_bomb(timeout: float) -> dict:
    """`dvc status` in a scratch git+DVC repo whose params.yaml is the bomb and whose stage lists `lr` only."""
    dvc = shutil.which("dvc") or str(Path(sys.executable).with_name("dvc"))
    env = {**os.environ, "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@localhost",
           "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@localhost"}
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp)
        subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
        subprocess.run([dvc, "init", "-q"], cwd=repo, check=True, env=env)
        (repo / "params.yaml").write_text(alias_bomb())
        (repo / "dvc.yaml").write_text("stages:\n  s:\n    cmd: echo hi > out.txt\n    params:\n      - lr\n"
                                       "    outs:\n      - out.txt\n")
        t0 = time.perf_counter()
        proc = subprocess.Popen([dvc, "status"], cwd=repo, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        peak = 0
        while proc.poll() is None and time.perf_counter() - t0 < timeout:
            peak = max(peak, peak_rss_kb(proc.pid))
            time.sleep(0.5)
        finished = proc.poll() is not None
        if not finished:
            proc.kill()
            proc.wait()
        return {"params_bytes": len(alias_bomb().encode()), "finished": finished,
                "seconds": round(time.perf_counter() - t0, 1), "peak_rss_mb": round(peak / 1024)}


def moechat_on_bomb() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "params.yaml"
        path.write_text(alias_bomb().replace("lr: 0.1\n", "") + (ROOT / "params.yaml").read_text())
        t0 = time.perf_counter()
        try:
            load_params(path)
            refused = ""
        except ConfigError as err:
            refused = str(err).replace(str(path), "params.yaml")
        return {"seconds": round(time.perf_counter() - t0, 4), "error": refused}


def threads_on_comb(depth: int, seq_len: int) -> dict:
    kept = oasst.filter_messages(fixture.comb_tree(depth), DataConfig()).kept
    out = {"rows": len(kept), "depth": depth, "seq_len": seq_len}
    for name, cap in (("cut", max_messages_for(seq_len)), ("whole", None)):  # cut first: no GC debt
        t0 = time.perf_counter()
        threads = build_threads(kept, "all", cap)
        out[name] = {"threads": len(threads.conversations),
                     "messages": sum(len(c["messages"]) for c in threads.conversations),
                     "seconds": round(time.perf_counter() - t0, 3), **({"cut": threads.cut} if cap else {})}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dvc-timeout", type=float, default=60.0)
    parser.add_argument("--depth", type=int, default=6000)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--out", type=Path, default=ROOT / "metrics" / "bench_inputs.json")
    args = parser.parse_args()
    ours, theirs = moechat_on_bomb(), dvc_status_on_bomb(args.dvc_timeout)
    print(f"device: {device_name()}")
    print(f"alias bomb ({theirs['params_bytes']} bytes): load_params refused it in {ours['seconds']} s; dvc status "
          f"{'finished' if theirs['finished'] else 'still running'} after {theirs['seconds']} s, peak "
          f"{theirs['peak_rss_mb']} MB")
    threads = threads_on_comb(args.depth, args.seq_len)
    for name in ("cut", "whole"):
        t = threads[name]
        print(f"comb {threads['rows']} rows, {args.depth} deep, {name:>5}: {t['threads']:>5} threads, "
              f"{t['messages']:>10,} messages, {t['seconds']:.3f} s")
    write_json(args.out, {"device": device_name(), "date": date.today().isoformat(),
                          "alias_bomb": {"moechat": ours, "dvc_status": theirs}, "comb": threads})


if __name__ == "__main__":
    main()
