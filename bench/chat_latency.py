"""Time to first token of `moechat chat`, full-precision export vs GPTQ 4-bit, side by side.

What a user waits for: from starting `moechat chat DIR --prompt ...` to the first character of the reply
on stdout (a fresh process each time: Python start, imports, loading the folder, the prompt's forward
pass and the first token). Each folder runs `--repeats` times, alternating; the table shows the median
and the quantized / full-precision ratio, and how long `import gptqmodel` alone takes (paid only by the
quantized folder). Writes metrics/bench_chat_latency.json with the device name and date.

    python bench/chat_latency.py                      # models/export vs models/quantized (after dvc repro)
    python bench/chat_latency.py --tiny               # folders of the tests' tiny model, built in a temp dir
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import device_name
from moechat.atomic import write_json

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "What is a mixture-of-experts model?"


def first_token_seconds(model_dir: Path, device: str) -> float:
    """Seconds from starting `moechat chat` to its first byte on stdout (the first token of the reply)."""
    cmd = [sys.executable, "-m", "moechat.cli", "chat", str(model_dir), "--prompt", PROMPT,
           "--max-new-tokens", "1", "--temperature", "0", "--device", device]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    first = proc.stdout.read(1)
    seconds = time.perf_counter() - start
    _, err = proc.communicate()
    if proc.returncode != 0 or not first:
        raise SystemExit(f"chat_latency: `{' '.join(cmd)}` failed ({proc.returncode}):\n{err.decode()[-2000:]}")
    return seconds


def import_seconds(module: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import {module}"], check=True, capture_output=True)
    return time.perf_counter() - start


def tiny_folders(scratch: Path) -> tuple[Path, Path]:
    """The tests' tiny model exported and quantized (random weights: latency does not depend on them)."""
    sys.path.insert(0, str(ROOT))
    from moechat.config.params import QuantizeConfig, load_params
    from moechat.data.chat_format import load_packed
    from moechat.release.export import export_model
    from moechat.release.quantize import quantize_stage
    from tests._release_tiny import tiny_model, tiny_tokenizer, write_prepared

    tok = tiny_tokenizer()
    export_model(tiny_model(tok, seed=6), tok, load_params(ROOT / "params.yaml"), {}, scratch / "export")
    prepared = write_prepared(tok, scratch / "prepared")
    quantize_stage(scratch / "export", prepared / "conversations_train.jsonl", load_packed(prepared, "val"),
                   QuantizeConfig(group_size=32, calib_samples=8, calib_max_tokens=64, min_expert_tokens=4),
                   seed=0, out_dir=scratch / "quantized")
    return scratch / "export", scratch / "quantized"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fp", type=Path, default=Path("models/export"))
    p.add_argument("--quantized", type=Path, default=Path("models/quantized"))
    p.add_argument("--tiny", action="store_true", help="build the tests' tiny folders instead of --fp/--quantized")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("metrics/bench_chat_latency.json"))
    args = p.parse_args()

    with tempfile.TemporaryDirectory(prefix="moechat-latency-") as scratch:
        fp, quantized = tiny_folders(Path(scratch)) if args.tiny else (args.fp, args.quantized)
        runs: dict[str, list[float]] = {"full precision": [], "quantized": []}
        for _ in range(args.repeats):  # alternate, so load drift on a shared machine hits both alike
            runs["full precision"].append(first_token_seconds(fp, args.device))
            runs["quantized"].append(first_token_seconds(quantized, args.device))
    gptqmodel_import = import_seconds("gptqmodel")
    median = {name: statistics.median(times) for name, times in runs.items()}
    print(f"time to first token, `moechat chat --prompt` in a new process, median of {args.repeats} "
          f"({device_name(args.device)}):")
    for name, times in runs.items():
        print(f"  {name:<15} {median[name]:6.2f} s   (runs: {', '.join(f'{t:.2f}' for t in times)})")
    ratio = median["quantized"] / median["full precision"]
    print(f"  quantized / full precision: {ratio:.2f}x;  `import gptqmodel` alone: {gptqmodel_import:.2f} s")
    load = os.getloadavg()[0]  # a busy shared machine stretches every figure alike
    print(f"  load average (1 min) at the end: {load:.1f} on {os.cpu_count()} cores")
    write_json(args.out, {"device": device_name(args.device), "date": datetime.date.today().isoformat(),
                          "folders": "tiny" if args.tiny else {"fp": str(fp), "quantized": str(quantized)},
                          "seconds_to_first_token": runs, "median": median, "ratio_quantized_to_fp": ratio,
                          "gptqmodel_import_seconds": gptqmodel_import, "load_average_1min": load})
    return 0


if __name__ == "__main__":
    sys.exit(main())
