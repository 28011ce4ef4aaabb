"""kdata: build curated knowledge-distillation datasets from teacher LLMs.

>>> import kdata
>>> recipe = kdata.load_recipe("recipes/quickstart.yaml")
>>> run = kdata.build(recipe)
>>> run.rows()[0]["response"]
"""

__version__ = "0.1.0"

from kdata.errors import BudgetExceeded, KdataError, RecipeError, TeacherError
from kdata.planning import Plan, plan
from kdata.publish import push
from kdata.recipe import GenerationParams, Recipe, Teacher, load_recipe, recipe_from_yaml
from kdata.runner import Run, build
from kdata.steps.base import TeacherMix
from kdata.steps.elicit import LabelStep
from kdata.steps.sources import SeedsStep

__all__ = [
    "BudgetExceeded",
    "GenerationParams",
    "KdataError",
    "LabelStep",
    "Plan",
    "Recipe",
    "RecipeError",
    "Run",
    "SeedsStep",
    "Teacher",
    "TeacherError",
    "TeacherMix",
    "build",
    "load_recipe",
    "plan",
    "push",
    "recipe_from_yaml",
]
