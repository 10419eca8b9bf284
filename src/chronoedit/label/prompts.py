"""The two labelling stages: an instruction from a before/after pair, then ChronoEdit's dense rewrite of it.

Stage 1 asks for one English instruction covering the most prominent change(s), at most three joined by semicolons,
or "no change". Stage 2 rewrites that instruction, with both images in view, into the 80-100 word "The user wants to
..." paragraph ChronoEdit was trained on (the same form as the prompt enhancer's output). Prompts are our own words.
"""

from __future__ import annotations

import re

from PIL import Image

from ..enhance import PREFIX, PromptError, clean_dense_prompt
from ..vlm import VLM, strip_thinking

MAX_CHANGES = 3
MAX_INSTRUCTION_WORDS = 200

INSTRUCTION_SYSTEM_PROMPT = (
    "You compare two images. The first is an original picture; the second is the same picture after an edit. "
    "Write the editing instruction that turns the first image into the second: one English sentence in the imperative "
    "(for example: replace the red car with a blue bicycle). Cover the most prominent change; if there are several, "
    "give at most three, joined by semicolons. Be concrete about objects, colours, materials, positions and actions, "
    "and do not describe what stayed the same. Use at most 200 words. If the two images show no meaningful "
    "difference, answer exactly: no change. Answer with the instruction alone, without quotes or explanation."
)
INSTRUCTION_USER_MESSAGE = "Image 1 is the original and image 2 is the edited result. What is the editing instruction?"

DENSE_SYSTEM_PROMPT = (
    "You write the detailed prompt for an image edit, for an image-editing video model trained on such prompts. "
    "You are shown the original image, the edited result and a short editing instruction.\n"
    'Write one paragraph of 80 to 100 words in English that begins exactly with "The user wants to". Phrase it as a '
    "request made on the original image. State precisely what changes, using the edited result to describe the new "
    "appearance faithfully (colour, material, shape, size, position, lighting). Then state what must stay exactly as "
    "it is: the identity, face, pose and expression of any person or animal, the art style, the composition and "
    "layout, the background and the camera framing. Add brief motion and camera cues, as if the change unfolds in a "
    "short clip shot with a steady camera.\n"
    "Describe only the changes in the instruction. Answer with the paragraph alone: no title, no quotes, no lists, no "
    "markdown, no explanation."
)

_NO_CHANGE = re.compile(r"^(no (visible |meaningful |significant )?(change|changes|difference|differences|edit)"
                        r"|none|nothing changed|the images are identical|identical)\b")  # fmt: skip
_LABEL = re.compile(r"^(edit(ing)? )?instructions?\s*:\s*", re.IGNORECASE)
_BULLET = re.compile(r"^\s*(#+|>|[-*•]|\d+[.)])\s+")


def dense_user_message(instruction: str) -> str:
    """Stage 2's user turn."""
    return (
        f"Editing instruction: {instruction}\n\nImage 1 is the original and image 2 the edited result. Rewrite the "
        f'instruction as one paragraph of 80 to 100 words that starts with "{PREFIX}".'
    )


def clean_instruction(answer: str) -> str | None:
    """Stage 1's answer as one line, at most three changes; None for "no change"; PromptError when empty."""
    text = re.sub(r"(\*\*|__|`)", "", strip_thinking(answer))
    lines = [_LABEL.sub("", _BULLET.sub("", line)).strip().rstrip(";") for line in text.splitlines()]
    text = "; ".join(line for line in lines if line)  # a list of changes becomes one line joined by semicolons
    text = " ".join(text.split()).strip("\"'“”‘’ ")
    if not text:
        raise PromptError("the VLM's instruction is empty")
    if _NO_CHANGE.match(text.lower().strip(" .!")):
        return None
    changes = [part.strip() for part in text.split(";") if part.strip()]
    text = "; ".join(changes[:MAX_CHANGES])
    words = text.split()
    return " ".join(words[:MAX_INSTRUCTION_WORDS])


def describe_change(vlm: VLM, source: Image.Image, target: Image.Image) -> str | None:
    """Stage 1: the editing instruction from source to target, or None when nothing changed."""
    return clean_instruction(vlm.chat(INSTRUCTION_SYSTEM_PROMPT, INSTRUCTION_USER_MESSAGE, [source, target]))


def dense_prompt(vlm: VLM, source: Image.Image, target: Image.Image, instruction: str) -> str:
    """Stage 2: the "The user wants to ..." paragraph for ``instruction``."""
    return clean_dense_prompt(vlm.chat(DENSE_SYSTEM_PROMPT, dense_user_message(instruction), [source, target]))
