"""A search's progress in one file beside its output, saved after every finished piece of work
(a DiffRate epoch, a Zero-TPrune trial) and tagged with the fingerprint of the search's
inputs: the same command resumes from it, a command with other inputs is refused. The command
deletes it once its output is written, not the search when it finishes: a failed write then
loses nothing, and the rerun finishes at once from the complete state."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tokcomp.errors import StateError
from tokcomp.files import torch_save_whole
from tokcomp.harness.distributed import SINGLE, World
from tokcomp.harness.fingerprint import Fingerprint

#: How a refusal of a saved state says to go on.
FRESH_FIX = "rerun with --fresh to discard it and start again, or give another -o"


class SearchState:
    """The saved progress of one search (rank 0 reads and writes; every rank gets it)."""

    def __init__(self, path: Path | None, fingerprint: Fingerprint, world: World = SINGLE) -> None:
        """The state in `path` (None: nothing is saved) of a search on `fingerprint`'s inputs."""
        self.path, self.fingerprint, self.world = path, fingerprint, world

    @classmethod
    def beside(cls, output: Path, fingerprint: Fingerprint, world: World = SINGLE) -> SearchState:
        """The state of the search that writes `output` (<output>.search-state.pt)."""
        return cls(output.with_name(output.name + ".search-state.pt"), fingerprint, world)

    def with_parts(self, **parts: Any) -> SearchState:
        """The same file for a search whose fingerprint has these parts too."""
        return SearchState(self.path, self.fingerprint.extended(**parts), self.world)

    def load(self) -> dict[str, Any] | None:
        """The saved progress, or None when there is none; refused when it was saved from
        other inputs or cannot be read."""
        return self.world.from_main(self._read)

    def save(self, progress: dict[str, Any]) -> None:
        """Replace the saved progress (atomically; rank 0 only)."""
        if self.path is None or not self.world.is_main:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        torch_save_whole({"fingerprint": self.fingerprint.as_json(), **progress}, self.path)

    def discard(self) -> bool:
        """Delete the saved progress (rank 0 only); whether there was any."""
        if self.path is None or not self.world.is_main or not self.path.is_file():
            return False
        self.path.unlink()
        return True

    def _read(self) -> dict[str, Any] | None:
        if self.path is None or not self.path.is_file():
            return None
        try:
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch.load fails in many ways on a damaged file
            raise StateError(
                f"{self.path} is not a readable search state ({type(err).__name__}); {FRESH_FIX}"
            ) from None
        if not isinstance(saved, dict):
            raise StateError(f"{self.path} is not a search state; {FRESH_FIX}")
        what = f"the search state {self.path} was saved"
        self.fingerprint.check(saved.get("fingerprint"), what, FRESH_FIX)
        return saved
