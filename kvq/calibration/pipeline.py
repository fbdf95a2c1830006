"""The calibration run: data -> capture -> stats -> solver -> artifacts."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from kvq import __version__
from kvq.artifacts.files import (
    SCALES_FILE,
    SCALES_JSON,
    STATS_FILE,
    TRANSFORMS_FILE,
    check_artifact_out,
    file_sha256,
    write_artifact,
)
from kvq.artifacts.reservoir import TOKENS, Reservoir
from kvq.artifacts.scales import KVScales
from kvq.artifacts.stats import KVStats
from kvq.calibration.consumer import StatsConsumer
from kvq.calibration.distributed import World, agree, rank_max_memory, reduce_stats, shard, world
from kvq.calibration.resume import PartialSaver, ResumeCheck, fingerprint, resume_from
from kvq.capture import capture_batches, input_device
from kvq.data import Batch, batches, load_documents, select_samples
from kvq.data.data_spec import DataSpec
from kvq.errors import KvqError, UsageError
from kvq.io.out_policy import check_reads
from kvq.model.loading import check_seqlen, check_spec, load_spec, parse_max_memory
from kvq.model.mla import config_latent_dims, layout_metadata
from kvq.model.model_spec import LoadedModel, ModelInfo, ModelSpec
from kvq.progress import Progress, counter
from kvq.recipe.schema import KVRecipe
from kvq.solving.loss import DEFAULT_LOSS_WINDOWS, solve_by_loss, uses_loss
from kvq.solving.row_scale import refuse_row_observers
from kvq.solving.solver import solve_scales

ARTIFACT_SET = (STATS_FILE, SCALES_FILE, SCALES_JSON)  # what a calibration writes
CAPTURE_POINT = "transformers Cache.update: keys after RoPE, values as given, per KV head before repeat_kv"


@dataclass
class CalibrationConfig:
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    samples: int = 128
    seqlen: int = 2048
    batch_size: int = 1
    seed: int = 0
    save_every: int | None = None  # samples between partial saves; None: about every minute of work
    resume: bool = False  # continue the interrupted run whose partial statistics are in --out
    histograms: str | None = None  # "head" / "channel": record histograms even if the recipe's observer needs none
    loss_windows: int = DEFAULT_LOSS_WINDOWS  # observer loss: the first samples it runs the model on


def histogram_level(recipe: KVRecipe, asked: str | None) -> str | None:
    """The histograms a run records: what the recipe's observers need ("channel" for a per-channel clipping
    observer, else "head"), or more if asked; None for min/max only."""
    needs = [spec for spec in (recipe.key, recipe.value) if spec.needs_histograms]
    if any(spec.granularity == "channel" for spec in needs) or asked == "channel":
        return "channel"
    return "head" if needs or asked == "head" else None


@dataclass
class CalibrationResult:
    info: ModelInfo
    stats: KVStats
    scales: KVScales
    files: list[Path]
    samples: int
    tokens: int
    seconds: float


def collect_stats(
    model: torch.nn.Module,
    batch_iter: Iterable[Batch],
    on_batch: Callable[[Batch], None] | None = None,
    stats: KVStats | None = None,
    histograms: str | None = None,
    queries: bool = False,
) -> KVStats:
    """Run the decoder over every batch and fold all of their K/V into one :class:`KVStats` (``stats``, to
    continue earlier statistics); ``histograms`` "head" / "channel" records histograms too, ``queries`` the
    queries' ranges."""
    stats = KVStats() if stats is None else stats
    capture_batches(model, batch_iter, StatsConsumer(stats, histograms, queries), on_batch)
    return stats


def _named_inputs(cfg: CalibrationConfig) -> list[Path]:
    """The local files or folders the run reads data from (never an --out)."""
    named = [Path(p) for p in cfg.data.data_files or []]
    if Path(cfg.data.dataset).exists():
        named.append(Path(cfg.data.dataset))
    return named


def run_calibration(cfg: CalibrationConfig, recipe: KVRecipe, out_dir: Path | None, progress: Progress | None = None,
              force: bool = False, inputs: Sequence[Path] = (), loaded: LoadedModel | None = None
              ) -> CalibrationResult:
    """Calibrate ``cfg.model`` (or the ``loaded`` model) on ``cfg.data`` and write stats + scales into
    ``out_dir`` (None: write nothing, not even partial statistics).

    ``out_dir`` follows the one --out policy (docs/artifacts.md), checked before anything loads;
    ``force`` replaces a folder that holds files other than a kvq artifact, never one the run reads
    (the data, the model, ``inputs`` such as the recipe file). ``progress(done, total)`` counts this
    process's samples (:mod:`kvq.progress`; under torchrun rank 0 reports its share).
    """
    device = check_spec(cfg.model)  # before any data or model is loaded
    w = world(input_device(loaded.model) if loaded is not None else device)  # torchrun: join the group
    if cfg.resume and out_dir is None:
        raise UsageError("resume continues the partial statistics saved in an output folder, and none is given",
                         hint="pass the --out (out=) of the interrupted run")
    if recipe.transforms and loaded is not None:
        raise UsageError(f"recipe {recipe.name} folds transforms into the model's weights, which would change the "
                         "model object passed in", hint="pass the model by its path or id, which kvq loads itself")
    if cfg.resume and w.size > 1:
        raise UsageError("--resume continues one process's partial statistics", hint="resume without torchrun")
    if recipe.query is not None and w.size > 1:
        raise UsageError(f"recipe {recipe.name} calibrates the query scale, which torchrun runs do not reduce yet",
                         hint="calibrate it in one process (no torchrun)")
    if recipe.needs_rows and w.size > 1:
        raise UsageError(f"recipe {recipe.name} uses the attention or loss observer, whose sample of Q/K/V rows one "
                         "process must draw", hint="calibrate it in one process (no torchrun), or use observer mse")
    if recipe.transforms and w.size > 1:
        raise UsageError(f"recipe {recipe.name} plans its transforms on the query/key ranges of all samples, "
                         "which one process must see", hint="calibrate transforms in one process (no torchrun)")
    if recipe.transforms and cfg.model.device_map is not None:
        raise UsageError(f"recipe {recipe.name} folds transforms into the weights, which needs the whole model loaded "
                         "(no --device-map)", hint="calibrate transforms without --device-map")
    if recipe.transforms and cfg.model.dtype is not None:
        raise UsageError(
            f"recipe {recipe.name} folds transforms into the model's weights, which must stay in the checkpoint's "
            f"own dtype for the export to write them exactly: --dtype {cfg.model.dtype} cannot be used with transforms",
            hint="omit --dtype (the model's own dtype)",
        )
    reads = [*_named_inputs(cfg), *inputs]
    if out_dir is not None:
        out_dir = Path(out_dir)
        model_path = Path(cfg.model.model) if cfg.model.model else None
        check_reads(out_dir, reads, [model_path] if model_path is not None and model_path.exists() else [])
        written = (*ARTIFACT_SET, TRANSFORMS_FILE) if recipe.transforms else ARTIFACT_SET
        check_artifact_out(out_dir, written, force=force, inputs=reads)
    if w.size > 1 and cfg.model.device_map is not None:  # each rank spreads its copy over its own GPUs only
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        parsed = parse_max_memory(cfg.model.max_memory) if cfg.model.max_memory is not None else None
        offload = None if cfg.model.offload_folder is None else str(Path(cfg.model.offload_folder) / f"rank{w.rank}")
        cfg = replace(cfg, model=replace(cfg.model, max_memory=rank_max_memory(w, gpus, parsed), offload_folder=offload))
    failure: Exception | None = None
    try:
        dataset, loaded, picked, stats, record, seconds = _run(cfg, recipe, w, progress, out_dir, loaded)
    except Exception as exc:  # noqa: BLE001 - shared with the other ranks, then raised as it is
        failure = exc
    agree(w, failure)
    info = loaded.info
    stats = reduce_stats(stats, info.shape, w, histogram_level(recipe, cfg.histograms))
    stats.check_complete(info.kv_layers)
    for i, layer in stats.layers.items():
        want = info.shape.of(i)
        for which, ts in (("k", layer.k), ("v", layer.v)):
            if tuple(ts.min.shape) != want.of(which):
                raise KvqError(
                    f"layer {i}: captured {'keys' if which == 'k' else 'values'} have (heads, dim) "
                    f"{tuple(ts.min.shape)}, the config says {want.of(which)}"
                )
    stats.metadata = {
        "model": info.model_id,
        "config_hash": info.config_hash,
        "model_type": info.model_type,
        **info.shape.to_metadata(),
        **layout_metadata(loaded.model.config),
        "dataset": dataset.name,
        "dataset_origin": dataset.origin,
        "data_files": json.dumps([{"path": f, "sha256": file_sha256(f)} for f in dataset.files]),
        "samples": str(len(picked.token_ids)),
        "samples_requested": str(cfg.samples),
        "documents_used": str(picked.documents_used),
        "seqlen": str(cfg.seqlen),
        "seed": str(cfg.seed),
        "tokens": str(stats.total_tokens),
        "dtype": str(next(loaded.model.parameters()).dtype).removeprefix("torch."),
        "capture_point": CAPTURE_POINT,
        "kvq_version": __version__,
    }
    artifacts = {STATS_FILE: b""}
    if record is not None:
        stats.metadata.update(transforms=record.transforms_json, weights_hash=record.weights_hash)
        artifacts[TRANSFORMS_FILE] = record.to_bytes()
    artifacts[STATS_FILE] = stats.to_bytes()
    if uses_loss(recipe):
        scales = solve_by_loss(stats, recipe, loaded.model, picked.token_ids[:cfg.loss_windows])
    else:
        scales = solve_scales(stats, recipe)
    files = []  # torchrun: rank 0 writes, the other ranks nothing
    if w.is_writer and out_dir is not None:
        files = write_artifact(out_dir, {**artifacts, **scales.to_files()}, force=force,
                               inputs=[*reads, *map(Path, dataset.files)])
    return CalibrationResult(info, stats, scales, files, len(picked.token_ids), stats.total_tokens, seconds)


def _run(cfg: CalibrationConfig, recipe: KVRecipe, w: World, progress: Progress | None, out_dir: Path | None,
         loaded: LoadedModel | None):
    """This rank's part: data, model (``loaded``, or loaded here), its share of the samples, their statistics
    (and transforms); saves partial statistics into ``out_dir`` as it goes (one process), and continues them
    with ``cfg.resume``."""
    dataset = load_documents(cfg.data.dataset, cfg.data.data_files, purpose="calibration")
    loaded = load_spec(cfg.model) if loaded is None else loaded
    check_seqlen(loaded.model.config, cfg.seqlen)
    if config_latent_dims(loaded.model.config) is not None:  # MLA: what the recipe needs must be in the latent row
        refuse_row_observers(recipe)
    tok = loaded.tokenizer
    picked = select_samples(dataset.documents, tok, cfg.samples, cfg.seqlen, cfg.seed)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    start = time.perf_counter()
    record = None
    if recipe.transforms:  # folded into the weights first: the statistics are those of the transformed K/V
        from kvq.transforms.record import transform_model

        record = transform_model(loaded.model, recipe.transforms,
                                 lambda: batches(picked.token_ids, cfg.batch_size, pad_id), recipe.key)
    mine = shard(picked.token_ids, w)  # every sample when not launched by torchrun
    info = loaded.info
    data = json.dumps({"origin": dataset.origin, "files": [file_sha256(f) for f in dataset.files]})
    level = histogram_level(recipe, cfg.histograms)
    print_ = fingerprint(info.model_id, info.config_hash, data, mine, cfg.seqlen, cfg.batch_size,
                         json.dumps(recipe.to_json(), sort_keys=True) + (record.weights_hash if record else "")
                         + (f" histograms {level}" if level else ""))
    fresh = KVStats(reservoir=Reservoir(tokens=min(TOKENS, cfg.seqlen), seed=cfg.seed) if recipe.needs_rows else None)
    check = ResumeCheck(mine, info.shape, level, recipe.query is not None, fresh.reservoir)
    stats, done = resume_from(out_dir, print_, check) if cfg.resume else (fresh, 0)
    saver = PartialSaver(out_dir, print_, cfg.save_every) if w.size == 1 and out_dir is not None else None
    count = [done]
    advance = counter(progress if w.is_writer else None, len(mine), done)

    def on_batch(batch: Batch) -> None:
        count[0] += batch.num_samples
        if saver is not None and saver.due(count[0]):
            saver.save(stats, count[0])
        if advance is not None:
            advance(batch.num_samples)

    try:
        collect_stats(loaded.model, batches(mine[done:], cfg.batch_size, pad_id), on_batch, stats, level,
                      recipe.query is not None)
    except KeyboardInterrupt:
        if saver is not None:
            saver.save(stats, count[0])  # what was done, for --resume
        raise
    seconds = time.perf_counter() - start
    return dataset, loaded, picked, stats, record, seconds
