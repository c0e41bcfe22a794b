"""Recipes: a TOML file <-> one typed dataclass tree (docs/design.md §6).

A recipe is the written form of `Recipe`. Every field has a default and a docstring (the string
literal right after it), which `field_help` returns as the field's `--help` text. Values come
from three places, the later winning:

    defaults (schema.py)  <  the recipe file  <  --set section.key=value (command line)

    recipe = load_recipe("recipes/tiny-gpt.toml", ["train.lr=3e-4", "model.moe.experts=4"])
    model = build_model(recipe.model)  # each component gets its own section only

Loading is strict: an unknown section or key (with a did-you-mean), a value of the wrong type,
a value outside its range or two settings that contradict each other is a `CpmError` whose
one-line message names the file (or `--set`) and the key. `dump_recipe` writes the fully
resolved tree back as TOML; loading that text gives an equal `Recipe`, and `recipe_digest`
hashes it, so a run records exactly what it trained with.

Paths in a recipe (dataset, output, init model, teacher) are used as written: a relative path
is relative to the working directory the command runs in, not to the recipe file.

The package: schema.py (the dataclasses), load.py (file + overrides -> Recipe), validate.py,
fields.py (help text), dump.py (Recipe -> TOML), origin.py (which file or --set said what).
"""

from cpmctl.models.config import ModelConfig, MoeConfig
from cpmctl.recipe.dump import dump_recipe, recipe_digest
from cpmctl.recipe.fields import field_help, recipe_fields
from cpmctl.recipe.load import SHIPPED, load_recipe, recipe_from_dict, resolve_recipe
from cpmctl.recipe.schema import (
    ENGINES,
    PRECISIONS,
    SCHEDULES,
    CheckpointConfig,
    DataConfig,
    EngineConfig,
    InheritConfig,
    InitConfig,
    Recipe,
    RunConfig,
    TrainConfig,
    span_corruption_lengths,
)

__all__ = [
    "ENGINES", "PRECISIONS", "SCHEDULES", "SHIPPED", "CheckpointConfig", "DataConfig",
    "EngineConfig", "InheritConfig", "InitConfig", "ModelConfig", "MoeConfig", "Recipe",
    "RunConfig", "TrainConfig", "dump_recipe", "field_help", "load_recipe", "recipe_digest",
    "recipe_fields", "recipe_from_dict", "resolve_recipe", "span_corruption_lengths",
]
