"""The files a fine-tuning run must be able to go on from: written whole or not at all, and read back
only when they were made with the options of the run that reads them."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import torch

from classify.finetune.config import FinetuneError

__all__ = ["Checkpoint", "atomic_save"]


def atomic_save(obj: object, path: Path) -> None:
    """torch.save to a temporary file, then rename: a kill leaves the previous file whole."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno == errno.ENOSPC:
            raise FinetuneError(
                f"the disk is full: could not write {path}. Free some space, then rerun with --resume "
                f"(the last complete checkpoint is kept)."
            ) from None
        raise


class Checkpoint:
    """One file of saved training state: where it lies, its atomic save, and the checks before a run
    goes on from it. With `options` (the run's options that change results), every save records them
    and `resume` refuses a file made with others; without, the file holds exactly what was saved (best.pt:
    a plain state dict, which a model loads as is)."""

    def __init__(self, path: Path, options: dict | None = None):
        self.path = Path(path)
        self.options = options

    def exists(self) -> bool:
        return self.path.exists()

    def check_start(self, resume: bool) -> None:
        """A new run never overwrites a checkpoint silently, and `--resume` needs one to go on from."""
        if self.path.exists() and not resume:
            raise FinetuneError(
                f"{self.path.parent} holds a fine-tuning checkpoint: pass --resume to continue it, or choose "
                "another --out"
            )
        if resume and not self.path.exists():
            raise FinetuneError(f"--resume: {self.path} does not exist")

    def save(self, state: dict) -> None:
        """Write `state` (and the options, when this checkpoint has them) whole or not at all."""
        atomic_save(state if self.options is None else {**state, "options": self.options}, self.path)

    def load(self, device: torch.device | str = "cpu") -> dict:
        """The saved state as it is, tensors on `device` (no check)."""
        return torch.load(self.path, map_location=device, weights_only=True)

    def resume(self, device: torch.device | str = "cpu", *, other_options: str = "refuse") -> dict | None:
        """The state to go on from, or None when there is none. A state made with other options is
        refused with the options that differ (`other_options="refuse"`), or passed over so that the
        stage starts afresh (`"restart"`); one written by the older version that chose epochs by
        balanced accuracy is refused (its `best` cannot be compared with an AUC)."""
        if not self.path.exists():
            return None
        state = self.load(device)
        if self.options is not None and state.get("options") != self.options:
            if other_options == "restart":
                return None
            recorded = state.get("options") or {}
            changed = sorted(k for k in self.options if recorded.get(k) != self.options[k])
            raise FinetuneError(f"--resume: the checkpoint was made with other options ({', '.join(changed)})")
        if "best" in state and "auc" not in state["best"]:
            raise FinetuneError(
                f"--resume: {self.path} was written by an older version that chose epochs "
                "by balanced accuracy; start again with another --out"
            )
        return state
