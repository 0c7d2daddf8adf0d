"""/v1/recipes and /v1/architectures: what the service offers."""

from __future__ import annotations

from fastapi import APIRouter

from hawada.api.schemas import (
    ArchitectureList,
    ArchitecturePublic,
    CouplingGroupPublic,
    RecipeList,
    RecipePublic,
    UnsupportedArchitecturePublic,
)
from hawada.core.architectures import catalogue
from hawada.core.recipe import builtin_recipes, recipe_to_dict

router = APIRouter(prefix="/v1", tags=["catalog"])


@router.get("/recipes", response_model=RecipeList)
def list_recipes() -> RecipeList:
    """Built-in recipes (full, defaults filled in), by name."""
    return RecipeList(
        items=[
            RecipePublic(name=n, recipe=recipe_to_dict(r))
            for n, r in sorted(builtin_recipes().items())
        ]
    )


@router.get("/architectures", response_model=ArchitectureList)
def list_architectures() -> ArchitectureList:
    """Architectures a recipe's `model.arch` may name, with their adapter family and coupling
    groups; `unsupported` lists the other torchvision classification models with the reason."""
    entries = sorted(catalogue().values(), key=lambda a: a.name)
    return ArchitectureList(
        items=[
            ArchitecturePublic(
                name=a.name,
                family=a.family,
                groups=[CouplingGroupPublic(**g) for g in a.details.get("groups", [])],
            )
            for a in entries
            if a.supported
        ],
        unsupported=[
            UnsupportedArchitecturePublic(name=a.name, family=a.family, reason=a.reason or "")
            for a in entries
            if not a.supported
        ],
    )
