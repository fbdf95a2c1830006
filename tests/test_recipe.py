from pathlib import Path

import pytest

from kvq.errors import UsageError
from kvq.recipe.schema import DEFAULT_RECIPE, builtin_recipe_names, load_recipe

BUILTINS = {
    "fp8-e4m3-per-tensor": ("fp8_e4m3", True, "tensor"),
    "fp8-e4m3-per-head": ("fp8_e4m3", True, "head"),
    "fp8-e5m2-per-tensor": ("fp8_e5m2", True, "tensor"),
    "fp8-e4m3fnuz-per-tensor": ("fp8_e4m3fnuz", True, "tensor"),
    "nvfp4-kv": ("nvfp4", True, "tensor"),
    "int8-sym-per-head": ("int8", True, "head"),
    "int8-asym-per-head": ("int8", False, "head"),
    "int8-asym-per-channel": ("int8", False, "channel"),
    "int4-asym-per-head": ("int4", False, "head"),
    "int4-asym-per-channel": ("int4", False, "channel"),
}


def test_builtin_recipes_by_name():
    assert set(builtin_recipe_names()) == set(BUILTINS)
    assert DEFAULT_RECIPE == "fp8-e4m3-per-tensor"
    for name, (fmt, sym, gran) in BUILTINS.items():
        r = load_recipe(name)
        assert r.name == name
        for spec in (r.key, r.value):
            assert (spec.format, spec.symmetric, spec.granularity, spec.observer) == (fmt, sym, gran, "minmax")


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "my.yaml"
    p.write_text(text)
    return p


def test_overrides_for_keys_and_values(tmp_path):
    r = load_recipe(write(tmp_path, "format: int8\nsymmetric: false\ngranularity: head\n"
                          "keys: {granularity: channel}\nvalues: {format: int4}\n"))
    assert r.name == "my"
    assert (r.key.format, r.key.granularity, r.key.symmetric) == ("int8", "channel", False)
    assert (r.value.format, r.value.granularity, r.value.symmetric) == ("int4", "head", False)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("format: int8\ngranularity: head\nsymetric: true\n", "symetric: unknown key (did you mean 'symmetric'?)"),
        ("format: int8\ngranularity: head\nzzz: 1\n", "zzz: unknown key"),
        ("format: int8\ngranularity: head\nkeys: {format: int4, format: int8}\n",
         "key 'format' is given twice (line 3)"),
        ("base: &b {format: int8}\nkeys: *b\nformat: int8\ngranularity: head\n", "aliases (*b) are not allowed"),
        ("[" * 5000, "nested too deeply"),
        ("", "is empty"),
        ("format: int9\ngranularity: head\n", "format: Input should be 'fp8_e4m3', 'fp8_e5m2', 'fp8_e4m3fnuz', 'int8', 'int4' or 'nvfp4'"),
        ("format: int8\ngranularity: heads\n", "granularity: Input should be 'tensor', 'head' or 'channel'"),
        ("format: int8\ngranularity: head\nobserver: kl\n", "observer: Input should be 'minmax', 'percentile', 'mse', 'attention' or 'loss'"),
        ("format: int8\ngranularity: head\nkeys: {granularty: channel}\n", "keys.granularty: unknown key"),
        ("format: int8\ngranularity: head\nsymmetric: 'yes'\n", "symmetric: Input should be a valid boolean"),
        ("granularity: head\n", "format: required field is missing"),
        ("- format: int8\n", "expected a mapping"),
        ("format: [int8\n", "not valid YAML at line"),
    ],
)
def test_bad_recipes_name_file_field_and_allowed_values(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(UsageError) as err:
        load_recipe(path)
    assert str(path) in err.value.message
    assert expected in err.value.message
    assert "\n" not in err.value.message


def test_fp8_asymmetric_is_rejected_not_rewritten(tmp_path):
    with pytest.raises(UsageError, match="fp8_e4m3 is symmetric by construction"):
        load_recipe(write(tmp_path, "format: fp8_e4m3\nsymmetric: false\ngranularity: tensor\n"))
    with pytest.raises(UsageError, match="values: .*fp8_e5m2 is symmetric"):
        load_recipe(write(tmp_path, "format: int8\nsymmetric: false\ngranularity: head\nvalues: {format: fp8_e5m2}\n"))


def test_unknown_name_and_missing_file():
    with pytest.raises(UsageError, match="unknown recipe 'int3'") as err:
        load_recipe("int3")
    assert "int8-asym-per-head" in err.value.hint
    with pytest.raises(UsageError, match="recipe file nowhere/r.yaml does not exist"):
        load_recipe("nowhere/r.yaml")


def test_a_recipe_over_the_size_cap_is_refused_before_parsing(tmp_path):
    from kvq.recipe.reading import MAX_RECIPE_BYTES

    body = "format: int8\ngranularity: head\n"
    ok = write(tmp_path, body + "#" * (MAX_RECIPE_BYTES - len(body) - 1) + "\n")
    assert ok.stat().st_size == MAX_RECIPE_BYTES and load_recipe(ok).key.format == "int8"
    big = write(tmp_path, body + "#" * (MAX_RECIPE_BYTES - len(body)) + "\n")  # one byte over, still valid YAML
    with pytest.raises(UsageError, match="is over 64 KiB"):
        load_recipe(big)


def test_a_data_file_given_as_recipe_says_so(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "hello"}\n')  # parses as a YAML mapping: the hint must still say what it is
    with pytest.raises(UsageError) as err:
        load_recipe(data)
    assert "text: unknown key" in err.value.message and "--data-files" in err.value.hint


def test_transforms_by_name_or_with_options(tmp_path):
    from kvq.recipe.schema import KVRecipe, RotateValuesSpec, SmoothKeysSpec

    r = load_recipe(write(tmp_path, "format: int8\nsymmetric: false\ngranularity: head\n"
                                    "transforms: [smooth-keys, {name: rotate-values, seed: 7}]\n"))
    assert r.transforms == (SmoothKeysSpec(name="smooth-keys", alpha=0.5), RotateValuesSpec(name="rotate-values", seed=7))
    assert r.to_json()["transforms"] == [{"name": "smooth-keys", "alpha": 0.5}, {"name": "rotate-values", "seed": 7}]
    assert KVRecipe.from_json(r.to_json()) == r  # round trip through the artifact's metadata
    assert "transforms" not in load_recipe("int8-asym-per-head").to_json()  # recipes without stay as they were


def test_smooth_keys_search_is_refused_for_nvfp4_keys(tmp_path):
    with pytest.raises(UsageError) as err:
        load_recipe(write(tmp_path, "format: nvfp4\ngranularity: tensor\n"
                                    "transforms: [{name: smooth-keys, search: true}]\n"))
    assert "cannot model nvfp4 keys" in err.value.message and "\n" not in err.value.message


@pytest.mark.parametrize("body,message", [
    ("transforms: [smoth-keys]\n", "does not match any of the expected tags: 'smooth-keys', 'rotate-values'"),
    ("transforms: [{name: smooth-keys, alpha: 1.5}]\n", "alpha: Input should be less than or equal to 1 (got 1.5)"),
    ("transforms: [{name: rotate-values, sed: 1}]\n", "sed: unknown key"),
    ("transforms: [smooth-keys, smooth-keys]\n", "transform smooth-keys is listed twice"),
    ("transforms: smooth-keys\n", "transforms: Input should be a valid list"),
    ("transforms: [{name: smooth-keys, search: 1}]\n", "search: Input should be a valid boolean"),
])
def test_bad_transforms_are_refused(tmp_path, body, message):
    with pytest.raises(UsageError) as err:
        load_recipe(write(tmp_path, "format: int8\ngranularity: head\n" + body))
    assert message in err.value.message, err.value.message
