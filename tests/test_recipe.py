"""Recipe schema: built-ins parse, bad input is rejected with the offending field's path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hawada.core.architectures import supported_architectures
from hawada.core.errors import HawadaError
from hawada.core.recipe import (
    MAX_RECIPE_BYTES,
    Recipe,
    RecipeError,
    builtin_recipes,
    parse_recipe,
    recipe_hash,
    recipe_to_dict,
)

MINIMAL = {"model": {"arch": "resnet18", "num_classes": 10}, "data": {"source": "digits"}}


def _paths(exc: RecipeError) -> list[str]:
    return [e["path"] for e in exc.errors]


def test_builtin_recipes_all_parse() -> None:
    recipes = builtin_recipes()
    assert {"resnet", "resnet-latency", "demo-digits", "imagenet-resnet50"} <= set(recipes)
    assert recipes["resnet"].model.stem == "cifar"
    assert recipes["resnet"].data.source == "fashion-mnist"
    assert (recipes["resnet"].target.metric, recipes["resnet"].target.ratio) == ("flops", 0.5)
    assert (recipes["resnet-latency"].target.metric, recipes["resnet-latency"].target.ratio) == (
        "latency",
        0.7,
    )
    assert recipes["demo-digits"].data.source == "digits"
    for recipe in recipes.values():
        assert recipe.family == "resnet"


def test_builtin_recipes_are_independent_copies() -> None:
    first = builtin_recipes()["resnet"]
    first.train.steps = 1
    assert builtin_recipes()["resnet"].train.steps == 300


def test_minimal_recipe_gets_design_defaults() -> None:
    r = parse_recipe(MINIMAL)
    assert r.model.input_size == (3, 32, 32)
    assert r.model.normalize.mean == (0.485, 0.456, 0.406)
    assert r.data.source == "digits" and r.data.batch_size == 64 and r.data.val_fraction == 0.1
    assert (r.data.augment, r.data.loader, r.data.on_corrupt) == ("auto", "auto", "fail")
    assert r.data.heldout_path is None
    assert r.target.metric == "flops" and r.target.ratio == 0.5 and r.target.latency_ms is None
    assert (
        r.gates.round_to == 8
        and r.gates.temperature.start == 1.0
        and r.gates.temperature.end == 0.05
    )
    assert r.train.steps == 300 and r.train.kd.alpha == 0.5 and r.train.log_every == 10
    assert r.finetune.epochs == 1.0 and r.latency.warmup == 10 and r.latency.device == "auto"
    assert r.export.formats == ["safetensors"]


def test_yaml_and_json_text_and_bytes_give_the_same_recipe() -> None:
    as_json = json.dumps({**MINIMAL, "target": {"metric": "params", "ratio": 0.3}})
    as_yaml = (
        "model:\n  arch: resnet18\n  num_classes: 10\ndata: {source: digits}\n"
        "target:\n  metric: params\n  ratio: 0.3\n"
    )
    a, b, c = parse_recipe(as_json), parse_recipe(as_yaml), parse_recipe(as_yaml.encode())
    assert recipe_to_dict(a) == recipe_to_dict(b) == recipe_to_dict(c)
    assert recipe_hash(a) == recipe_hash(b)
    assert recipe_hash(a) != recipe_hash(parse_recipe(MINIMAL))


def test_roundtrip_through_dict() -> None:
    r = builtin_recipes()["resnet-latency"]
    d = recipe_to_dict(r)
    json.dumps(d)  # JSON-compatible
    assert parse_recipe(d) == r


def test_unknown_nested_field_names_its_path() -> None:
    with pytest.raises(RecipeError) as info:
        parse_recipe({**MINIMAL, "gates": {"round_tp": 4}})
    assert "gates.round_tp" in str(info.value)
    assert info.value.errors == [{"path": "gates.round_tp", "message": "unknown field"}]


def test_unknown_top_level_block_rejected() -> None:
    with pytest.raises(RecipeError) as info:
        parse_recipe({**MINIMAL, "prune": {}})
    assert _paths(info.value) == ["prune"]


@pytest.mark.parametrize(
    ("block", "path"),
    [
        ({"target": {"ratio": 0.0}}, "target.ratio"),
        ({"target": {"ratio": 1.5}}, "target.ratio"),
        ({"data": {"source": "digits", "batch_size": 0}}, "data.batch_size"),
        ({"data": {"source": "digits", "batch_size": 5000}}, "data.batch_size"),
        ({"data": {"source": "digits", "val_fraction": 0.0}}, "data.val_fraction"),
        ({"data": {"source": "digits", "val_fraction": 0.95}}, "data.val_fraction"),
        ({"data": {"source": "digits", "limit": 1}}, "data.limit"),
        ({"train": {"steps": 0}}, "train.steps"),
        ({"train": {"steps": 2_000_000}}, "train.steps"),
        ({"train": {"lr": "nan"}}, "train.lr"),
        ({"train": {"kd": {"alpha": 1.5}}}, "train.kd.alpha"),
        ({"gates": {"round_to": 0}}, "gates.round_to"),
        ({"gates": {"min_channels": 0}}, "gates.min_channels"),
        ({"gates": {"temperature": {"start": 0.1, "end": 0.5}}}, "gates.temperature.end"),
        ({"gates": {"temperature": {"end": 0}}}, "gates.temperature.end"),
        ({"latency": {"repeats": 0}}, "latency.repeats"),
        ({"latency": {"dtype": "int8"}}, "latency.dtype"),
        ({"finetune": {"epochs": -1}}, "finetune.epochs"),
        ({"export": {"formats": ["onnx"]}}, "export.formats"),
        ({"export": {"formats": ["safetensors", "tflite"]}}, "export.formats[1]"),
        ({"data": {"source": "imagenet"}}, "data.source"),
        ({"data": {"source": "folder"}}, "data.path"),
        ({"data": {"source": "webdataset"}}, "data.path"),
        ({"data": {"source": "digits", "augment": "heavy"}}, "data.augment"),
        ({"data": {"source": "digits", "on_corrupt": "ignore"}}, "data.on_corrupt"),
        ({"data": {"source": "digits", "workers": -1}}, "data.workers"),
    ],
)
def test_out_of_range_values_name_their_path(block: dict, path: str) -> None:
    with pytest.raises(RecipeError) as info:
        parse_recipe({**MINIMAL, **block})
    assert _paths(info.value) == [path]
    assert path in str(info.value)


@pytest.mark.parametrize(
    ("model", "path"),
    [
        ({"arch": "resnet18", "num_classes": 0}, "model.num_classes"),
        ({"arch": "resnet18", "num_classes": 10, "input_size": [1, 32, 32]}, "model.input_size"),
        ({"arch": "resnet18", "num_classes": 10, "input_size": [3, 4, 32]}, "model.input_size"),
        ({"arch": "resnet18", "num_classes": 10, "input_size": [3, 32, 2048]}, "model.input_size"),
        ({"arch": "resnet18", "num_classes": 10, "stem": "deep"}, "model.stem"),
        (
            {
                "arch": "resnet18",
                "num_classes": 10,
                "normalize": {"mean": [0, 0, 0], "std": [1, 0, 1]},
            },
            "model.normalize.std",
        ),
        ({"num_classes": 10}, "model.arch"),
    ],
)
def test_bad_model_block(model: dict, path: str) -> None:
    with pytest.raises(RecipeError) as info:
        parse_recipe({"model": model, "data": {"source": "digits"}})
    assert _paths(info.value) == [path]


@pytest.mark.parametrize(
    ("arch", "says"),
    [
        ("vit_b_16", "is not supported: a vision transformer"),
        ("resnet9000", "unknown architecture"),
    ],
)
def test_unsupported_arch_lists_supported_names(arch: str, says: str) -> None:
    with pytest.raises(RecipeError) as info:
        parse_recipe({**MINIMAL, "model": {"arch": arch, "num_classes": 10}})
    message = str(info.value)
    assert "model.arch" in message and arch in message and says in message
    for name in supported_architectures():
        assert name in message


def test_every_torchvision_cnn_is_supported_and_resnets_keep_their_family() -> None:
    supported = supported_architectures()
    assert len(supported) == 68  # every classification CNN constructor in torchvision.models
    assert {"vgg11_bn", "mobilenet_v3_small", "efficientnet_b0", "convnext_tiny"} <= set(supported)
    resnets = [arch for arch, family in supported.items() if family == "resnet"]
    assert len(resnets) == 10
    for arch in resnets:
        assert (
            parse_recipe({**MINIMAL, "model": {"arch": arch, "num_classes": 2}}).family == "resnet"
        )


def test_latency_ms_needs_metric_latency() -> None:
    with pytest.raises(RecipeError) as info:
        parse_recipe({**MINIMAL, "target": {"metric": "flops", "latency_ms": 2.5}})
    assert _paths(info.value) == ["target.latency_ms"]
    r = parse_recipe({**MINIMAL, "target": {"metric": "latency", "latency_ms": 2.5}})
    assert r.target.latency_ms == 2.5 and r.target.ratio is None


def test_ratio_and_latency_ms_together_rejected() -> None:
    with pytest.raises(RecipeError) as info:
        parse_recipe({**MINIMAL, "target": {"metric": "latency", "ratio": 0.5, "latency_ms": 2.5}})
    assert _paths(info.value) == ["target.latency_ms"]


def test_every_error_is_reported_at_once() -> None:
    with pytest.raises(RecipeError) as info:
        parse_recipe({**MINIMAL, "train": {"steps": 0, "lr": -1}, "gates": {"round_tp": 1}})
    assert sorted(_paths(info.value)) == ["gates.round_tp", "train.lr", "train.steps"]


@pytest.mark.parametrize("src", ["[1, 2]", "42", "", "just a string", b"\xff\xfe\x00"])
def test_non_mapping_or_garbage_rejected(src: str | bytes) -> None:
    with pytest.raises(RecipeError) as info:
        parse_recipe(src)
    assert _paths(info.value) == ["(root)"]


def test_broken_yaml_rejected() -> None:
    with pytest.raises(RecipeError, match="not valid JSON or YAML"):
        parse_recipe("model: {arch: resnet18\n  - num_classes")


def test_yaml_aliases_rejected() -> None:
    # Aliases are how a few bytes of YAML expand to gigabytes ("billion laughs").
    bomb = "a: &a [x, x]\nb: &b [*a, *a]\nc: [*b, *b]\n"
    with pytest.raises(RecipeError, match="aliases"):
        parse_recipe(bomb)


def test_oversized_recipe_rejected() -> None:
    text = "# " + "x" * MAX_RECIPE_BYTES + "\nmodel: {arch: resnet18, num_classes: 10}\n"
    with pytest.raises(RecipeError, match="larger than"):
        parse_recipe(text)
    with pytest.raises(RecipeError, match="larger than"):
        parse_recipe(text.encode())


def test_recipe_error_is_a_hawada_error_and_value_error() -> None:
    with pytest.raises(RecipeError) as info:
        parse_recipe({})
    err = info.value
    assert isinstance(err, HawadaError) and isinstance(err, ValueError)
    assert err.code == "invalid_recipe"
    assert err.to_dict()["code"] == "invalid_recipe"
    assert err.to_dict()["errors"][0] == {"path": "model", "message": "field required"}
    assert [e["path"] for e in err.errors] == ["model", "data"]


def test_export_formats_deduplicated() -> None:
    r = parse_recipe({**MINIMAL, "export": {"formats": ["safetensors", "onnx", "onnx"]}})
    assert r.export.formats == ["safetensors", "onnx"]


def test_parse_accepts_a_recipe_instance() -> None:
    r = parse_recipe(MINIMAL)
    assert parse_recipe(r) is r and isinstance(r, Recipe)


def test_recipe_module_does_not_import_torch() -> None:
    code = (
        "import sys, hawada.core.recipe; hawada.core.recipe.builtin_recipes(); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("src", ["[" * 50_000, '{"a":' * 50_000, "a: " + "[" * 20_000])
def test_deeply_nested_text_is_a_recipe_error(src: str) -> None:
    with pytest.raises(RecipeError, match="nested too deeply"):
        parse_recipe(src)


@pytest.mark.parametrize("data", [None, {"batch_size": 32}])
def test_recipe_without_data_source_lists_the_sources(data: dict | None) -> None:
    # No silent default data set: a recipe must say what it trains on.
    recipe: dict = {"model": MINIMAL["model"]}
    if data is not None:
        recipe["data"] = data
    with pytest.raises(RecipeError) as info:
        parse_recipe(recipe)
    (err,) = info.value.errors
    assert err["path"] == ("data" if data is None else "data.source")
    for source in ("synthetic", "digits", "fashion-mnist", "folder", "npz", "webdataset", "upload"):
        assert source in err["message"]


def test_imagenet_recipe_runs_as_is_on_an_imagenet_layout(tmp_path: Path) -> None:
    """The ImageNet recipe names a folder layout; on a (tiny) folder of that layout it loads
    with streaming, augmentation and the held-out folder, unchanged but for the mount point."""
    from PIL import Image

    from hawada.core.data import load_data

    recipe = builtin_recipes()["imagenet-resnet50"]
    assert (recipe.model.arch, recipe.model.num_classes) == ("resnet50", 1000)
    assert recipe.model.input_size == (3, 224, 224) and recipe.model.stem == "imagenet"
    data = recipe.data
    assert data.source == "folder" and data.path == "/data/imagenet/train"
    assert data.heldout_path == "/data/imagenet/val" and data.augment == "auto"
    for split, n in (("train", 3), ("val", 1)):
        for wnid in ("n01440764", "n01443537"):
            folder = tmp_path / "imagenet" / split / wnid
            folder.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (500, 375), (40 * i, 90, 200)).save(folder / f"{wnid}_{i}.JPEG")
    mounted = recipe.model_copy(deep=True)
    mounted.data = data.model_copy(
        update={
            "path": str(tmp_path / "imagenet" / "train"),
            "heldout_path": str(tmp_path / "imagenet" / "val"),
            "memory_limit_mb": 1,  # what 1.28 M images do to the default 2 GiB
            "workers": 0,
            "batch_size": 2,
        }
    )
    bundle = load_data(mounted, allowed_roots=[tmp_path])
    assert (bundle.loader, bundle.augment, bundle.heldout_source) == (
        "stream",
        True,
        "heldout_path",
    )
    assert (bundle.n_train, bundle.n_heldout, bundle.num_classes) == (6, 2, 2)
    x, y = next(bundle.train_batches(2))
    assert tuple(x.shape) == (2, 3, 224, 224) and set(y.tolist()) <= {0, 1}
