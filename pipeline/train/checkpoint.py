"""Checkpoints: one directory holding `checkpoint.pt` (task, optimizers, schedulers, scaler, step,
config) and `meta.json` (step and names, readable without loading tensors).

Loading always uses `torch.load(weights_only=True)`: a checkpoint can hold tensors and plain
containers only, so opening one never runs code.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch

from pipeline.data.storage import is_url

log = logging.getLogger("sslpipe.checkpoint")

CHECKPOINT_FILE = "checkpoint.pt"
META_FILE = "meta.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing or unreadable; the message names the file."""


def write_checkpoint(state: dict, directory: Path) -> Path:
    """Writes into `directory` (created). Files are written under temporary names, then renamed."""
    tmp = directory / (CHECKPOINT_FILE + ".partial")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        torch.save(state, tmp)
        os.replace(tmp, directory / CHECKPOINT_FILE)
        meta = {"step": state["step"], "task": state["config"]["task"]["name"], "backbone": state["config"]["model"]["backbone"]}
        (directory / (META_FILE + ".partial")).write_text(json.dumps(meta))
        os.replace(directory / (META_FILE + ".partial"), directory / META_FILE)
    except OSError as err:  # a full disk, a lost mount: stop naming the place; what was written before stays
        tmp.unlink(missing_ok=True)
        raise CheckpointError(f"cannot write the checkpoint of step {state['step']} to {directory}: "
                              f"{err.strerror or err}; the previous checkpoints are untouched") from err
    return directory


def write_local_checkpoint(state: dict, checkpoints_dir: Path, keep: int) -> Path:
    """Single-process runs: `checkpoints_dir/step_000100`, written whole before it appears, last `keep` kept."""
    final = checkpoints_dir / f"step_{state['step']:08d}"
    tmp = checkpoints_dir / f".tmp_step_{state['step']:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_checkpoint(state, tmp)
    except CheckpointError:
        shutil.rmtree(tmp, ignore_errors=True)  # no half-written directory left behind
        raise
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in sorted(checkpoints_dir.glob("step_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoint_step(directory: Path) -> int:
    try:
        return int(json.loads((directory / META_FILE).read_text())["step"])
    except (OSError, ValueError, KeyError):
        return -1


def checkpoint_files(path: str | Path) -> list[Path]:
    """Checkpoint files for a checkpoint file, a checkpoint directory or a run directory (local,
    or a URL: pipeline/train/run_storage.py), newest (highest step, then latest written) first."""
    if is_url(path):  # a run or checkpoint on object storage: downloaded into its local mirror
        from pipeline.train.run_storage import download_checkpoints

        files = [d / CHECKPOINT_FILE for d in download_checkpoints(str(path))]
        return [f for f in files if f.is_file()] or files[:1]
    path = Path(path)
    if path.is_file():
        return [path]
    if (path / CHECKPOINT_FILE).is_file():
        return [path / CHECKPOINT_FILE]
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    candidates = [p.parent for p in path.rglob(CHECKPOINT_FILE)]
    if not candidates:
        raise CheckpointError(f"no {CHECKPOINT_FILE} under {path}: did pretraining reach its first checkpoint?")
    candidates.sort(key=lambda d: (checkpoint_step(d), d.stat().st_mtime), reverse=True)
    return [d / CHECKPOINT_FILE for d in candidates]


def find_checkpoint(path: str | Path) -> Path:
    """The newest checkpoint file for a checkpoint file, a checkpoint directory or a run directory."""
    return checkpoint_files(path)[0]


def read_checkpoint(file: Path, map_location: str | torch.device = "cpu") -> dict:
    """One checkpoint file, tensors and plain containers only; CheckpointError names the file."""
    try:
        state = torch.load(file, map_location=map_location, weights_only=True)
    except Exception as err:
        raise CheckpointError(f"cannot read checkpoint {file}: {load_error_summary(err)}") from err
    missing = [key for key in ("task", "step", "config", "manifest") if key not in state] if isinstance(state, dict) else ["everything"]
    if missing:
        raise CheckpointError(f"checkpoint {file} lacks {missing}: not an sslpipe checkpoint")
    return state


def load_error_summary(err: Exception) -> str:
    """One line for torch.load's failure. Its weights_only message runs to a paragraph that also
    suggests weights_only=False, the one thing never to do with a file of unknown origin."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if lines and lines[0].startswith("Weights only load failed"):
        after = next((lines[i + 1] for i, line in enumerate(lines[:-1]) if "Unpickler error" in line), "")
        return f"not a file of tensors and plain containers (refused by weights_only loading: {after or 'unsupported content'})"
    return lines[0] if lines else type(err).__name__


def load_valid_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[Path, dict]:
    """The newest readable checkpoint under `path` and its file. A newer one that cannot be read
    (truncated, corrupted) is reported by name and the previous one is used; a checkpoint file
    named directly is never replaced by another."""
    errors = []
    for file in checkpoint_files(path):
        try:
            state = read_checkpoint(file, map_location)
        except CheckpointError as err:
            errors.append(str(err))
            log.warning("%s; falling back to the previous checkpoint", err)
            continue
        return file, state
    raise CheckpointError("no readable checkpoint: " + "; ".join(errors))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    return load_valid_checkpoint(path, map_location)[1]


def encoder_state(state: dict) -> dict[str, torch.Tensor]:
    """The backbone's weights with timm's own key names (tasks keep their backbone as `encoder`,
    and name another copy to evaluate, such as DINO's teacher, in the checkpoint's "eval_encoder")."""
    prefix = state.get("eval_encoder", "encoder") + "."
    weights = {k[len(prefix) :]: v for k, v in state["task"].items() if k.startswith(prefix)}
    if not weights:
        raise CheckpointError(f"checkpoint (step {state.get('step')}, task {state['config']['task']['name']!r}) holds no {prefix}* weights")
    return weights
