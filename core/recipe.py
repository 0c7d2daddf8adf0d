"""Recipe schema: what a compression job should do. No torch here: the API imports this.

Every block is a pydantic model with `extra="forbid"`, so a typo such as `gates.round_tp` is
rejected with its path instead of being silently ignored. Field meanings, defaults and bounds are
documented in docs/recipes.md; docs/contract.md lists the public names.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from functools import lru_cache
from importlib import resources
from typing import Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from hawada.core.architectures import arch_problem, catalogue
from hawada.core.errors import HawadaError

__all__ = [
    "DATA_SOURCES",
    "MAX_RECIPE_BYTES",
    "Recipe",
    "RecipeError",
    "builtin_recipes",
    "parse_recipe",
    "recipe_hash",
    "recipe_to_dict",
]

#: Recipes are small; anything bigger is a mistake or an attack on the parser.
MAX_RECIPE_BYTES = 256 * 1024

# `hawada.recipes` is a package holding the YAML files as package data, so editable and
# non-editable installs (the API image) find them alike.
RECIPES_PACKAGE = "hawada.recipes"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class RecipeError(HawadaError, ValueError):
    """An invalid recipe; `.errors` is `[{"path": "target.ratio", "message": "..."}]`."""

    code = "invalid_recipe"

    def __init__(self, errors: list[dict[str, str]]) -> None:
        self.errors = errors
        lines = "; ".join(f"{e['path']}: {e['message']}" for e in errors)
        super().__init__(f"invalid recipe: {lines}")

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "errors": self.errors}


class _Block(BaseModel):
    # forbid: unknown keys are typos; no inf/nan anywhere in a recipe.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, validate_assignment=True)


# --- model -----------------------------------------------------------------------------------


class Normalize(_Block):
    """Per-channel normalisation the weights expect, applied after scaling pixels to [0, 1]."""

    mean: tuple[float, float, float] = Field(default=IMAGENET_MEAN)
    std: tuple[float, float, float] = Field(default=IMAGENET_STD)

    @field_validator("mean")
    @classmethod
    def _mean_range(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if any(not -10.0 <= m <= 10.0 for m in v):
            raise ValueError("every mean must be in [-10, 10]")
        return v

    @field_validator("std")
    @classmethod
    def _std_range(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if any(not 1e-6 <= s <= 100.0 for s in v):
            raise ValueError("every std must be in [1e-6, 100]")
        return v


class ModelSpec(_Block):
    """The input model: a torchvision architecture and how it was trained to see images."""

    arch: str
    num_classes: int = Field(ge=1, le=100_000)
    stem: Literal["imagenet", "cifar"] = "imagenet"
    input_size: tuple[int, int, int] = (3, 32, 32)
    normalize: Normalize = Field(default_factory=Normalize)

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, v: str) -> str:
        problem = arch_problem(v)
        if problem is not None:
            raise ValueError(problem)
        return v

    @field_validator("input_size")
    @classmethod
    def _input_size(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        c, h, w = v
        if c != 3:
            raise ValueError(f"channels must be 3 (got {c}); grayscale data is expanded to 3")
        if not (8 <= h <= 1024 and 8 <= w <= 1024):
            raise ValueError(f"height and width must be in [8, 1024] (got {h}x{w})")
        return v


# --- data ------------------------------------------------------------------------------------

DataSource = Literal[
    "synthetic", "digits", "mnist-5k", "fashion-mnist", "folder", "npz", "webdataset", "upload"
]
#: Every `data.source`, in the order the docs list them (named in "field required" errors).
DATA_SOURCES: tuple[str, ...] = get_args(DataSource)
#: Sources whose `data.path` names a folder or file on the worker (and so needs a data root).
PATH_SOURCES = ("folder", "npz", "webdataset")


class DataSpec(_Block):
    """Where training/held-out images come from and how they are batched, split and augmented."""

    source: DataSource
    path: str | None = Field(default=None, max_length=4096, validate_default=True)
    #: A separate held-out set (folder, .npz or WebDataset shards like `path`); else a seeded
    #: split of the training source. A `heldout` upload does the same for remote users.
    heldout_path: str | None = Field(default=None, max_length=4096)
    batch_size: int = Field(default=64, ge=1, le=4096)
    val_fraction: float = Field(default=0.1, gt=0.0, le=0.9)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    limit: int | None = Field(default=None, ge=2, le=100_000_000)
    #: Training augmentation: `auto` is `standard` (random resized crop + horizontal flip) for
    #: inputs larger than 64 px and `none` otherwise. Held-out data is never augmented.
    augment: Literal["auto", "none", "standard"] = "auto"
    #: `memory`: decode everything once into one uint8 tensor (fast for small sets); `stream`:
    #: a DataLoader decodes only the images each batch needs; `auto` streams folders whose
    #: decoded size exceeds `memory_limit_mb` and WebDataset shards always.
    loader: Literal["auto", "memory", "stream"] = "auto"
    memory_limit_mb: int = Field(default=2048, ge=1, le=1_000_000)
    #: DataLoader worker processes when streaming (0 decodes in the training process).
    workers: int = Field(default=4, ge=0, le=64)
    #: A file that cannot be decoded: `fail` the job (code `bad_dataset`) or `skip` it and
    #: count it in the report.
    on_corrupt: Literal["fail", "skip"] = "fail"

    @field_validator("path")
    @classmethod
    def _folder_needs_path(cls, v: str | None, info: ValidationInfo) -> str | None:
        # npz may come from the job's uploaded dataset instead of a path; folder cannot.
        source = info.data.get("source")
        if source in ("folder", "webdataset") and not v:
            raise ValueError(f"required when data.source is {source!r}")
        return v


# --- target ----------------------------------------------------------------------------------


class Target(_Block):
    """The budget: a fraction of the baseline cost, or an absolute latency in milliseconds."""

    metric: Literal["flops", "params", "latency"] = "flops"
    ratio: float | None = Field(default=None, gt=0.0, le=1.0)
    latency_ms: float | None = Field(default=None, gt=0.0, le=1e6)

    @field_validator("latency_ms")
    @classmethod
    def _latency_ms_only_for_latency(cls, v: float | None, info: ValidationInfo) -> float | None:
        # Field order makes `metric` and `ratio` available here, so the error carries this path.
        if v is None:
            return v
        if info.data.get("metric", "flops") != "latency":
            raise ValueError("latency_ms needs metric: latency")
        if info.data.get("ratio") is not None:
            raise ValueError("give exactly one of ratio or latency_ms")
        return v

    @model_validator(mode="after")
    def _default_ratio(self) -> Target:
        if self.ratio is None and self.latency_ms is None:
            # A bare `metric:` means "half the baseline"; bypass validate_assignment recursion.
            object.__setattr__(self, "ratio", 0.5)
        return self


# --- gates / train / finetune ----------------------------------------------------------------


class Temperature(_Block):
    """Gate sigmoid temperature, annealed from `start` to `end` over training."""

    start: float = Field(default=1.0, gt=0.0, le=100.0)
    end: float = Field(default=0.05, gt=0.0, le=100.0)

    @field_validator("end")
    @classmethod
    def _end_le_start(cls, v: float, info: ValidationInfo) -> float:
        start = info.data.get("start")
        if start is not None and v > start:
            raise ValueError(f"end ({v}) must be <= start ({start})")
        return v


class GatesSpec(_Block):
    """How channels are gated: width granularity, floor, residual streams, temperature."""

    round_to: int = Field(default=8, ge=1, le=4096)
    min_channels: int = Field(default=8, ge=1, le=65536)
    prune_residual: bool = True
    temperature: Temperature = Field(default_factory=Temperature)


class KD(_Block):
    """Distillation from the unpruned model: loss = alpha * KD + (1 - alpha) * CE.

    CE needs labels: on unlabelled data (synthetic) the loss is pure KD whatever alpha says.
    The default mixes both so a teacher's mistakes are not copied blindly.
    """

    temperature: float = Field(default=4.0, gt=0.0, le=100.0)
    alpha: float = Field(default=0.5, ge=0.0, le=1.0)


class TrainSpec(_Block):
    """Gate training on the frozen model."""

    steps: int = Field(default=300, ge=1, le=1_000_000)
    lr: float = Field(default=0.05, gt=0.0, le=10.0)
    kd: KD = Field(default_factory=KD)
    log_every: int = Field(default=10, ge=1, le=1_000_000)


class FinetuneSpec(_Block):
    """Optional fine-tune of the exported model (KD from the same teacher)."""

    epochs: float = Field(default=1.0, ge=0.0, le=1000.0)
    lr: float = Field(default=0.01, gt=0.0, le=10.0)
    recalibrate_bn: bool = True


# --- latency / export ------------------------------------------------------------------------


class LatencySpec(_Block):
    """How latency is measured (and how the latency lookup table is built)."""

    batch_size: int = Field(default=64, ge=1, le=4096)
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    repeats: int = Field(default=50, ge=1, le=100_000)
    warmup: int = Field(default=10, ge=0, le=100_000)
    channels_last: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"


ExportFormat = Literal["safetensors", "onnx", "pt2"]


def _safetensors_only() -> list[ExportFormat]:
    return ["safetensors"]


class ExportSpec(_Block):
    """Which files the pruned model is written as; safetensors is always among them."""

    formats: list[ExportFormat] = Field(default_factory=_safetensors_only, max_length=8)

    @field_validator("formats")
    @classmethod
    def _has_safetensors(cls, v: list[str]) -> list[str]:
        if "safetensors" not in v:
            raise ValueError("formats must include 'safetensors'")
        return list(dict.fromkeys(v))  # drop duplicates, keep order


# --- the recipe ------------------------------------------------------------------------------


#: `gates` (trained gates, the default) or a baseline through the same pipeline
#: (core/baselines.py): `l1` filter magnitude, `slimming` BN-scale sparsity, `uniform` width.
Method = Literal["gates", "l1", "slimming", "uniform"]


class Recipe(_Block):
    """A whole compression job description (docs/contract.md, "Recipe")."""

    method: Method = "gates"
    model: ModelSpec
    data: DataSpec  # required: no silent default data set
    target: Target = Field(default_factory=Target)
    gates: GatesSpec = Field(default_factory=GatesSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    finetune: FinetuneSpec = Field(default_factory=FinetuneSpec)
    latency: LatencySpec = Field(default_factory=LatencySpec)
    export: ExportSpec = Field(default_factory=ExportSpec)

    @property
    def family(self) -> str:
        """The adapter family of `model.arch` (e.g. "resnet")."""
        return catalogue()[self.model.arch].family


# --- parsing ---------------------------------------------------------------------------------


class _NoAliasLoader(yaml.SafeLoader):
    """safe_load without anchors/aliases: aliases let 1 KiB of YAML expand to gigabytes."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]  # PyYAML is unannotated
            raise yaml.composer.ComposerError(
                None, None, "YAML aliases are not allowed in recipes", event.start_mark
            )
        return super().compose_node(parent, index)


def _loc_to_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path or "(root)"


def _clean_message(msg: str) -> str:
    # pydantic prefixes errors raised in validators; the path already says where.
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            return msg[len(prefix) :]
    return msg


def _missing_message(loc: tuple[int | str, ...]) -> str:
    if loc in (("data",), ("data", "source")):
        # No silent default data set: say what the choices are.
        return "field required: set data.source to one of " + ", ".join(DATA_SOURCES)
    return "field required"


def _from_validation_error(exc: ValidationError) -> RecipeError:
    errors = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        if err["type"] == "extra_forbidden":
            message = "unknown field"
        elif err["type"] == "missing":
            message = _missing_message(loc)
        else:
            message = _clean_message(err["msg"])
        errors.append({"path": _loc_to_path(loc), "message": message})
    return RecipeError(errors)


def _load_text(text: str) -> Any:
    # len() first: a huge string is refused without encoding a copy of it.
    if (
        len(text) > MAX_RECIPE_BYTES
        or len(text.encode("utf-8", errors="replace")) > MAX_RECIPE_BYTES
    ):
        raise RecipeError(
            [{"path": "(root)", "message": f"recipe larger than {MAX_RECIPE_BYTES} bytes"}]
        )
    try:
        return json.loads(text)
    except ValueError:
        pass  # not JSON: YAML is the other accepted syntax
    except RecursionError:
        raise _too_deep() from None
    try:
        return yaml.load(text, Loader=_NoAliasLoader)
    except yaml.YAMLError as exc:
        detail = " ".join(str(exc).split())  # one line: messages end up in JSON errors
        raise RecipeError(
            [{"path": "(root)", "message": f"not valid JSON or YAML: {detail}"}]
        ) from None
    except RecursionError:
        raise _too_deep() from None
    except ValueError as exc:  # e.g. an integer past Python's 4300-digit conversion limit
        raise RecipeError([{"path": "(root)", "message": f"unreadable value: {exc}"}]) from None


def _too_deep() -> RecipeError:
    return RecipeError([{"path": "(root)", "message": "recipe nested too deeply"}])


def parse_recipe(src: str | bytes | Mapping[str, Any] | Recipe) -> Recipe:
    """Validate a recipe given as JSON text, YAML text, UTF-8 bytes or a mapping.

    Raises RecipeError listing every offending field path.
    """
    if isinstance(src, Recipe):
        return src
    if isinstance(src, (bytes, bytearray)):
        if len(src) > MAX_RECIPE_BYTES:
            raise RecipeError(
                [{"path": "(root)", "message": f"recipe larger than {MAX_RECIPE_BYTES} bytes"}]
            )
        try:
            src = bytes(src).decode("utf-8")
        except UnicodeDecodeError:
            raise RecipeError([{"path": "(root)", "message": "recipe is not UTF-8 text"}]) from None
    data = _load_text(src) if isinstance(src, str) else src
    if not isinstance(data, Mapping):
        kind = type(data).__name__ if data is not None else "nothing"
        raise RecipeError(
            [{"path": "(root)", "message": f"a recipe must be a mapping, got {kind}"}]
        )
    try:
        return Recipe.model_validate(dict(data))
    except ValidationError as exc:
        raise _from_validation_error(exc) from None
    except RecursionError:  # a deeply nested mapping passed in directly
        raise _too_deep() from None


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """The full recipe (defaults filled in) as plain JSON-compatible data."""
    return recipe.model_dump(mode="json")


def recipe_hash(recipe: Recipe) -> str:
    """sha256 hex of the canonical JSON of the full recipe: equal recipes hash equally."""
    canonical = json.dumps(recipe_to_dict(recipe), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


@lru_cache(maxsize=1)
def _builtin_recipes_cached() -> dict[str, Recipe]:
    out: dict[str, Recipe] = {}
    files = sorted(
        (f for f in resources.files(RECIPES_PACKAGE).iterdir() if f.name.endswith(".yaml")),
        key=lambda f: f.name,
    )
    for file in files:
        try:
            out[file.name.removesuffix(".yaml")] = parse_recipe(file.read_text(encoding="utf-8"))
        except RecipeError as exc:
            # A broken built-in recipe is our bug; say which file.
            raise RecipeError(
                [{"path": f"{file.name}:{e['path']}", "message": e["message"]} for e in exc.errors]
            ) from None
    return out


def builtin_recipes() -> dict[str, Recipe]:
    """Built-in recipes from `recipes/*.yaml`, keyed by file stem (e.g. "resnet")."""
    # Copies: recipes are mutable and the parsed files are cached.
    return {name: r.model_copy(deep=True) for name, r in _builtin_recipes_cached().items()}
