"""Files people keep: safetensors weights + JSON, written atomically; never pickle.

* A **model folder** holds ``config.json`` (everything needed to rebuild the model, with
  ``format_version``) and ``model.safetensors``.
* A **training checkpoint** is a folder ``checkpoints/step-XXXXXXXX`` holding the model,
  EMA and optimizer tensors as safetensors and ``state.json`` (step, counters, RNG states,
  the optimizer's non-tensor state). It is written into a temporary folder, every file
  fsynced, then renamed into place and the parent fsynced; an older checkpoint is deleted
  only after the newer one is durable. A half-written folder is never mistaken for a
  checkpoint: only names without the temporary suffix count.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1
TMP_SUFFIX = ".incomplete"


class CheckpointError(ValueError):
    """A checkpoint or model folder that is missing, corrupt or of an unknown format."""


# ---------------------------------------------------------------- atomic file writes

def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    """The process umask (reading it means setting it: it is put back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_json(path: Path, data: Any) -> None:
    """Write JSON to ``path`` (not atomic by itself; use inside an atomic folder or via atomic_write_json)."""
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: Optional[dict[str, str]] = None) -> None:
    """Write a safetensors file and fsync it; its permissions are those of any new file (the umask's), like the
    JSON beside it (safetensors itself creates the file owner-only, 0600, which other users could not read)."""
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path), metadata=metadata)
    os.chmod(path, 0o666 & ~_umask())
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def atomic_write_json(path: Path, data: Any) -> None:
    """Replace ``path`` with JSON atomically: temp file, fsync, rename, fsync the folder."""
    path = Path(path)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    write_json(tmp, data)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file with a clear error naming the file when it is missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}); it may be truncated or corrupt") from None


def read_json(path: Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); it may be truncated or corrupt") from None


# ---------------------------------------------------------------- model folders

def save_model_dir(out: Path, config: dict[str, Any], weights: dict[str, torch.Tensor], *, overwrite: bool = False,
                   dtype: Optional[torch.dtype] = None) -> Path:
    """Write a model folder atomically: ``config.json`` + ``model.safetensors``.

    An existing folder is an error unless ``overwrite``; then it is replaced only after the
    new one is complete.
    """
    out = Path(out)
    tmp = staging_dir(out, overwrite)
    try:
        write_model_files(tmp, config, weights, dtype)
        return replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_model_files(folder: Path, config: dict[str, Any], weights: dict[str, torch.Tensor],
                      dtype: Optional[torch.dtype] = None) -> None:
    """``model.safetensors`` (floating-point tensors in ``dtype`` when given) and ``config.json`` (with
    ``format_version``) in the existing ``folder``."""
    if dtype is not None:
        weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}
    write_tensors(folder / "model.safetensors", weights, metadata={"format": "pt"})
    write_json(folder / "config.json", {"format_version": FORMAT_VERSION, **config})


def staging_dir(out: Path, overwrite: bool, tag: str = "") -> Path:
    """A new empty folder beside ``out`` (named ``out`` + ``tag`` + the temporary suffix) to write into before
    :func:`replace_dir` moves it to ``out``. ``out`` must not exist, unless ``overwrite`` and it is a folder
    (a file is never replaced by a folder)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} already exists; choose another --out or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} is a file, and --overwrite replaces only folders; choose another --out")
    tmp = out.with_name(out.name + tag + TMP_SUFFIX)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
    except OSError as e:
        raise CheckpointError(f"cannot create {out}: {e.strerror}; choose another --out") from None
    return tmp


def replace_dir(tmp: Path, out: Path) -> Path:
    """Move the complete folder ``tmp`` to ``out``; an existing ``out`` is removed only after the move."""
    fsync_dir(tmp)
    if out.exists():
        old = out.with_name(out.name + ".old" + TMP_SUFFIX)
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)
    fsync_dir(out.parent)
    return out


def load_model_config(path: Path) -> dict[str, Any]:
    """A model folder's config.json, its format version checked."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"model folder {path} does not exist")
    config = read_json(path / "config.json")
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}/config.json has format_version {version!r}; this diffuse reads version {FORMAT_VERSION}")
    return config


def weights_file(path: Path) -> Path:
    """A model folder's ``model.safetensors``, with a clear error when it is missing."""
    file = Path(path) / "model.safetensors"
    if not file.is_file():
        raise CheckpointError(f"{file} does not exist")
    return file


def check_shapes(path: Path, model: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]) -> None:
    """Every stored tensor (name -> shape in ``shapes``) that the module (``model``, its state dict) has must have
    its shape there: a one-line error naming the first that does not (load_state_dict would raise a long one)."""
    wrong = [(k, shape) for k, shape in shapes.items() if k in model and tuple(model[k].shape) != tuple(shape)]
    if wrong:
        (key, shape), *_ = wrong
        raise CheckpointError(f"{path}/model.safetensors does not match its config: {key} has shape {tuple(shape)}, "
                              f"the config gives {tuple(model[key].shape)} ({len(wrong)} such tensors)")


def load_model_dir(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read a model folder's config and weights (float tensors come back as stored)."""
    config = load_model_config(path)
    return config, read_tensors(weights_file(path))


# ---------------------------------------------------------------- training checkpoints

def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith("step-") and not p.name.endswith(TMP_SUFFIX))


def flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state_dict into tensors (for safetensors) and JSON-able rest."""
    tensors: dict[str, torch.Tensor] = {}
    rest: dict[str, Any] = {"param_groups": state["param_groups"], "state": {}}
    for idx, entry in state["state"].items():
        rest["state"][str(idx)] = {}
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{name}"] = value
            else:
                rest["state"][str(idx)][name] = value
    return tensors, rest


def unflatten_optimizer(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`flatten_optimizer`."""
    state: dict[int, dict[str, Any]] = {int(k): dict(v) for k, v in rest["state"].items()}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": rest["param_groups"]}


def save_checkpoint(run_dir: Path, step: int, tensors: dict[str, dict[str, torch.Tensor]], state: dict[str, Any],
                    keep: int = 2) -> Path:
    """Write ``checkpoints/step-XXXXXXXX`` atomically, then prune to the newest ``keep``.

    ``tensors`` maps a file stem (``model``, ``ema``, ``optimizer``, ``rng``) to its tensors;
    ``state`` is written as ``state.json``.
    """
    folder = Path(run_dir) / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / checkpoint_name(step)
    tmp = folder / (final.name + TMP_SUFFIX)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for stem, group in tensors.items():
        write_tensors(tmp / f"{stem}.safetensors", group)
    write_json(tmp / "state.json", {"format_version": FORMAT_VERSION, **state})
    fsync_dir(tmp)
    if final.exists():  # same step written again (e.g. final save right after a periodic one)
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(folder)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old)
    for stale in folder.glob("*" + TMP_SUFFIX):
        shutil.rmtree(stale, ignore_errors=True)
    return final


def load_checkpoint(path: Path, stems: tuple[str, ...]) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """Read a checkpoint folder written by :func:`save_checkpoint` (clear errors when damaged)."""
    path = Path(path)
    state = read_json(path / "state.json")
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}/state.json has format_version {state.get('format_version')!r}; expected {FORMAT_VERSION}")
    return {stem: read_tensors(path / f"{stem}.safetensors") for stem in stems}, state
