"""What ``kvq report`` reads: an artifact's statistics (required) and scales, a validate.json, an eval.json.

Each is checked before any figure is drawn: a missing statistics file, a JSON file that does not parse
or is not the kvq report it should be, or a report of another model shape is one :class:`UsageError`
naming the file and what to pass instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from kvq.artifacts.files import SCALES_FILE, STATS_FILE, VALIDATE_JSON, StatedShape, require_file
from kvq.artifacts.scales import KVScales
from kvq.artifacts.stats import KVStats
from kvq.errors import UsageError
from kvq.io.parse import parse_json
from kvq.model.model_spec import KVShape, LayerKV, layers_text

_MAX_JSON = 256 << 20  # a validate.json of a 100-layer, 64-head model is a few MB


@dataclass
class ReportInputs:
    """Everything one report is drawn from; ``validation`` and ``evaluation`` are the parsed JSON reports."""

    out_dir: Path
    stats: KVStats
    scales: KVScales | None
    validation: dict | None = None
    validation_path: Path | None = None
    evaluation: dict | None = None
    evaluation_path: Path | None = None

    @property
    def layers(self) -> tuple[int, ...]:
        """The layers with a KV cache the statistics hold (all of 0..num_layers-1 but in hybrid models)."""
        return self.shape.kv_layers

    @cached_property
    def shape(self) -> KVShape:
        """The KV cache the statistics hold: each layer's K and V (heads, dim) as its tensors are, the model's
        decoder layers as the metadata states them (checked against the file when it was loaded; the layers the
        file holds when it states none)."""
        layers = {i: LayerKV(tuple(t.k.min.shape), tuple(t.v.min.shape)) for i, t in self.stats.layers.items()}
        held = tuple(sorted(layers))
        stated = StatedShape.parse(self.stats.metadata, str(self.out_dir / STATS_FILE)).num_layers
        num_layers = stated if stated is not None else held[-1] + 1
        return KVShape.from_layers(num_layers, layers, None if held == tuple(range(num_layers)) else held)

    @property
    def num_layers(self) -> int:
        return self.shape.num_layers

    @property
    def num_heads(self) -> int:
        """KV heads of the first KV-cache layer's keys (KVShape's convention for ``num_kv_heads``)."""
        return self.shape.num_kv_heads

    @property
    def head_dim(self) -> int:
        """head_dim of the first KV-cache layer's keys (KVShape's convention)."""
        return self.shape.head_dim

    @property
    def read(self) -> list[Path]:
        """The files the report is computed from (never replaced by writing it)."""
        files = [self.out_dir / STATS_FILE]
        if self.scales is not None:
            files.append(self.out_dir / SCALES_FILE)
        return files + [p for p in (self.validation_path, self.evaluation_path) if p is not None]


def load_inputs(out_dir: str | Path, validation: str | Path | None = None,
                eval_json: str | Path | None = None) -> ReportInputs:
    """Read the artifact folder ``out_dir`` and the optional reports; validate.json in the folder is used
    when ``validation`` is not given."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise UsageError(f"OUT_DIR {out_dir} is not a folder",
                         hint="pass the output folder of `kvq calibrate` (it holds stats.safetensors)")
    if not (out_dir / STATS_FILE).is_file():
        raise UsageError(f"OUT_DIR {out_dir} holds no {STATS_FILE}",
                         hint="pass the output folder of `kvq calibrate`; the report is drawn from its statistics")
    stats = KVStats.load(out_dir / STATS_FILE)
    scales = KVScales.load(out_dir / SCALES_FILE) if (out_dir / SCALES_FILE).is_file() else None
    inputs = ReportInputs(out_dir, stats, scales)
    if scales is not None:
        _check_layers(inputs, tuple(sorted(scales.layers)), out_dir / SCALES_FILE)
    if validation is None and (out_dir / VALIDATE_JSON).is_file():
        validation = out_dir / VALIDATE_JSON
    if validation is not None:
        inputs.validation_path = Path(validation)
        inputs.validation = read_kvq_report(validation, "validate", "--validation",
                                            ("recipe", "model", "layers", "heads"))
        _check_model(inputs, inputs.validation, inputs.validation_path)
    if eval_json is not None:
        inputs.evaluation_path = Path(eval_json)
        inputs.evaluation = read_kvq_report(eval_json, "eval", "--eval", ("model", "rows"))
        _check_model(inputs, inputs.evaluation, inputs.evaluation_path)
    return inputs


def read_kvq_report(path: str | Path, kind: str, option: str, keys: tuple[str, ...]) -> dict:
    """A JSON report written by ``kvq {kind} --json``; a UsageError naming ``option`` if it is anything else."""
    hint = f"pass the JSON written by `kvq {kind}`" + (" --json FILE" if kind == "eval" else "")
    path = require_file(path, f"{option} file", hint)
    if path.stat().st_size > _MAX_JSON:
        raise UsageError(f"{option} file {path} is over {_MAX_JSON >> 20} MiB; it is not a kvq {kind} report",
                         hint=hint)
    data = parse_json(path.read_bytes(), f"{option} file {path}", hint)
    if not isinstance(data, dict) or "kvq_version" not in data or data.get("report") != kind:
        found = data.get("report") if isinstance(data, dict) else None
        what = f"a kvq {found} report" if isinstance(found, str) and "kvq_version" in data else "not a kvq report"
        raise UsageError(f"{option} file {path} is {what}, not a kvq {kind} report", hint=hint)
    missing = [k for k in keys if k not in data]
    if missing:
        raise UsageError(f"{option} file {path} lacks {', '.join(missing)}; it is not a complete kvq {kind} report",
                         hint=hint)
    return data


def _check_layers(inputs: ReportInputs, layers: tuple[int, ...], path: Path) -> None:
    if layers != inputs.layers:
        raise UsageError(f"{path} has layers {layers_text(layers)} but {inputs.out_dir / STATS_FILE} has "
                         f"{layers_text(inputs.layers)}", hint="pass files of the same model")


def _check_model(inputs: ReportInputs, report: dict, path: Path) -> None:
    """The report is of the statistics' model shape (layers, KV heads, head_dim)."""
    model = report.get("model")
    if not isinstance(model, dict):
        raise UsageError(f"{path}: 'model' is not an object; it is not a complete kvq report",
                         hint="pass the JSON kvq wrote")
    ours = {"num_layers": inputs.num_layers, "num_kv_heads": inputs.num_heads, "head_dim": inputs.head_dim}
    for key, value in ours.items():
        theirs = model.get(key)
        if theirs != value:
            raise UsageError(f"{path} is a report on a model with {key} {theirs}, but the statistics in "
                             f"{inputs.out_dir} have {value}", hint="pass a report of the same model")
    cached = model.get("cached_layers")  # absent in reports of kvq before 0.4 (every layer cached)
    if cached is not None and cached != list(inputs.layers):
        raise UsageError(f"{path} is a report on a model with KV-cache layers {str(cached)[:80]}, but the statistics "
                         f"in {inputs.out_dir} have {layers_text(inputs.layers)}", hint="pass a report of the same model")
