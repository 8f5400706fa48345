"""A small generated multilingual world with a tokenizer and tiny models, for CPU-only runs."""

from components.synthetic.build import GENERATOR_VERSION, WorldSummary, build_world
from components.synthetic.grammar import LANGUAGES

__all__ = ["GENERATOR_VERSION", "LANGUAGES", "WorldSummary", "build_world"]
