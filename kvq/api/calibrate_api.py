"""``kvq.calibrate``: run a model over calibration text, record K/V statistics, solve scales."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from kvq.api.arguments import check_choice, check_positive, path_list, recipe_arg
from kvq.api.model_arg import Loading, ModelArg, eval_mode, read_paths, resolve
from kvq.calibration.pipeline import CalibrationConfig, CalibrationResult, run_calibration
from kvq.data.data_spec import DataSpec
from kvq.model.model_spec import ModelSpec
from kvq.progress import Progress

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack from Python 3.11
from kvq.recipe.schema import DEFAULT_RECIPE, KVRecipe


def calibrate(
    model: ModelArg = None,
    tokenizer: object | None = None,
    *,
    dataset: str = "pydoc",
    data_files: Sequence[str | Path] | str | Path | None = None,
    recipe: KVRecipe | str | Path = DEFAULT_RECIPE,
    samples: int = 128,
    seqlen: int = 2048,
    batch_size: int = 1,
    seed: int = 0,
    histograms: Literal["head", "channel"] | None = None,
    out: str | Path | None = None,
    force: bool = False,
    save_every: int | None = None,
    resume: bool = False,
    loss_windows: int = 4,
    progress: Progress | None = None,
    **loading: Unpack[Loading],
) -> CalibrationResult:
    """Run ``model`` over ``samples`` calibration samples and return the K/V statistics and the scales of ``recipe``.

    What ``kvq calibrate`` does (the command calls this function). The keys are captured after RoPE and
    the values as given, per KV head before ``repeat_kv``, at transformers' ``Cache.update``.

    Args:
        model: a checkpoint folder, ``.gguf`` file or hub id, loaded as the CLI loads ``--model`` (None: the
            embedded SmolLM2-135M-Instruct); or a transformers causal LM already loaded, on any device or
            spread by an accelerate device map (not moved, cast or modified; run in eval mode).
        tokenizer: the tokenizer of a model object (None: loaded from the model's ``name_or_path``). A path or
            id brings its own, so it takes none.
        dataset: a named set (``pydoc``, ``wikitext2``, ``c4``, ``pile``, ...) or a path to local text files;
            ``data_files`` the local files of a named set.
        recipe: a :class:`kvq.recipe.schema.KVRecipe`, a built-in recipe name or a recipe YAML path.
        samples: number of samples (int >= 1); ``seqlen`` tokens per sample at most; ``batch_size`` samples
            per forward pass; ``seed`` picks the samples.
        histograms: ``"head"`` / ``"channel"`` records histograms too (for clipping observers in a later
            :func:`kvq.solve`); default what the recipe's observer needs.
        out: write ``stats.safetensors``, ``scales.safetensors`` and ``scales.json`` (and
            ``transforms.safetensors`` for a recipe with transforms) into this folder, byte for byte what the
            CLI writes, under the ``--out`` policy (``force`` replaces a folder holding other files). None
            writes nothing at all. ``save_every`` / ``resume``: partial statistics in ``out``, as the CLI.
        **loading: ``device``, ``dtype``, ``trust_remote_code``, ``device_map``, ``max_memory``,
            ``offload_folder``: how a path or id is loaded (the CLI flags of the same names,
            :class:`kvq.api.model_arg.Loading`); refused with a model object.
        loss_windows: a recipe with observer ``loss`` runs the model on its first ``loss_windows`` samples (int >= 1)
            to choose each layer's ranges (:mod:`kvq.solving.loss`); ``result.loss_search`` holds its choices and cost.
        progress: ``progress(done, total)`` in samples (:mod:`kvq.progress`).

    Returns:
        :class:`kvq.calibrate.CalibrationResult`: ``stats`` (:class:`kvq.artifacts.stats.KVStats`: per layer, K and V
        ``min`` / ``max`` / ``absmax`` as float32 tensors of shape (num_kv_heads, head_dim) in the units of the
        model's K/V activations, and token counts), ``scales`` (:class:`kvq.artifacts.scales.KVScales`: per layer
        float32 ``k_scale`` / ``v_scale`` of shape () per tensor, (num_kv_heads,) per head or
        (num_kv_heads, head_dim) per channel, in K/V units per quantized step, int32 zero-points for
        asymmetric integer formats), ``info`` (the model's id, config hash and KV-cache shape), ``files``
        written (empty without ``out``), ``samples``, ``tokens`` (per layer) and ``seconds`` of capture.

    Raises:
        kvq.errors.UsageError: a bad argument, recipe, model or dataset (before the model runs where it can).
        kvq.errors.KvqError: a failure while working (e.g. NaN in the K/V).
    """
    recipe_, recipe_files = recipe_arg(recipe)
    check_positive(samples=samples, seqlen=seqlen, batch_size=batch_size, save_every=save_every,
                   loss_windows=loss_windows)
    check_choice("histograms", histograms, ("head", "channel"))
    name, loaded = resolve(model, tokenizer, loading)
    cfg = CalibrationConfig(model=ModelSpec(name, **loading), data=DataSpec(dataset, path_list(data_files) or None), samples=samples,
                            seqlen=seqlen, batch_size=batch_size, seed=seed, save_every=save_every, resume=resume,
                            histograms=histograms, loss_windows=loss_windows)
    with eval_mode(loaded):
        return run_calibration(cfg, recipe_, None if out is None else Path(out), progress, force=force,
                               inputs=[*recipe_files, *read_paths(loaded)], loaded=loaded)
