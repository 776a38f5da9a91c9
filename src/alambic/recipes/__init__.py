"""Distillation methods by name, imported lazily.

A recipe module defines a loss-options dataclass (with ``validate()``) and a recipe class built as
``Recipe(teacher, student, loss_options)`` that gives the engine ``objective``, ``student``, ``row_counts(batch)``
and ``teacher_targets(batch)`` (see ``alambic.engine.loop.Recipe``), plus ``masks_inputs``: whether encoder inputs
are masked (masked-LM losses) or fed as they are.
"""

from __future__ import annotations

import importlib

from alambic.errors import AlambicError, did_you_mean

RECIPES = {
    "distilbert": ("alambic.recipes.distilbert", "DistilBERTLossConfig", "DistilBERTRecipe"),
    "tinybert": ("alambic.recipes.tinybert", "TinyBERTLossConfig", "TinyBERTRecipe"),
    "minilm": ("alambic.recipes.minilm", "MiniLMLossConfig", "MiniLMRecipe"),
}


def recipe_parts(name: str):
    """``(LossConfigClass, RecipeClass)`` of the recipe called ``name``."""
    if name not in RECIPES:
        raise AlambicError(f"unknown recipe {name!r}{did_you_mean(name, RECIPES)}; known: {', '.join(RECIPES)}")
    module_name, config_name, recipe_name = RECIPES[name]
    module = importlib.import_module(module_name)
    return getattr(module, config_name), getattr(module, recipe_name)
