"""What ``kvq report`` reads: an artifact's statistics (required) and scales, a validate.json, an eval.json.

Each is checked before any figure is drawn: a missing statistics file, a JSON file that does not parse
or is not the kvq report it should be, or a report of another model shape is one :class:`UsageError`
naming the file and what to pass instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kvq.artifacts.files import SCALES_FILE, STATS_FILE, VALIDATE_JSON, require_file
from kvq.artifacts.scales import KVScales
from kvq.artifacts.stats import KVStats
from kvq.errors import UsageError
from kvq.io.parse import parse_json

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
    def num_layers(self) -> int:
        return self.stats.num_layers

    @property
    def num_heads(self) -> int:
        return int(self.stats.layers[0].k.min.shape[0])

    @property
    def head_dim(self) -> int:
        return int(self.stats.layers[0].k.min.shape[1])

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
    if sorted(stats.layers) != list(range(len(stats.layers))):
        raise UsageError(f"{out_dir / STATS_FILE} holds the KV-cache layers {', '.join(map(str, sorted(stats.layers)))} "
                         "of a hybrid model (the others keep a recurrent state); kvq report draws every layer 0..N-1 "
                         "and does not read such statistics yet",
                         hint="read the statistics with `kvq inspect` or `kvq eval` instead")
    shapes = {(tuple(layer.k.min.shape), tuple(layer.v.min.shape)) for layer in stats.layers.values()}
    if len(shapes) > 1 or any(k != v for k, v in shapes):
        raise UsageError(f"{out_dir / STATS_FILE} holds layers of different K/V shapes (metadata kv_shapes "
                         f"{stats.metadata.get('kv_shapes', '?')[:80]}); kvq report draws one heads x channels grid "
                         "for every layer and does not read such statistics yet",
                         hint="read the statistics with `kvq inspect` or `kvq eval` instead")
    scales = KVScales.load(out_dir / SCALES_FILE) if (out_dir / SCALES_FILE).is_file() else None
    inputs = ReportInputs(out_dir, stats, scales)
    if scales is not None:
        _check_layers(inputs, scales.num_layers, out_dir / SCALES_FILE)
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


def _check_layers(inputs: ReportInputs, layers: int, path: Path) -> None:
    if layers != inputs.num_layers:
        raise UsageError(f"{path} has {layers} layers but {inputs.out_dir / STATS_FILE} has {inputs.num_layers}",
                         hint="pass files of the same model")


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
