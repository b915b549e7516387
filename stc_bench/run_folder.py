"""A run folder on disk: results.json (finished frame counts) and partial.json (the raw samples
of the frame count in progress, saved after every measured round), so an interrupted run can
be resumed where it stopped."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from stc_bench.results import RunResult, load_results, write_json_atomically

PARTIAL = "partial.json"


class RunFolder:
    """Persistence of one run: finished results and in-progress samples."""

    def __init__(self, path: Path):
        self.path = Path(path)

    @property
    def results_path(self) -> Path:
        """The folder's results.json."""
        return self.path / "results.json"

    def save_result(self, result: RunResult) -> None:
        """Write results.json (every finished frame count)."""
        write_json_atomically(self.results_path, result.to_dict())

    def load_result(self) -> RunResult:
        """Read results.json."""
        return load_results(self.results_path)

    def save_progress(self, frames: int, rounds: int, samples: dict[str, Any]) -> None:
        """Record the raw samples of ``rounds`` measured rounds of frame count ``frames``."""
        write_json_atomically(self.path / PARTIAL, {"frames": frames, "rounds": rounds, "samples": samples})

    def load_progress(self, frames: int) -> tuple[int, dict[str, Any]] | None:
        """(rounds, samples) saved for ``frames``, or None when there is nothing to resume."""
        path = self.path / PARTIAL
        if not path.is_file():
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("frames") != frames:
            return None
        return data["rounds"], data["samples"]

    def clear_progress(self) -> None:
        """Drop partial.json once its frame count is in results.json."""
        (self.path / PARTIAL).unlink(missing_ok=True)
