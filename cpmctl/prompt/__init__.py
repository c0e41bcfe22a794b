"""Soft prompts and prompt tuning, as CPM-2 did it (docs/design.md §8).

    soft.py      the prompt table, its layout over the input parts, init, place/embed
    artifact.py  the prompt artifact (prompt.safetensors + prompt.json), load_prompt
    peft.py      Hugging Face PEFT's prompt-tuning format, both ways
    tune.py      `cpmctl tune-prompt`: stage 1 (prompt only) and stage 2 (the whole model)
"""

from .artifact import LoadedPrompt, load_prompt
from .soft import PLACEHOLDER_ID, PromptLayout, SoftPrompt, parse_position

__all__ = ["PLACEHOLDER_ID", "LoadedPrompt", "PromptLayout", "SoftPrompt", "load_prompt",
           "parse_position"]
