"""Crash-safe training checkpoints: safetensors for tensors, JSON for everything else, never pickle.

Layout: `<root>/<fingerprint>/step_<NNNNNNNN>/` holding
  model.safetensors                 the weights (the module's state dict)
  optimizer.safetensors             the optimizer state dict (bnb 8-bit state included): its tensors by name,
                                    the rest as JSON in the file's header metadata (`save_tree`)
  rng_rank<R>.safetensors           torch CPU (and CUDA) generator states of rank R; Python's and NumPy's
                                    as JSON in the header metadata
  ...                               whatever the caller's `extra_files` adds (train: the DVCLive curves
                                    as of this step, see moechat.train.curves.snapshot_live)
  state.json                        step, data cursor, scheduler, GradScaler, last losses, counters
  manifest.json                     the sha256 of every file above (moechat.train.integrity), written last

A checkpoint is written into `.tmp-step_<NNNNNNNN>`, fsynced and renamed into place, so a folder named
`step_*` with state.json and model.safetensors is complete; a leftover temp folder from a crash is
ignored and overwritten later. A folder being replaced or pruned is first renamed to
`.trash-step_<NNNNNNNN>` and only then deleted, so a crash mid-delete never leaves a half folder under a
`step_*` name. A checkpoint is written only from finite weights and optimizer state; a resume first checks
the manifest's hashes, the step against the folder name and the finiteness of what it loads, and falls
back to the previous intact checkpoint otherwise. The fingerprint (train params + the whole init folder + data) keeps a changed experiment
from resuming another run's checkpoint; other fingerprints' folders are left alone.
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import hashlib
import importlib
import json
import os
import random
import re
import shutil
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from moechat.errors import MoechatError
from moechat.train import integrity

STEP_DIR = re.compile(r"^step_(\d{8})$")
TRASH_PREFIX = ".trash-"
TREE_KEY = "tree"  # the safetensors header metadata key holding a saved tree's JSON skeleton
RNG_KEY = "rng"  # ... and an RNG file's Python and NumPy generator states
# DeepSpeed ZeRO-2's optimizer state_dict holds these small objects besides tensors: the loss scaler
# (static or dynamic), the ZeRO stage enum and the per-parameter slice addresses. They are stored as class
# name + plain attributes and rebuilt only when their exact name is listed here (no pickle, no lookup of
# arbitrary attributes: a checkpoint is untrusted input).
ALLOWED_OBJECTS = frozenset({
    "deepspeed.runtime.fp16.loss_scaler:LossScaler",
    "deepspeed.runtime.fp16.loss_scaler:DynamicLossScaler",
    "deepspeed.utils.tensor_fragment:fragment_address",
})
ALLOWED_ENUMS = frozenset({"deepspeed.runtime.zero.config:ZeroStageEnum"})
# Train keys that change bookkeeping only, not the optimisation trajectory: editing them keeps resuming.
# gradient_checkpointing recomputes the same forward (same loss and gradients within fp32 rounding, tested in
# test_modeling), so turning it on after an OOM, as the OOM message advises, keeps
# the run's progress.
# max_consecutive_skips only decides when a run of skipped (never applied) steps stops the run.
NON_TRAJECTORY_KEYS = ("eval_every", "eval_batches", "save_every", "keep_checkpoints", "gpu_memory_gb",
                       "gradient_checkpointing", "max_consecutive_skips")
# Train keys added after checkpoints existed, each with the value that reproduces what training did before the
# key: at that value the key is left out of the fingerprint, so a checkpoint written before it still resumes.
LATER_KEYS = {"attn_implementation": "sdpa"}
ENOSPC_TEXT = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")


class CheckpointError(MoechatError, RuntimeError):
    """A checkpoint that cannot be written or read back; the message names the file and the fix."""


@dataclass
class Cursor:
    """Where the data stream stands: `position` rows into the seeded permutation of `epoch`."""

    epoch: int = 0
    position: int = 0


@dataclass
class TrainState:
    """Everything besides tensors that a resumed run needs to continue bit-for-bit."""

    step: int = 0
    cursor: Cursor = field(default_factory=Cursor)
    tokens_seen: int = 0
    target_tokens_seen: int = 0
    train_seconds: float = 0.0
    fingerprint: str = ""
    # the last completed step's train losses and the latest val losses (with their step): a run that
    # resumes at its last step has nothing left to train and reports these
    last_losses: dict[str, float] = field(default_factory=dict)
    last_val: dict[str, float] = field(default_factory=dict)
    # optimizer steps whose gradients were not finite and were never applied (train.py, the skip policy)
    skipped_steps: int = 0
    consecutive_skips: int = 0

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "TrainState":
        """The state saved in a state.json, type-checked: an edited or damaged value is a TypeError/ValueError
        here (read_checkpoint reports it), never a crash steps later."""
        state = cls(**{**raw, "cursor": Cursor(**raw["cursor"])})
        counts = {"step": state.step, "tokens_seen": state.tokens_seen, "target_tokens_seen": state.target_tokens_seen,
                  "skipped_steps": state.skipped_steps, "consecutive_skips": state.consecutive_skips,
                  "cursor.epoch": state.cursor.epoch, "cursor.position": state.cursor.position}
        for key, value in counts.items():
            if type(value) is not int or value < 0:
                raise ValueError(f"{key}={value!r} is not a count (an int >= 0)")
        if type(state.train_seconds) not in (int, float) or not isinstance(state.fingerprint, str):
            raise ValueError(f"train_seconds={state.train_seconds!r} / fingerprint={state.fingerprint!r} malformed")
        for key in ("last_losses", "last_val"):
            if not isinstance(getattr(state, key), dict):
                raise ValueError(f"{key}={getattr(state, key)!r} is not a mapping")
        return state


# ----------------------------------------------------------------------------------------------------
# Fingerprint


def fingerprint(train_params: dict[str, Any], seed: int, init_dir: Path, data_dir: Path,
                world_size: int) -> str:
    """12 hex digits identifying an experiment: train params (minus bookkeeping keys), seed, world size,
    every file of the init folder and the prepared data's dataset fingerprints.

    The whole init folder counts, config.json included: model keys such as top_k, aux_loss_coef or
    capacity_factor change training without changing a single weight. JSON files are hashed without their
    `transformers_version` stamp, so upgrading transformers alone does not restart training."""
    h = hashlib.sha256()
    trajectory = {k: v for k, v in sorted(train_params.items())
                  if k not in NON_TRAJECTORY_KEYS and LATER_KEYS.get(k, object()) != v}
    h.update(json.dumps({"train": trajectory, "seed": seed, "world_size": world_size}, sort_keys=True).encode())
    init_dir = Path(init_dir)
    if not list(init_dir.glob("*.safetensors")):
        raise CheckpointError(f"{init_dir}: no *.safetensors weights to fingerprint; run the init stage first")
    files = sorted(p for p in init_dir.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(init_dir).parts))
    for path in files:
        h.update(path.relative_to(init_dir).as_posix().encode() + b"\0")
        if path.suffix == ".json":
            h.update(_json_without_version(path))
            continue
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
    for state in sorted(Path(data_dir).glob("*/state.json")):
        h.update(state.read_bytes())
    return h.hexdigest()[:12]


def _json_without_version(path: Path) -> bytes:
    raw = path.read_bytes()
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return raw  # not JSON after all: its bytes identify it
    if isinstance(obj, dict):
        obj.pop("transformers_version", None)
    return json.dumps(obj, sort_keys=True).encode()


# ----------------------------------------------------------------------------------------------------
# Nested state dicts <-> (JSON, safetensors)


class TensorTable:
    """The tensors of one safetensors file by name, each stored once.

    bitsandbytes' 8-bit optimizers hand every quantised parameter the same `qmap1`/`qmap2` tensor objects,
    and safetensors refuses tensors that share memory. A tensor met again as the very same view is stored
    once and referenced by its first name (so loading shares it again, as a fresh optimizer does); another
    view into storage already stored is copied."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors
        self._names: dict[tuple, str] = {}  # view key -> the name it was stored under
        self._storages: set[tuple] = set()  # (device, storage address) of every stored tensor

    def add(self, tensor: torch.Tensor, name: str) -> str:
        """Store `tensor` under `name` unless this exact view is stored already; the name it is stored under."""
        storage = (str(tensor.device), tensor.untyped_storage().data_ptr())
        view = (*storage, tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)
        if tensor.numel() > 0 and view in self._names:
            return self._names[view]
        stored = tensor.detach().cpu().contiguous()
        if tensor.numel() > 0 and storage in self._storages:
            stored = stored.clone()  # a different view into storage already stored
        self.tensors[name] = stored
        if tensor.numel() > 0:
            self._names[view] = name
            self._storages.add(storage)
        return name


def encode_tree(tree: Any, tensors: dict[str, torch.Tensor] | TensorTable, path: str = "") -> Any:
    """JSON-able copy of `tree` with every tensor moved into `tensors` under its path (a tensor object met
    twice is stored once, see TensorTable).

    Tuples and dicts with non-string keys (optimizer state is keyed by int) are tagged so that
    `decode_tree` gives back exactly the same Python types."""
    if not isinstance(tensors, TensorTable):
        tensors = TensorTable(tensors)
    if isinstance(tree, torch.Tensor):
        return {"__tensor__": tensors.add(tree, path or "tensor")}
    if isinstance(tree, dict):
        if all(isinstance(k, str) for k in tree):
            return {k: encode_tree(v, tensors, f"{path}.{k}" if path else k) for k, v in tree.items()}
        return {"__items__": [[encode_tree(k, tensors, f"{path}.key"), encode_tree(v, tensors, f"{path}.{k}")]
                              for k, v in tree.items()]}
    if isinstance(tree, enum.Enum):  # before the plain types: ZeroStageEnum is also an int
        name = f"{type(tree).__module__}:{type(tree).__qualname__}"
        if name not in ALLOWED_ENUMS:
            raise CheckpointError(f"cannot store enum {name} at state path {path!r}: only the enums in "
                                  f"moechat.train.checkpoint.ALLOWED_ENUMS go into a checkpoint")
        return {"__enum__": name, "value": encode_tree(tree.value, tensors, path)}
    if isinstance(tree, tuple):
        return {"__tuple__": [encode_tree(v, tensors, f"{path}.{i}") for i, v in enumerate(tree)]}
    if isinstance(tree, list):
        return [encode_tree(v, tensors, f"{path}.{i}") for i, v in enumerate(tree)]
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return tree
    if isinstance(tree, (np.integer, np.floating)):
        return tree.item()
    if isinstance(tree, torch.dtype):  # DeepSpeed's DynamicLossScaler keeps the fp16 dtype
        return {"__dtype__": str(tree).removeprefix("torch.")}
    cls = type(tree)
    name = f"{cls.__module__}:{cls.__qualname__}"
    if name in ALLOWED_OBJECTS:
        attrs = {f.name: getattr(tree, f.name) for f in dataclasses.fields(tree)} \
            if dataclasses.is_dataclass(tree) else vars(tree)
        return {"__object__": name, "state": encode_tree(dict(attrs), tensors, path)}
    raise CheckpointError(f"cannot store {type(tree).__name__} ({name}) at state path {path!r}: only tensors, "
                          f"numbers, strings, lists, tuples, dicts and the DeepSpeed classes in "
                          f"moechat.train.checkpoint.ALLOWED_OBJECTS/ALLOWED_ENUMS go into a checkpoint")


def decode_tree(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of `encode_tree`. Builds only allow-listed classes; anything else raises CheckpointError
    (callers that read a file add its path to the message)."""
    if isinstance(tree, dict):
        if "__tensor__" in tree:
            return tensors[tree["__tensor__"]]
        if "__items__" in tree:
            return {decode_tree(k, tensors): decode_tree(v, tensors) for k, v in tree["__items__"]}
        if "__tuple__" in tree:
            return tuple(decode_tree(v, tensors) for v in tree["__tuple__"])
        if "__dtype__" in tree:
            dtype = getattr(torch, str(tree["__dtype__"]), None)
            if not isinstance(dtype, torch.dtype):
                raise CheckpointError(f"checkpoint names dtype {tree['__dtype__']!r}, which is not a torch dtype")
            return dtype
        if "__enum__" in tree:
            return _allowed_class(tree["__enum__"], ALLOWED_ENUMS)(decode_tree(tree["value"], tensors))
        if "__object__" in tree:
            obj = object.__new__(_allowed_class(tree["__object__"], ALLOWED_OBJECTS))
            for key, value in decode_tree(tree["state"], tensors).items():
                object.__setattr__(obj, key, value)
            return obj
        return {k: decode_tree(v, tensors) for k, v in tree.items()}
    if isinstance(tree, list):
        return [decode_tree(v, tensors) for v in tree]
    return tree


def _allowed_class(name: Any, allowed: frozenset[str]) -> type:
    """The class `module:Name` when it is on `allowed` and really a class (an enum for ALLOWED_ENUMS)."""
    if not isinstance(name, str) or name not in allowed:
        raise CheckpointError(f"checkpoint names {name!r}, which is not one of the classes a checkpoint may "
                              f"hold ({', '.join(sorted(allowed))}); refusing to build it")
    module, qualname = name.split(":")
    try:
        obj = getattr(importlib.import_module(module), qualname, None)
    except ImportError as err:  # a DeepSpeed checkpoint where deepspeed is not installed
        raise CheckpointError(f"checkpoint names {name}, but {module} cannot be imported here ({err}); install "
                              f"what wrote it (pip install -e \".[deepspeed]\") or use a checkpoint of this setup") from None
    if not isinstance(obj, type) or (allowed is ALLOWED_ENUMS and not issubclass(obj, enum.Enum)):
        raise CheckpointError(f"checkpoint names {name}, which this DeepSpeed version does not define as "
                              f"{'an enum' if allowed is ALLOWED_ENUMS else 'a class'}; refusing to build it")
    return obj


def save_tree(tree: Any, path: Path) -> None:
    """`tree` as one safetensors file: its tensors by state path, the rest as JSON in the header metadata.
    One file, so the skeleton and the tensors it names are always written (and damaged) together."""
    tensors: dict[str, torch.Tensor] = {}
    encoded = encode_tree(tree, tensors)
    save_file(tensors, str(path), metadata={TREE_KEY: json.dumps(encoded)})


def read_safetensors(path: Path, key: str) -> tuple[dict[str, torch.Tensor], Any]:
    """(tensors, the JSON stored under header metadata `key`) of one safetensors file; a file without that
    key raises KeyError, like a missing tensor."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    return tensors, json.loads(metadata[key])


def load_tree(path: Path) -> Any:
    """Inverse of `save_tree`: builds only allow-listed classes (else CheckpointError)."""
    tensors, skeleton = read_safetensors(path, TREE_KEY)
    return decode_tree(skeleton, tensors)


# ----------------------------------------------------------------------------------------------------
# RNG


def capture_rng() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensor states, JSON states) of torch CPU/CUDA, Python and NumPy generators of this process."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = state
    np_state = np.random.get_state()
    plain = {
        "python": encode_tree(random.getstate(), {}),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, plain


def restore_rng(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = sorted(k for k in tensors if k.startswith("torch_cuda_"))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    random.setstate(decode_tree(plain["python"], {}))
    name, keys, pos, has_gauss, gauss = plain["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))


# ----------------------------------------------------------------------------------------------------
# Save / find / load


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def is_complete(path: Path) -> bool:
    """A `step_*` folder with its completion marker (state.json, written last) and its weights."""
    return (path.is_dir() and STEP_DIR.match(path.name) is not None and (path / "state.json").is_file()
            and (path / "model.safetensors").is_file())


def complete_checkpoints(root: Path, fp: str) -> list[Path]:
    """Complete checkpoints of fingerprint `fp`, oldest first; temp and trash folders never match."""
    folder = Path(root) / fp
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if is_complete(p)]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(root: Path, fp: str) -> Optional[Path]:
    found = complete_checkpoints(root, fp)
    return found[-1] if found else None


def other_fingerprints(root: Path, fp: str) -> list[str]:
    """Fingerprints under `root` other than `fp` that hold a complete checkpoint (other experiments)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and p.name != fp and complete_checkpoints(root, p.name))


def _remove(path: Path) -> None:
    """Rename to `.trash-<name>` first, then delete: a crash mid-delete leaves only a trash folder."""
    trash = path.with_name(f"{TRASH_PREFIX}{path.name}")
    if trash.exists():
        shutil.rmtree(trash)
    os.replace(path, trash)
    shutil.rmtree(trash)


def _fsync_tree(folder: Path) -> None:
    """Flush every file under `folder` and every folder, so a rename after this cannot publish
    a checkpoint whose data is still only in the page cache (power loss)."""
    for path in folder.iterdir():
        if path.is_dir():
            _fsync_tree(path)
        elif path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(folder)


def save_checkpoint(root: Path, state: TrainState, model: torch.nn.Module, optimizer_state: Any,
                    scheduler_state: dict[str, Any], keep: int, *, rank: int = 0, world_size: int = 1,
                    barrier: Callable[[], None] = lambda: None, per_rank_optimizer: bool = False,
                    scaler_state: Optional[dict[str, Any]] = None,
                    extra_files: Optional[Callable[[Path], None]] = None) -> Path:
    """Write one checkpoint atomically and prune to the newest `keep` of this fingerprint.

    Collective under several processes: every rank calls it (each writes its own RNG file; with
    `per_rank_optimizer`, as for DeepSpeed ZeRO partitions, its own optimizer shard); rank 0 writes
    the weights, state.json and the manifest last, fsyncs and renames the folder into place. `scaler_state`
    is the fp16 GradScaler's state_dict (plain numbers), None without one. `extra_files` (rank 0) writes more
    files into the unpublished folder, so they appear atomically with the checkpoint (train: the curves).
    A full disk removes the unpublished folder and raises one CheckpointError naming the folder and the bytes
    needed; the checkpoints already published are untouched. The caller checks finiteness (train.save)."""
    folder = Path(root) / state.fingerprint
    final = folder / step_dir_name(state.step)
    tmp = folder / f".tmp-{final.name}"
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        for leftover in folder.glob(f"{TRASH_PREFIX}*"):  # from a crash mid-delete
            shutil.rmtree(leftover)
    barrier()
    with _disk_full_as_one_line(tmp, folder, lambda: _needed_bytes(model, optimizer_state, folder)):
        _write_rank_files(tmp, rank, optimizer_state, per_rank_optimizer)
        if rank == 0:
            # cloned: under DeepSpeed the parameters are views into flat buffers, which safetensors refuses
            weights = {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}
            save_file(weights, str(tmp / "model.safetensors"))
            if extra_files is not None:
                extra_files(tmp)
        barrier()
        if rank == 0:
            meta = {**asdict(state), "scheduler": encode_tree(scheduler_state, {}), "world_size": world_size,
                    "per_rank_optimizer": per_rank_optimizer, "scaler": encode_tree(scaler_state, {})}
            (tmp / "state.json").write_text(json.dumps(meta, indent=1))
            integrity.write_manifest(tmp)  # last: hashes of every file, state.json included
            _fsync_tree(tmp)
    if rank == 0:
        _publish(tmp, final)
        for old in complete_checkpoints(root, state.fingerprint)[:-keep]:
            _remove(old)
    barrier()
    return final


def _write_rank_files(tmp: Path, rank: int, optimizer_state: Any, per_rank_optimizer: bool) -> None:
    rng_tensors, rng_plain = capture_rng()
    save_file(rng_tensors, str(tmp / f"rng_rank{rank}.safetensors"), metadata={RNG_KEY: json.dumps(rng_plain)})
    if per_rank_optimizer:
        save_tree(optimizer_state, tmp / f"optimizer_rank{rank}.safetensors")
    elif rank == 0:
        save_tree(optimizer_state, tmp / "optimizer.safetensors")


def _publish(tmp: Path, final: Path) -> None:
    """Rename the finished `tmp` folder to `final`; a same-step folder it replaces goes through the trash."""
    replaced = None
    if final.exists():  # the same step saved again by a rerun that resumed from it
        replaced = final.with_name(f"{TRASH_PREFIX}{final.name}")
        os.replace(final, replaced)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if replaced is not None:
        shutil.rmtree(replaced)


def _needed_bytes(model: torch.nn.Module, optimizer_state: Any, folder: Path) -> int:
    """About what one checkpoint takes: the newest published one's size, or the tensors' bytes before any."""
    newest = latest_checkpoint(folder.parent, folder.name)
    if newest is not None:
        return sum(p.stat().st_size for p in newest.rglob("*") if p.is_file())
    return integrity.tensor_bytes(model.state_dict()) + integrity.tensor_bytes(optimizer_state)


@contextmanager
def _disk_full_as_one_line(tmp: Path, folder: Path, needed: Callable[[], int]) -> Iterator[None]:
    """A full disk (ENOSPC/EDQUOT, from Python or from safetensors' Rust writer) while writing `tmp`: remove
    it and raise one line with the bytes a checkpoint needs and the bytes free."""
    try:
        yield
    except (OSError, SafetensorError) as err:
        disk_full = getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT) \
            or any(text in str(err) for text in ENOSPC_TEXT)
        if not disk_full:
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(folder).free
        last = latest_checkpoint(folder.parent, folder.name)
        raise CheckpointError(
            f"no space left on the device of {folder} while writing checkpoint {tmp.name.removeprefix('.tmp-')}: "
            f"it needs about {needed():,} bytes and {free:,} are free; removed the unfinished "
            f"{tmp.name} (last checkpoint {last or 'none'} is intact). Free space there, or lower "
            f"train.keep_checkpoints (a new checkpoint is written before old ones are pruned), and rerun "
            f"`dvc repro` to resume") from None


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class LoadedCheckpoint:
    state: TrainState
    optimizer_state: Any
    scheduler_state: dict[str, Any]
    scaler_state: Optional[dict[str, Any]] = None  # the fp16 GradScaler's state_dict, when one was saved


def load_checkpoint(path: Path, model: torch.nn.Module, rank: int = 0,
                    optimizer_state: Any = None) -> LoadedCheckpoint:
    """Load weights into `model` (in place) and return the optimizer/scheduler state and counters.

    Every file is read and checked first (`read_checkpoint`, `check_matches` against the model and, when
    given, the fresh `optimizer_state` of the run), so a bad checkpoint raises CheckpointError naming the
    file and leaves `model` untouched. The caller restores RNG with `restore_rank_rng` as the last thing
    before the loop continues."""
    weights, loaded = read_checkpoint(path, rank)
    check_matches(path, weights, loaded, model, optimizer_state)
    model.load_state_dict(weights, strict=True)
    return loaded


# What reading a damaged file raises: truncated/garbled safetensors, JSON (nested too deep included),
# undecodable bytes, missing files, values of the wrong type.
_READ_ERRORS = (SafetensorError, json.JSONDecodeError, UnicodeDecodeError, OSError, KeyError, TypeError,
                ValueError, IndexError, RecursionError)


def _reads(rank: int) -> Callable[[str], bool]:
    """The manifest entries `rank` reads: everything but the other ranks' RNG files and optimizer shards."""
    own = (f"rng_rank{rank}.safetensors", f"optimizer_rank{rank}.safetensors")
    return lambda name: name in own or not name.startswith(("rng_rank", "optimizer_rank"))


def read_checkpoint(path: Path, rank: int = 0) -> tuple[dict[str, torch.Tensor], LoadedCheckpoint]:
    """Read and decode every file a resume of `rank` needs (state.json, weights, optimizer, RNG) without
    touching any model: (weights, the rest). First the manifest's sha256s (checkpoints written before
    manifests have none to check); then the step must match the folder name and every weight and optimizer
    tensor must be finite. Any damage is a CheckpointError naming the file."""
    path = Path(path)
    if (path / integrity.MANIFEST).exists():
        problem = integrity.manifest_problem(path, _reads(rank))
        if problem is not None:
            raise CheckpointError(problem)
    current = path / "state.json"
    try:
        meta = json.loads(current.read_text(encoding="utf-8"))
        stem = f"optimizer_rank{rank}" if meta.pop("per_rank_optimizer") else "optimizer"
        scheduler_state = decode_tree(meta.pop("scheduler"), {})
        scaler_state = decode_tree(meta.pop("scaler", None), {})
        meta.pop("world_size")
        state = TrainState.from_dict(meta)
        if state.step != int(STEP_DIR.match(path.name).group(1)):
            raise ValueError(f"step {state.step} is not the folder's step")
        current = path / "model.safetensors"
        weights = load_file(str(current))
        current = path / f"{stem}.safetensors"
        optimizer_state = load_tree(current)  # a skeleton naming a tensor the file lacks: KeyError
        current = path / f"rng_rank{rank}.safetensors"
        read_safetensors(current, RNG_KEY)[1]["numpy"]
    except CheckpointError as err:
        raise CheckpointError(f"{current}: {err}") from None
    except _READ_ERRORS as err:
        raise CheckpointError(f"{current} cannot be read ({type(err).__name__}: {err})") from None
    for name, tree in (("model.safetensors", weights), (f"{stem}.safetensors", optimizer_state)):
        bad = integrity.first_nonfinite(tree)
        if bad is not None:
            raise CheckpointError(f"{path / name} holds non-finite values (first: {bad})")
    return weights, LoadedCheckpoint(state, optimizer_state, scheduler_state, scaler_state)


def check_matches(path: Path, weights: dict[str, torch.Tensor], loaded: LoadedCheckpoint, model: torch.nn.Module,
                  optimizer_state: Any = None) -> None:
    """The saved weights have exactly the model's names and shapes; the saved optimizer state has the
    parameter groups of the run's fresh `optimizer_state` (a torch/bnb state dict; others are not compared)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in weights.items()}
    if got != expected:
        missing, unexpected = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        reshaped = sorted(k for k in set(got) & set(expected) if got[k] != expected[k])
        raise CheckpointError(f"{Path(path) / 'model.safetensors'} does not match the model (missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}, other shape {reshaped[:3]})")
    saved = loaded.optimizer_state
    if not (isinstance(saved, dict) and isinstance(optimizer_state, dict)
            and "param_groups" in saved and "param_groups" in optimizer_state):
        return
    shape = [len(g.get("params", [])) for g in saved["param_groups"]]
    if shape != [len(g["params"]) for g in optimizer_state["param_groups"]]:
        raise CheckpointError(f"{Path(path) / 'optimizer.safetensors'}: parameter groups of sizes {shape} do not match "
                              f"the optimizer's {[len(g['params']) for g in optimizer_state['param_groups']]}")
    ids = {i for g in optimizer_state["param_groups"] for i in g["params"]}
    if not set(saved.get("state", {})) <= ids:
        raise CheckpointError(f"{Path(path) / 'optimizer.safetensors'}: state for parameters the optimizer does "
                              f"not have")


def resume_point(root: Path, fp: str, model: torch.nn.Module, rank: int = 0, optimizer_state: Any = None,
                 log: Callable[[str], None] = print) -> Optional[tuple[Path, LoadedCheckpoint]]:
    """Load the newest intact checkpoint of `fp` into `model`: (its folder, its state), or None when there is
    no checkpoint. A damaged newer one is skipped, saying which and why; when every one is damaged this
    refuses with the folder to delete rather than silently starting over (the user decides to lose them)."""
    found = complete_checkpoints(root, fp)
    skipped: list[str] = []
    for path in reversed(found):
        try:
            loaded = load_checkpoint(path, model, rank, optimizer_state)
        except CheckpointError as err:
            skipped.append(str(err))
            log(f"checkpoint {path.name} is damaged, skipping it: {err}")
            continue
        if skipped:
            log(f"resuming from {path}, the newest intact checkpoint")
        return path, loaded
    if skipped:
        raise CheckpointError(f"no intact checkpoint in {Path(root) / fp} ({len(found)} damaged; newest: "
                              f"{skipped[0]}); delete {Path(root) / fp} to train this experiment from step 0")
    return None


def last_good_checkpoint(root: Path, fp: str) -> Optional[Path]:
    """The newest checkpoint of `fp` that a resume would load (hashes, step and finiteness checked): the one
    error messages name as "last good". Reads each candidate, newest first; called only when a run stops."""
    for path in reversed(complete_checkpoints(root, fp)):
        try:
            read_checkpoint(path)
        except CheckpointError:
            continue
        return path
    return None


def restore_rank_rng(path: Path, rank: int) -> None:
    restore_rng(*read_safetensors(Path(path) / f"rng_rank{rank}.safetensors", RNG_KEY))
