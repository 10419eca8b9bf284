"""The prompt enhancer: a VLM rewrites a terse edit instruction into the dense prompt ChronoEdit was trained on.

ChronoEdit's training captions are 80-100 word paragraphs that start "The user wants to ...", say what changes and what
must stay, and add motion and camera cues; the model follows such prompts far better than terse ones. This module
holds our system prompt, the user message and the cleanup of the answer; the VLM comes from :mod:`chronoedit.vlm`.
"""

from __future__ import annotations

import re

from PIL import Image

from .errors import UserError
from .vlm import VLM, strip_thinking

PREFIX = "The user wants to"

SYSTEM_PROMPT = (
    "You turn short image-editing requests into the detailed prompts an image-editing video model was trained on. "
    "You are shown the input image and the user's request.\n"
    'Write one paragraph of 80 to 100 words in English that begins exactly with "The user wants to". '
    "First state precisely what should change: which object or region, and its new appearance (colour, material, "
    "shape, size, position, lighting) as it fits this image. Then state what must stay exactly as it is: the identity, "
    "face, pose and expression of any person or animal, the art style, the composition and layout, the background and "
    "the camera framing. Add brief motion and camera cues, as if the change unfolds in a short clip shot with a steady "
    "camera (for example: the new object appears naturally while the camera remains still).\n"
    "Describe only the requested change and do not invent others. Answer with the paragraph alone: no title, no "
    "quotes, no lists, no markdown, no explanation."
)


class PromptError(UserError):
    """A VLM answer that cannot be turned into a usable prompt (the user's VLM answered badly, not a bug)."""


def user_message(instruction: str) -> str:
    """The user turn that goes with the image: the instruction and a reminder of the expected form."""
    instruction = " ".join(instruction.split())
    if not instruction:
        raise UserError("the edit instruction to enhance is empty", "prompt")
    return (
        f"Edit request: {instruction}\n\n"
        f'Rewrite this request for the image above as one paragraph of 80 to 100 words that starts with "{PREFIX}".'
    )


def clean_dense_prompt(answer: str) -> str:
    """The "The user wants to ..." paragraph inside a VLM answer, as one line; PromptError if there is none.

    Thinking blocks, markdown (fences, emphasis, headings, bullets), labels such as "Enhanced prompt:", surrounding
    quotes and trailing notes in later paragraphs are removed; a lower-case "the user wants to" is capitalised. The
    prompt is the first match of, in this order: (a) a paragraph or line that starts with "The user wants to" (capital
    T; quotes and a label before it allowed, but not "Note:"); (b) "The user wants to" anywhere, as in "Sure! Here is
    the enhanced prompt: The user wants to ..."; only then a lower-case mention, which is how a preamble ("Okay, so
    the user wants to ...") or a note ("Note: the user wants to keep ...") speaks of the user: (c) at the start of a
    paragraph or line, (d) anywhere. It runs from the match to the end of its paragraph.
    """
    text = strip_thinking(answer).replace("```", "\n\n")
    text = re.sub(r"(\*\*|__|`)", "", text)
    text = re.sub(r"(?m)^[ \t]*(#+|>|[-*•]|\d+[.)])[ \t]+", "", text)  # markers go, the blank lines between stay
    paragraphs = re.split(r"\n\s*\n", text)
    introducing = None  # a prompt ending in ':' ("... Here is the prompt:", or a list of what stays follows)
    for pattern in _PROMPT_STARTS:
        for i, paragraph in enumerate(paragraphs):
            match = pattern.search(paragraph)
            body = " ".join(paragraph[match.end(1) :].split()).rstrip("\"'“”‘’ ") if match else ""
            if body.endswith(":"):
                items = [line.strip() for rest in paragraphs[i + 1 :] for line in rest.splitlines() if line.strip()]
                introducing = introducing or f"{body} {'; '.join(items)}"  # the list's items, one after another
            elif body:
                return _with_prefix(body)
    if introducing is not None:  # nothing else: the prompt went on as a list
        return _with_prefix(" ".join(introducing.split()).rstrip("\"'“”‘’ "))
    shown = " ".join(text.split())[:120]
    raise PromptError(f"the VLM's answer does not contain a prompt starting with '{PREFIX}': {shown!r}")


def _with_prefix(body: str) -> str:
    return f"{PREFIX} {body}" if body[0].isalnum() else f"{PREFIX}{body}"


# the prefix at the start of a line, after quotes and an optional short label such as "Enhanced prompt:" (a note,
# an analysis or the restated request is no label: "Note: The user wants to keep ..." comments on the prompt)
_NOT_LABELS = (r"notes?|explanations?|reasoning|analysis|request|draft|thinking|thoughts|understanding[a-z ]*"
               r"|original[a-z ]*")
_LINE_START = rf"^[\s\"'“”‘’]*(?:(?!(?i:{_NOT_LABELS}) *:)[A-Za-z][A-Za-z ]{{0,30}}:[\s\"'“”‘’]*)?"
# where the prompt starts, best first: (a) and (b) as written, "The user wants to"; (c) and (d) in any case
_PROMPT_STARTS = (
    re.compile(_LINE_START + f"({re.escape(PREFIX)})", re.MULTILINE),
    re.compile(f"({re.escape(PREFIX)})"),
    re.compile(_LINE_START + f"({re.escape(PREFIX)})", re.MULTILINE | re.IGNORECASE),
    re.compile(f"({re.escape(PREFIX)})", re.IGNORECASE),
)


def enhance_prompt(vlm: VLM, image: Image.Image, instruction: str) -> str:
    """Rewrite ``instruction`` for ``image`` into ChronoEdit's dense "The user wants to ..." form."""
    return clean_dense_prompt(vlm.chat(SYSTEM_PROMPT, user_message(instruction), [image]))
