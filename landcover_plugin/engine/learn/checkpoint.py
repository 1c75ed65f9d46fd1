"""Training checkpoints: the last finished epoch, kept whole through any interruption.

A checkpoint is a folder beside the model folder (`.NAME.checkpoint`) holding
the current weights, the best weights so far, the optimizer's state and a
state.json (epoch, history, early-stopping counters, the run's parameters).
It is written with atomic_output after every epoch, so a kill, a cancel or a
full disk during the write leaves the previous checkpoint as it was.
"""
from __future__ import annotations

import errno
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..atomic import atomic_output
from ..errors import EngineError

STATE, WEIGHTS, BEST, OPTIMIZER = "state.json", "last.weights.h5", "best.weights.h5", "optimizer.npz"


@dataclass
class RunState:
    epoch: int = 0  # epochs finished
    history: dict[str, list[float]] = field(default_factory=dict)
    best_val_loss: float = float("inf")
    best_epoch: int = 0
    wait: int = 0  # epochs since the best
    stopped_early: bool = False
    fingerprint: dict = field(default_factory=dict)  # what must match to resume


def checkpoint_dir(out: Path) -> Path:
    out = Path(out)
    return out.with_name(f".{out.name}.checkpoint")


def save_checkpoint(folder: Path, model, optimizer, state: RunState, best_changed: bool) -> None:
    """Write the checkpoint whole (or keep the previous one and raise DISK_FULL)."""
    import warnings

    previous_best = folder / BEST
    had_one = (folder / STATE).is_file()  # else a full disk leaves nothing to resume from
    try:
        with atomic_output(folder, directory=True) as tmp, warnings.catch_warnings():
            warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
            model.save_weights(tmp / WEIGHTS)
            if best_changed or not previous_best.is_file():
                model.save_weights(tmp / BEST)
            else:  # unchanged: carry the previous best over without recomputing it
                (tmp / BEST).write_bytes(previous_best.read_bytes())
            np.savez(tmp / OPTIMIZER, *[v.numpy() for v in optimizer.variables])
            (tmp / STATE).write_text(json.dumps(state.__dict__, indent=1))
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT) and had_one:
            raise EngineError("DISK_FULL", f"The disk filled while saving the checkpoint of epoch {state.epoch} "
                              f"({exc}); the checkpoint of epoch {state.epoch - 1} is kept.",
                              "Free some disk space, then run the same command with --resume.") from None
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise EngineError("DISK_FULL", f"The disk filled while saving the first checkpoint (epoch {state.epoch}) "
                              f"({exc}); there is no checkpoint to resume from.",
                              "Free some disk space, then run the same command again (training starts "
                              "over).") from None
        raise


def load_checkpoint(folder: Path, model, optimizer, fingerprint: dict) -> RunState:
    """Restore weights and optimizer state; the run must be the same one."""
    try:
        state = RunState(**json.loads((folder / STATE).read_text()))
    except (OSError, ValueError, TypeError):
        raise EngineError("NO_CHECKPOINT", f"No usable checkpoint at {folder} to resume from.",
                          "Run without --resume to start over.") from None
    if state.fingerprint != fingerprint:
        changed = sorted(k for k in fingerprint if fingerprint.get(k) != state.fingerprint.get(k))
        raise EngineError("CHECKPOINT_MISMATCH", f"The checkpoint at {folder} is of another run "
                          f"(differs in: {', '.join(changed)}).",
                          "Resume with the same dataset and options, or run without --resume to start over.")
    model.load_weights(folder / WEIGHTS)
    optimizer.build(model.trainable_variables)
    with np.load(folder / OPTIMIZER) as saved:
        values = [saved[f"arr_{i}"] for i in range(len(saved.files))]
    if len(values) == len(optimizer.variables):
        for var, value in zip(optimizer.variables, values):
            var.assign(value)
    return state
