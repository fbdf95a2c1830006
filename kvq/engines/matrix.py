"""Which serving engines apply, ignore, refuse or break on which KV-cache scales: the engine matrix as data.

One :class:`EngineRow` per (engine, versions, backend, checkpoint kind, granularity, number format),
with a verdict and the source it was read from (``path@version``); the rows themselves are data, in
``kvq/engines/engine_matrix.yaml`` beside this module (edit them there, in one place). They come from reading each
engine's released source (vLLM wheels up to 0.33.0, SGLang up to 0.5.23, TensorRT-LLM's indexed
sources up to main in 2026, LMDeploy git tags up to 0.16.0 and the 0.18.0 wheel); nothing was run on
a GPU, and a note says UNVERIFIED where even the reading left a doubt. `kvq inspect` looks rows up
with :func:`engine_verdicts`; docs/engines.md holds :func:`matrix_markdown`'s table verbatim
(tests/test_engines.py keeps the two equal).

Checkpoint kinds are those of :mod:`kvq.inspection.found`: ``compressed-tensors`` (kvq ``--format
vllm``), ``modelopt``, ``sglang-json``, ``trtllm``, ``lmdeploy`` (``kvq-artifact`` and
``hf-checkpoint`` have no rows: no engine reads them as KV scales). ``weights`` tells ModelOpt's two
kinds apart: KV scales alone on an unquantized model (``quant_algo`` null, what kvq writes for a BF16
model) or merged into a ModelOpt FP8-weight checkpoint (``quant_algo`` FP8). Granularity: ``tensor``,
``head``, ``channel``, ``rank`` (one value per tensor-parallel rank) or ``any``; number format: kvq's
names (``fp8_e4m3``, ``int8``, ...) or ``any``. Versions: ``A-B`` (both included), ``>=A``, ``<=B``,
``>B`` or one release; ``x`` stands for any patch release.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import yaml

Verdict = Literal["applied", "ignored", "refused", "broken"]
ANY = "any"
UNQUANTIZED = "unquantized"  # weights: the checkpoint's weights are not quantized (KV scales only)
FP8_WEIGHTS = "fp8"  # weights: a ModelOpt FP8-weight checkpoint (hf_quant_config.json quant_algo FP8)

# The newest release of each engine whose source the rows were read from: a row whose range reaches
# it (or is open-ended) describes current releases.
NEWEST_READ = {
    "vLLM": "0.33.0",
    "SGLang": "0.5.23",
    "TensorRT-LLM": "main",  # no wheel was reachable: the sources indexed from the repository, 2026
    "LMDeploy": "0.18.0",
    "transformers + compressed-tensors": "0.20.1",
}


@dataclass(frozen=True)
class EngineRow:
    engine: str
    versions: str
    backend: str
    kind: str  # checkpoint kind / export format
    granularity: str
    number: str
    verdict: Verdict
    note: str
    source: str  # "path@version"
    weights: str = ANY  # ModelOpt kinds: UNQUANTIZED (KV scales only) or FP8_WEIGHTS; ANY elsewhere

    @property
    def current(self) -> bool:
        """Whether the row's version range reaches the newest release read (or has no upper end)."""
        versions = self.versions
        if versions.startswith(">"):
            return True
        upper = versions.removeprefix("<=").rpartition("-")[2]
        return upper == NEWEST_READ.get(self.engine)


MATRIX_FILE = Path(__file__).resolve().parent / "engine_matrix.yaml"


def load_matrix(path: Path = MATRIX_FILE) -> tuple[EngineRow, ...]:
    """The rows of ``path``: a YAML list of mappings with :class:`EngineRow`'s field names.

    The rows are data, kept in YAML beside this module (one entry per row, every value a string) so
    that they read as a table and not as code; a malformed entry is a bug in kvq, reported by name.
    """
    entries = yaml.safe_load(path.read_text(encoding="utf-8"))
    rows = []
    for i, entry in enumerate(entries if isinstance(entries, list) else [entries]):
        try:
            row = EngineRow(**entry)
        except TypeError as exc:
            raise ValueError(f"{path} entry {i}: not an engine row ({exc})") from exc
        if not all(isinstance(value, str) for value in asdict(row).values()):
            raise ValueError(f"{path} entry {i} ({row.engine} {row.versions}): every value must be a string")
        rows.append(row)
    return tuple(rows)


ENGINE_MATRIX: tuple[EngineRow, ...] = load_matrix()


def _matches(field: str, wanted: str | None) -> bool:
    return field == ANY or wanted is None or field == wanted


def engine_verdicts(kind: str, number: str | None, granularity: str | None,
                    rows: tuple[EngineRow, ...] = ENGINE_MATRIX, weights: str | None = None) -> list[EngineRow]:
    """The rows for scales of checkpoint ``kind`` in ``number`` format at ``granularity`` (None: any).

    ``weights`` (ModelOpt: UNQUANTIZED or FP8_WEIGHTS; None: unknown) narrows the ModelOpt rows. Rows
    for current releases come first, each group in the matrix's order.
    """
    found = [row for row in rows if row.kind == kind and _matches(row.number, number)
             and _matches(row.granularity, granularity) and _matches(row.weights, weights)]
    return sorted(found, key=lambda row: not row.current)  # stable: matrix order within each group


# How the Markdown table names each checkpoint kind (kvq.inspection.found's names) and its kvq format.
_KIND_TEXT = {
    "compressed-tensors": "compressed-tensors (`vllm`)",
    "modelopt": "ModelOpt (`modelopt`)",
    "sglang-json": "SGLang JSON (`sglang-json`)",
    "trtllm": "TensorRT-LLM checkpoint (`trtllm`)",
    "lmdeploy": "TurboMind files (`lmdeploy`)",
}
_WEIGHTS_TEXT = {UNQUANTIZED: ", KV only (unquantized weights)", FP8_WEIGHTS: ", merged into ModelOpt FP8 weights"}
_GRANULARITY_TEXT = {"tensor": "per tensor", "head": "per head", "channel": "per channel", "rank": "per TP rank"}


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def matrix_markdown(rows: tuple[EngineRow, ...] = ENGINE_MATRIX) -> str:
    """The matrix as a Markdown table (docs/engines.md holds it verbatim), rows in the matrix's order."""
    lines = ["| engine | versions | backend | checkpoint (kvq format) | scales | verdict | note | source |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        kind = _KIND_TEXT.get(row.kind, row.kind) + _WEIGHTS_TEXT.get(row.weights, "")
        scales = " ".join(x for x in (row.number, _GRANULARITY_TEXT.get(row.granularity, row.granularity))
                          if x != ANY) or ANY
        verdict = f"**{row.verdict}**" if row.verdict in ("broken", "refused") else row.verdict
        cells = (row.engine, row.versions, row.backend, kind, scales, verdict, row.note, f"`{row.source}`")
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"
