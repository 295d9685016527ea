"""What `ftaudit fix` did: settings, each matrix changed, the audits before and after (schema: docs/fix.md)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ftaudit.files import write_text
from ftaudit.report import Report

SCHEMA_VERSION = "1"


@dataclass(frozen=True)
class FixSettings:
    lam: float
    epsilon: float
    k: int
    only_top: int | None

    def to_dict(self) -> dict[str, object]:
        return {"lambda": self.lam, "epsilon": self.epsilon, "k": self.k, "only_top": self.only_top}


@dataclass
class MatrixChange:
    """One matrix whose intruders were scaled."""

    name: str
    """The matrix as the audit names it."""
    tensors: list[str]
    """The tensors rewritten for it (a LoRA module: its two factors)."""
    directions: list[int]
    """Positions of the scaled singular vectors among the matrix's top k."""
    sigma_before: list[float]
    sigma_after: list[float]
    max_cos: list[float]
    truncation_error: float | None = None
    """Adapters: ‖ΔW' − its rank-r cut‖_F / ‖ΔW'‖_F; None when the patch is written exactly."""


@dataclass
class FixResult:
    tool: dict[str, str]
    created_at: str
    output: str
    format: str
    """What was written: `model` (from a full model), `adapter` (a LoRA adapter of the same rank) or `merged`."""
    settings: FixSettings
    before: Report
    after: Report
    changes: list[MatrixChange] = field(default_factory=list)
    files_left_out: list[str] = field(default_factory=list)
    """Weights in other formats (pickle, ONNX, ...) or other copies (`model.safetensors` beside shards) that would
    still hold the unpatched values, and training checkpoint folders (`checkpoint-500/`)."""
    files_copied_unpatched: list[str] = field(default_factory=list)
    """Safetensors files in subfolders (a module of its own, another adapter), copied as they are: not audited."""

    @property
    def directions_scaled(self) -> int:
        return sum(len(c.directions) for c in self.changes)

    @property
    def truncation_error_max(self) -> float | None:
        errors = [c.truncation_error for c in self.changes if c.truncation_error is not None]
        return max(errors) if errors else None

    def to_dict(self) -> dict[str, object]:
        return {
            "schema_version": SCHEMA_VERSION,
            "kind": "fix",
            "tool": self.tool,
            "created_at": self.created_at,
            "model": asdict(self.before.model),
            "base": asdict(self.before.base),
            "output": {"path": self.output, "format": self.format, "files_left_out": self.files_left_out,
                       "files_copied_unpatched": self.files_copied_unpatched},
            "settings": self.settings.to_dict(),
            "summary": {
                "matrices_changed": len(self.changes),
                "directions_scaled": self.directions_scaled,
                "truncation_error_max": self.truncation_error_max,
            },
            "changes": [asdict(c) for c in self.changes],
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"

    def write(self, path: Path) -> None:
        """Write the JSON atomically."""
        write_text(path, self.to_json())
