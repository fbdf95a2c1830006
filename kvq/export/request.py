"""What an exporter gets and gives: the request, the plan of files to write, and the result.

An exporter is a pure function from an :class:`ExportRequest` (the scales, the model's shape and,
where the format needs them, the model's files) to a plan: an :class:`ExportPlan` (a folder: bytes
to write and model files to link) or a :class:`FilePlan` (one file). :func:`kvq.export.export_artifact`
puts the plan on disk with kvq's one atomic writer (:mod:`kvq.io.atomic`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvq.artifacts.scales import KVScales
from kvq.errors import UsageError
from kvq.export.model_check import ModelFiles, ModelShape


@dataclass(frozen=True)
class ExportRequest:
    scales: KVScales
    shape: ModelShape
    files: ModelFiles | None
    tp: int
    reduce: str | None
    trtllm_checkpoint: Path | None = None
    legacy: bool = False  # write a format that only older engine releases apply (the refusal names them)
    skip_layers: tuple[int, ...] = ()  # layers the artifact's plan.json keeps unquantized (kvq plan), if any
    # The weights the scales' transforms rewrote (state-dict name -> tensor; None without transforms): called
    # by the checkpoint formats once their cheap checks pass, since it loads and transforms the model.
    transformed_weights: Callable[[], dict[str, torch.Tensor] | None] = lambda: None

    def model_files(self, export_format: str) -> ModelFiles:
        """The model's local checkpoint folder, which formats writing a checkpoint need."""
        if self.files is None:
            raise UsageError(f"--format {export_format} writes a checkpoint around the model's files: "
                             "it needs --model with a local checkpoint folder")
        return self.files


@dataclass
class ExportPlan:
    """A folder to write: ``files`` (relative path -> bytes) and ``links`` (relative path -> a model file)."""

    files: dict[str, bytes] = field(default_factory=dict)
    links: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # engine releases / backends that do not apply the scales
    serve: list[str] = field(default_factory=list)  # commands that serve the output with the scales applied


@dataclass
class FilePlan:
    """One file to write."""

    content: bytes
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    serve: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Exporter:
    """One engine format: its name (the --format value), its builder and what it needs."""

    name: str
    build: Callable[[ExportRequest], ExportPlan | FilePlan]
    needs_model_files: bool  # writes a checkpoint folder around the model's own files


@dataclass
class ExportResult:
    out: Path
    export_format: str
    written: list[str]
    linked: int
    copied: int
    notes: list[str]
    warnings: list[str] = field(default_factory=list)
    serve: list[str] = field(default_factory=list)


def require_legacy(req: ExportRequest, export_format: str, why: str, applied_by: str, hint: str) -> None:
    """Refuse a format no current engine release applies, unless ``--legacy`` asks for it knowingly.

    ``why`` says what current releases do with it (with versions), ``applied_by`` the releases that
    apply it, ``hint`` the path that works today.
    """
    if not req.legacy:
        raise UsageError(f"--format {export_format}: {why}; only {applied_by} apply it",
                         hint=f"{hint}; or pass --legacy to write it for {applied_by}")
