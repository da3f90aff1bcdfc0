"""The training curves: DVCLive metrics, one expert-share TSV per MoE layer, and their copy in each checkpoint.

The curves belong to the checkpoint lineage. Every checkpoint holds a copy of the live folder's `plots/` and
`metrics.json` as of its step (`snapshot_live`); a resumed run puts that copy back (`restore_live`) and a
fresh start empties the folder (`reset_live`), so the curves an experiment commits are those of the run it
resumed, whatever a crash or another experiment left in the workspace (docs/pipeline.md, "Resume after a
crash"). `moechat.train` calls these from its loop; nothing here knows about the model or the engine.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

EXPERT_SHARES_SUBDIR = Path("plots") / "expert_shares"
LIVE_COPY = "live"  # inside a checkpoint: the DVCLive curves of its lineage up to its step
LIVE_ITEMS = ("plots", "metrics.json")  # what of a DVCLive folder a checkpoint keeps and restores


def open_live(live_dir: Path, resumed_from: Optional[Path], step: int, log: Callable[[str], Any]) -> Any:
    """The DVCLive logger of a run, its curves those of the checkpoint lineage: restored from the checkpoint
    `resumed_from` (of `step`) when resuming, whatever another experiment or a crashed run left in the
    workspace; empty on a fresh start (`resumed_from` None). `log` says so when a checkpoint has no copy."""
    from dvclive import Live

    if resumed_from is None:
        reset_live(live_dir)
    elif not restore_live(resumed_from, live_dir, step):
        log(f"{resumed_from} holds no copy of the DVCLive curves (written by an older moechat); kept the curves "
            f"in {live_dir} up to step {step}")
    return Live(str(live_dir), resume=resumed_from is not None, save_dvc_exp=False, dvcyaml=None)


def log_train_step(live: Any, step: int, values: Mapping[str, Optional[float]], router: list[dict[str, Any]]
                   ) -> None:
    """One optimizer step: `train/<name>` for each of `values` that was measured (not None; grad_norm is None
    when the engine does not report it), and per MoE layer `moe/layer{i}/expert{e}_share` and
    `moe/layer{i}/dropped_share`."""
    live.step = step
    for name, value in values.items():
        if value is not None:
            live.log_metric(f"train/{name}", value)
    for r in router:
        for e, share in enumerate(r["expert_share"]):
            live.log_metric(f"moe/layer{r['layer']}/expert{e}_share", share)
        live.log_metric(f"moe/layer{r['layer']}/dropped_share", r["dropped_share"])


def log_val(live: Any, step: int, val: Mapping[str, float]) -> None:
    """A validation pass: `val/lm_loss` and `val/aux_loss`."""
    live.step = step
    live.log_metric("val/lm_loss", val["lm_loss"])
    live.log_metric("val/aux_loss", val["aux_loss"])


def log_expert_shares(live_dir: Path, step: int, router: list[dict[str, Any]]) -> None:
    """Append this step's routing to one long-format TSV per MoE layer,
    `<live>/plots/expert_shares/layer{i}.tsv` (`step, series, share`; series `expert0..N-1` and
    `dropped`), so one chart per layer draws every expert (dvc_templates/expert_shares.json). Each call
    opens, appends and closes, like DVCLive's own rows, so the checkpoint's copy of the live folder is
    consistent."""
    folder = Path(live_dir) / EXPERT_SHARES_SUBDIR
    folder.mkdir(parents=True, exist_ok=True)
    for r in router:
        path = folder / f"layer{r['layer']}.tsv"
        rows = [f"{step}\texpert{e}\t{share}\n" for e, share in enumerate(r["expert_share"])]
        rows.append(f"{step}\tdropped\t{r['dropped_share']}\n")
        with open(path, "a", encoding="utf-8", newline="") as f:
            if f.tell() == 0:
                f.write("step\tseries\tshare\n")
            f.write("".join(rows))


def snapshot_live(live_dir: Path, checkpoint: Path) -> None:
    """Copy the DVCLive items (`plots/`, `metrics.json`) that exist in `live_dir` into `checkpoint/live`
    (called on the unpublished checkpoint folder, after this step's rows are flushed)."""
    dst = Path(checkpoint) / LIVE_COPY
    dst.mkdir(parents=True, exist_ok=True)
    for name in LIVE_ITEMS:
        item = Path(live_dir) / name
        if item.is_dir():
            shutil.copytree(item, dst / name)
        elif item.is_file():
            shutil.copy2(item, dst / name)


def reset_live(live_dir: Path) -> None:
    """Empty the DVCLive items of `live_dir`: a fresh experiment must not inherit curves (or extra
    per-expert series) that another experiment left in the workspace."""
    for name in LIVE_ITEMS:
        item = Path(live_dir) / name
        if item.is_dir():
            shutil.rmtree(item)
        elif item.exists():
            item.unlink()


def restore_live(checkpoint: Path, live_dir: Path, step: int) -> bool:
    """Replace the DVCLive items of `live_dir` with the copy saved in `checkpoint` (of `step`).

    Whatever the workspace holds (another experiment's curves, rows a crashed run wrote past this step,
    a row torn by kill -9, or nothing because DVC removed a non-persistent out) is discarded: the copy was
    taken after the step's rows were flushed, so it is consistent. A crash during the restore is harmless,
    the next run restores again from the same copy. A checkpoint written before curves were saved with it
    has no copy: then the workspace curves are kept up to `step` (rows past it and torn rows are cut),
    since they are the only record of the steps before it, and False is returned."""
    saved = Path(checkpoint) / LIVE_COPY
    if not saved.is_dir():
        trim_live(live_dir, step)
        return False
    reset_live(live_dir)
    shutil.copytree(saved, live_dir, dirs_exist_ok=True)
    return True


def trim_live(live_dir: Path, step: int) -> None:
    """Cut every curve TSV under `live_dir/plots` to its rows of steps <= `step`; torn rows go too."""
    plots = Path(live_dir) / "plots"
    for path in sorted(plots.rglob("*.tsv")) if plots.is_dir() else []:
        lines = path.read_text(encoding="utf-8").split("\n")
        header = lines[0].split("\t")
        if "step" not in header:
            continue
        column = header.index("step")
        kept = [line for line in lines[1:] if _row_step(line, len(header), column) is not None
                and _row_step(line, len(header), column) <= step]
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("\n".join([lines[0], *kept]) + "\n", encoding="utf-8")
        os.replace(tmp, path)


def _row_step(line: str, n_fields: int, column: int) -> Optional[int]:
    """The step of one TSV row, or None for a torn (short or non-numeric) row."""
    fields = line.split("\t")
    if len(fields) != n_fields or not fields[column].isdigit():
        return None
    return int(fields[column])
