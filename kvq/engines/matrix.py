"""Which serving engines apply, ignore, refuse or break on which KV-cache scales: the engine matrix as data.

One :class:`EngineRow` per (engine, versions, backend, checkpoint kind, granularity, number format),
with a verdict and the source it was read from (``path@version``); the rows themselves are data, in
``kvq/engines/engine_matrix.yaml`` beside this module (edit them there, in one place). They come from reading each
engine's released source (vLLM wheels up to 0.34.0, SGLang up to 0.5.23, TensorRT-LLM's indexed
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

``model_type`` (``any`` in most rows) makes a row specific to the model types it lists (``config.json``
``model_type`` values, comma-separated): some engine model files never pass KV scales to their attention
layers. :func:`model_type_verdicts` answers for (engine, version, model type); :func:`loader_warnings` gives
the lines `kvq export-scales` and `kvq inspect` print for them. Their ``source`` names the line
(``path:line@version``).
"""

from __future__ import annotations

import math
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
    "vLLM": "0.34.0",
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
    model_type: str = ANY  # the config model_type(s) the row is limited to, comma-separated; ANY: every model

    @property
    def model_types(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.model_type.split(","))

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


def _for_model(row: EngineRow, model_type: str | None) -> bool:
    return row.model_type == ANY or model_type is None or model_type in row.model_types


def engine_verdicts(kind: str, number: str | None, granularity: str | None,
                    rows: tuple[EngineRow, ...] = ENGINE_MATRIX, weights: str | None = None,
                    model_type: str | None = None) -> list[EngineRow]:
    """The rows for scales of checkpoint ``kind`` in ``number`` format at ``granularity`` (None: any).

    ``weights`` (ModelOpt: UNQUANTIZED or FP8_WEIGHTS; None: unknown) narrows the ModelOpt rows, and
    ``model_type`` (None: unknown) the model-specific ones. Rows for current releases come first, each
    group in the matrix's order.
    """
    found = [row for row in rows if row.kind == kind and _matches(row.number, number)
             and _matches(row.granularity, granularity) and _matches(row.weights, weights)
             and _for_model(row, model_type)]
    return sorted(found, key=lambda row: not row.current)  # stable: matrix order within each group


def _version_key(text: str, upper: bool) -> tuple[float, ...]:
    """A release as a sortable tuple: ``x`` (any patch) is the lowest or highest patch, ``main`` above
    every release, a release candidate (``1.3.0rc20``) before its release."""
    if text == "main":
        return (math.inf,)
    release, _, rc = text.partition("rc")
    parts = [(math.inf if upper else 0.0) if p == "x" else float(p) for p in release.split(".")]
    return (*parts, *[0.0] * (4 - len(parts)), float(rc) if rc else math.inf)


def version_in(versions: str, version: str) -> bool:
    """Whether release ``version`` (``0.17.1``, ``main``) lies in a row's ``versions`` range."""
    v = _version_key(version, upper=False)
    for prefix, inside in ((">=", lambda b: v >= _version_key(b, False)), ("<=", lambda b: v <= _version_key(b, True)),
                           (">", lambda b: v > _version_key(b, True))):
        if versions.startswith(prefix):
            return inside(versions.removeprefix(prefix))
    low, _, high = versions.partition("-")
    return _version_key(low, False) <= v <= _version_key(high or low, True)


def model_type_verdicts(engine: str, version: str, model_type: str, kind: str | None = None,
                        rows: tuple[EngineRow, ...] = ENGINE_MATRIX) -> list[EngineRow]:
    """The rows specific to ``model_type`` for ``engine`` release ``version`` (``kind``: one checkpoint kind).

    A row whose verdict is not ``applied`` means the engine's loader for that model type does not apply
    the KV scales in that release: ``engine X versions ignores KV scales for model type Y``.
    """
    return [row for row in rows if row.engine == engine and row.model_type != ANY and model_type in row.model_types
            and version_in(row.versions, version) and (kind is None or row.kind == kind)]


# How a warning names what the engine does (verdicts other than applied).
_VERB = {"ignored": "ignores", "refused": "refuses", "broken": "mis-applies"}


def loader_warnings(kind: str, model_type: str | None, weights: str | None = None,
                    rows: tuple[EngineRow, ...] = ENGINE_MATRIX) -> list[str]:
    """One line per engine release whose loader for ``model_type`` does not apply scales of ``kind``:
    ``<engine> <versions> ignores KV scales for model type <model_type>: <why> (<source line>)``."""
    if model_type is None:
        return []
    return [f"{row.engine} {row.versions} {_VERB[row.verdict]} KV scales for model type {model_type}: {row.note} "
            f"({row.source})"
            for row in rows if row.model_type != ANY and model_type in row.model_types and row.kind == kind
            and row.verdict in _VERB and _matches(row.weights, weights)]


# The checkpoint kind each export format writes (kvq.inspection.found's names).
EXPORT_KIND = {"vllm": "compressed-tensors", "modelopt": "modelopt", "sglang-json": "sglang-json",
               "trtllm": "trtllm", "lmdeploy": "lmdeploy"}


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
        backend = row.backend if row.model_type == ANY else f"{row.backend}; model type {row.model_type}"
        cells = (row.engine, row.versions, backend, kind, scales, verdict, row.note, f"`{row.source}`")
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"
