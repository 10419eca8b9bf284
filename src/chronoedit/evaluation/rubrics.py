"""The judge's rubrics: what to ask a VLM about one edit, and how to read its reply, per benchmark format.

- **ImgEdit** (:class:`ImgEditRubric`): the benchmark's own per-edit-type prompts (a JSON object ``{edit_type: text}``
  with ``<edit_prompt>`` where the instruction goes), both images; the reply has three ``Axis: n`` lines (1-5), whose
  names the prompt's "Example Response Format" gives. Item score: the mean of the three.
- **GEdit-Bench** (:class:`GEditRubric`): VIEScore's semantic-consistency prompt (both images, ``<instruction>``) and
  perceptual-quality prompt (the edited image), read from its ``vie_prompts.py`` (string constants only, never run)
  or a JSON file; replies ``{"score": [a, b], "reasoning": ...}`` with 0-10 scores. SC = min of its two, PQ = min of
  its two, item score O = sqrt(SC * PQ).
- **Generic** (:class:`PBenchRubric`): our rubric on PBench-Edit's three axes, a JSON object with integers 1-5.

A reply that cannot be read, is out of range or is a refusal raises :class:`ReplyError` (the judge retries it, then
records it as a failure).
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import files
from ..errors import UserError
from .items import GEDIT, GENERIC, IMGEDIT, EvalItem

_REFUSAL = re.compile(r"\b(I'?m sorry|I am sorry|I can(?:no|')t (?:help|assist|evaluate|comply|do)|I'?m (?:not able|"
                      r"unable) to|as an AI)\b", re.IGNORECASE)  # fmt: skip
_SCORE_LINE = re.compile(r"^[\s*#>-]*([A-Za-z][^:\n]{0,80}?)[\s*]*:[\s*]*(-?\d+(?:\.\d+)?)[\s*]*(?:/\s*\d+)?\s*\.?\s*$",
                         re.MULTILINE)  # fmt: skip
_FORMAT_LINE = re.compile(r"^\s*([A-Za-z][^:\n]{1,80}?)\s*:\s*A number from (\d+) to (\d+)", re.MULTILINE)


class ReplyError(Exception):
    """A judge reply that cannot be used: ``kind`` is ``malformed``, ``out_of_range`` or ``refused``."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Question:
    """One chat turn to the judge: ``key`` names it within the item (``main``, ``sc``, ``pq``); ``images`` are
    ``input`` / ``output`` in the order the judge sees them."""

    key: str
    system: str
    text: str
    images: tuple[str, ...]
    kind: str = ""  # the rubric's own note (ImgEdit: the edit type)


@dataclass(frozen=True)
class Parsed:
    """One reply read: its scores (by axis name, or ``score_0``, ``score_1`` for score lists) and its reasoning."""

    scores: dict[str, float]
    reasoning: str = ""


@dataclass(frozen=True)
class ItemScore:
    """One item's judged scores: every axis, the item's score and the judge's reasoning."""

    axes: dict[str, float]
    score: float
    reasoning: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class Rubric:
    """Base of the rubrics: a name, the text that defines it (hashed into every cache key) and its questions."""

    name = "rubric"
    format = GENERIC
    axes: tuple[str, ...] = ()

    def __init__(self, text: str) -> None:
        self.text = text

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()[:16]

    def check(self, items: Sequence[EvalItem]) -> None:
        """UserError when an item cannot be asked (e.g. an edit type without a prompt)."""

    def questions(self, item: EvalItem) -> list[Question]:
        raise NotImplementedError

    def parse(self, question: Question, reply: str) -> Parsed:
        raise NotImplementedError

    def combine(self, parsed: dict[str, Parsed]) -> ItemScore:
        raise NotImplementedError


def _refused(reply: str) -> None:
    if _REFUSAL.search(reply):
        raise ReplyError("refused", f"the judge refused: {_short(reply)}")


def _short(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text[:limit] + ("…" if len(text) > limit else "")


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _integer_in(value: float, low: int, high: int, what: str) -> float:
    if not float(value).is_integer() or not low <= value <= high:
        raise ReplyError("out_of_range", f"{what} is {value:g}, not an integer from {low} to {high}")
    return float(value)


def json_object(reply: str) -> dict[str, Any]:
    """The JSON object in a reply (from its first ``{`` to its last ``}``: code fences and prose around it are
    ignored); ReplyError when there is none."""
    start, end = reply.find("{"), reply.rfind("}")
    if start < 0 or end <= start:
        raise ReplyError("malformed", f"no JSON object in the reply: {_short(reply)}")
    try:
        data = json.loads(reply[start : end + 1])
    except json.JSONDecodeError as exc:
        raise ReplyError("malformed", f"the reply's JSON does not parse ({exc.msg}): {_short(reply)}") from None
    if not isinstance(data, dict):
        raise ReplyError("malformed", f"the reply's JSON is not an object: {_short(reply)}")
    return data


# ---------------------------------------------------------------------------------------------------------- ImgEdit
class ImgEditRubric(Rubric):
    """ImgEdit-Basic's per-edit-type prompts; see the module docstring."""

    name = "imgedit"
    format = IMGEDIT

    def __init__(self, prompts: dict[str, str], source: str = "") -> None:
        super().__init__(json.dumps(prompts, sort_keys=True))
        self.prompts = prompts
        self.source = source
        self.formats = {kind: _response_format(text, f"{source}: prompt {kind!r}") for kind, text in prompts.items()}

    @classmethod
    def load(cls, path: Path) -> ImgEditRubric:
        data = _json_file(path)
        if not isinstance(data, dict) or not data or not all(isinstance(v, str) for v in data.values()):
            raise UserError(f"{{judge_prompts}} {path}: ImgEdit's prompts are a JSON object {{edit_type: prompt}}",
                            "judge_prompts")  # fmt: skip
        for kind, text in data.items():
            if "<edit_prompt>" not in text:
                raise UserError(f"{{judge_prompts}} {path}: the prompt of {kind!r} has no <edit_prompt> placeholder",
                                "judge_prompts")  # fmt: skip
        return cls(data, str(path))

    @property
    def axes(self) -> tuple[str, ...]:  # type: ignore[override]
        names: dict[str, None] = {}
        for axis_names, _, _ in self.formats.values():
            names.update(dict.fromkeys(axis_names))
        return tuple(names)

    def check(self, items: Sequence[EvalItem]) -> None:
        missing = sorted({item.category for item in items} - set(self.prompts))
        if missing:
            raise UserError(f"{{judge_prompts}} {self.source} has no prompt for edit type "
                            f"{', '.join(map(repr, missing))}", "judge_prompts")  # fmt: skip

    def questions(self, item: EvalItem) -> list[Question]:
        text = self.prompts[item.category].replace("<edit_prompt>", item.instruction)
        return [Question("main", "", text, ("input", "output"), item.category)]

    def parse(self, question: Question, reply: str) -> Parsed:
        names, low, high = self.formats[question.kind]
        found = [(m[1].strip(), float(m[2])) for m in _SCORE_LINE.finditer(reply)
                 if _norm(m[1]) not in ("briefreasoning", "reasoning")]  # fmt: skip
        by_name = {_norm(name): value for name, value in found}
        if all(_norm(name) in by_name for name in names):
            values = [by_name[_norm(name)] for name in names]
        elif len(found) == len(names):
            values = [value for _, value in found]  # the axes in order, under other names
        else:
            _refused(reply)
            expected = ", ".join(f"'{name}: n'" for name in names)
            raise ReplyError("malformed", f"expected the lines {expected}: {_short(reply)}")
        scores = {name: _integer_in(value, low, high, name) for name, value in zip(names, values, strict=True)}
        match = re.search(r"reasoning\s*:\s*(.+)", reply, re.IGNORECASE)
        return Parsed(scores, match[1].strip() if match else "")

    def combine(self, parsed: dict[str, Parsed]) -> ItemScore:
        main = parsed["main"]
        return ItemScore(dict(main.scores), sum(main.scores.values()) / len(main.scores), main.reasoning)


def _response_format(text: str, where: str) -> tuple[tuple[str, ...], int, int]:
    """The axis names and scale an ImgEdit prompt asks for (its "Name: A number from 1 to 5." lines)."""
    lines = [(m[1].strip(), int(m[2]), int(m[3])) for m in _FORMAT_LINE.finditer(text)]
    if not lines:
        raise UserError(f"{{judge_prompts}} {where} names no score lines ('Axis: A number from 1 to 5.')",
                        "judge_prompts")  # fmt: skip
    return tuple(name for name, _, _ in lines), lines[0][1], lines[0][2]


# ------------------------------------------------------------------------------------------------------------ GEdit
GEDIT_NAMES = ("_context_no_delimit", "_prompts_0shot_two_image_edit_rule", "_prompts_0shot_tie_rule_SC",
               "_prompts_0shot_rule_PQ")  # fmt: skip


class GEditRubric(Rubric):
    """GEdit-Bench's VIEScore prompts; see the module docstring."""

    name = "gedit-viescore"
    format = GEDIT
    axes = ("SC", "PQ", "O")
    scale = (0, 10)

    def __init__(self, sc_prompt: str, pq_prompt: str) -> None:
        super().__init__(sc_prompt + "\n\x00\n" + pq_prompt)
        if "<instruction>" not in sc_prompt:
            raise UserError("{judge_prompts}: GEdit's semantic-consistency prompt has no <instruction> placeholder",
                            "judge_prompts")  # fmt: skip
        self.sc_prompt, self.pq_prompt = sc_prompt, pq_prompt

    @classmethod
    def load(cls, path: Path) -> GEditRubric:
        """From VIEScore's ``vie_prompts.py`` (its string constants, read with ``ast``) or a JSON file with ``SC`` and
        ``PQ`` (whole prompts) or the four constants' names."""
        if path.suffix.lower() == ".py":
            values = _python_strings(path)
        else:
            values = _json_file(path)
            if not isinstance(values, dict):
                raise UserError(f"{{judge_prompts}} {path}: expected a JSON object", "judge_prompts")
            if isinstance(values.get("SC"), str) and isinstance(values.get("PQ"), str):
                return cls(values["SC"], values["PQ"])
        missing = [name for name in GEDIT_NAMES if not isinstance(values.get(name), str)]
        if missing:
            raise UserError(f"{{judge_prompts}} {path} lacks {', '.join(missing)} (VIEScore's vie_prompts.py)",
                            "judge_prompts")  # fmt: skip
        context, edit_rule, sc_rule, pq_rule = (values[name] for name in GEDIT_NAMES)
        return cls("\n".join([context, edit_rule, sc_rule]), "\n".join([context, pq_rule]))

    def questions(self, item: EvalItem) -> list[Question]:
        return [Question("sc", "", self.sc_prompt.replace("<instruction>", item.instruction), ("input", "output")),
                Question("pq", "", self.pq_prompt, ("output",))]  # fmt: skip

    def parse(self, question: Question, reply: str) -> Parsed:
        try:
            data = json_object(reply)
        except ReplyError:
            _refused(reply)
            raise
        scores = data.get("score")
        if not isinstance(scores, list) or len(scores) != 2:
            raise ReplyError("malformed", f"expected \"score\": [a, b], got {_short(json.dumps(scores))}")
        low, high = self.scale
        values = {}
        for index, value in enumerate(scores):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:  # NaN too
                raise ReplyError("out_of_range", f"{question.key.upper()} score {value!r} is not a number from "
                                 f"{low} to {high}")  # fmt: skip
            values[f"score_{index}"] = float(value)
        reasoning = data.get("reasoning")
        return Parsed(values, reasoning if isinstance(reasoning, str) else "")

    def combine(self, parsed: dict[str, Parsed]) -> ItemScore:
        sc, pq = min(parsed["sc"].scores.values()), min(parsed["pq"].scores.values())
        overall = math.sqrt(sc * pq)
        reasoning = f"SC: {parsed['sc'].reasoning} | PQ: {parsed['pq'].reasoning}"
        return ItemScore({"SC": sc, "PQ": pq, "O": overall}, overall, reasoning)


def _python_strings(path: Path) -> dict[str, str]:
    """Module-level ``NAME = "..."`` string constants of a Python file, read with ``ast`` (the file is never run)."""
    try:
        tree = ast.parse(_read(path), filename=str(path))
    except SyntaxError as exc:
        raise UserError(f"{{judge_prompts}} {path}: not Python ({exc.msg}, line {exc.lineno})",
                        "judge_prompts") from None  # fmt: skip
    values = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    values[target.id] = node.value.value
    return values


# ---------------------------------------------------------------------------------------------------------- generic
PBENCH_AXES = ("action_fidelity", "identity_preservation", "visual_coherence")
PBENCH_SYSTEM = """You are an expert judge of instruction-based image edits, especially edits that involve physical \
actions (people or robots acting, objects moving, vehicles driving). You see two images: the first is the original, \
the second is the edited result. Rate the edit on three axes, each an integer from 1 (worst) to 5 (best):

action_fidelity: does the edited image carry out exactly what the instruction asks, with the action or change \
physically plausible (1: nothing or the wrong thing happened; 3: the main idea is there but details are wrong; 5: \
exactly as asked).
identity_preservation: are the subjects, objects, background and everything the instruction does not mention kept \
the same (1: unrecognisable or replaced; 3: recognisable with clear drift; 5: identical apart from the edit).
visual_coherence: is the result a coherent, artefact-free image with consistent lighting, perspective, anatomy and \
physics (1: broken or heavily distorted; 3: plausible with visible flaws; 5: flawless).

Answer with one JSON object and nothing else:
{"action_fidelity": n, "identity_preservation": n, "visual_coherence": n, "reasoning": "one or two sentences"}"""


class PBenchRubric(Rubric):
    """Our rubric on PBench-Edit's three axes (the paper's judge prompt is unreleased); see the module docstring."""

    name = "pbench-3axis"
    format = GENERIC
    axes = PBENCH_AXES

    def __init__(self, system: str = PBENCH_SYSTEM) -> None:
        super().__init__(system)

    @classmethod
    def load(cls, path: Path) -> PBenchRubric:
        """A text file with the system prompt to use instead of ours (it must ask for the same JSON object)."""
        text = _read(path)
        missing = [axis for axis in PBENCH_AXES if axis not in text]
        if missing:
            raise UserError(f"{{judge_prompts}} {path} must ask for the JSON keys {', '.join(PBENCH_AXES)} "
                            f"(missing {', '.join(missing)})", "judge_prompts")  # fmt: skip
        return cls(text)

    def questions(self, item: EvalItem) -> list[Question]:
        text = f"Editing instruction: {item.instruction}\nThe first image is the original, the second the edit."
        return [Question("main", self.text, text, ("input", "output"))]

    def parse(self, question: Question, reply: str) -> Parsed:
        try:
            data = json_object(reply)
        except ReplyError:
            _refused(reply)
            raise
        scores = {}
        for axis in PBENCH_AXES:
            value = data.get(axis)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ReplyError("malformed", f"{axis} is missing or not a number: {_short(reply)}")
            scores[axis] = _integer_in(value, 1, 5, axis)
        reasoning = data.get("reasoning")
        return Parsed(scores, reasoning if isinstance(reasoning, str) else "")

    def combine(self, parsed: dict[str, Parsed]) -> ItemScore:
        main = parsed["main"]
        return ItemScore(dict(main.scores), sum(main.scores.values()) / len(PBENCH_AXES), main.reasoning)


# ------------------------------------------------------------------------------------------------------------ loading
def _read(path: Path) -> str:
    try:
        with files.open_regular(path, "judge prompts file") as handle:
            return handle.read().decode("utf-8-sig")
    except FileNotFoundError:
        raise UserError(f"{{judge_prompts}} not found: {path}", "judge_prompts") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = files.os_reason(exc, path) if isinstance(exc, OSError) else "not UTF-8 text"
        raise UserError(f"cannot read {{judge_prompts}} {path}: {reason}", "judge_prompts") from None


def _json_file(path: Path) -> Any:
    try:
        return json.loads(_read(path))
    except json.JSONDecodeError as exc:
        raise UserError(f"{{judge_prompts}} {path}: not JSON ({exc.msg}, line {exc.lineno})",
                        "judge_prompts") from None  # fmt: skip


def load_rubric(fmt: str, prompts: Path | None) -> Rubric:
    """The rubric of a benchmark format: ImgEdit and GEdit need their published prompts (``prompts``); the generic
    format uses ours unless a file replaces it."""
    if fmt == IMGEDIT:
        if prompts is None:
            raise UserError("judging ImgEdit needs its prompts: give {judge_prompts} (the JSON of edit type -> "
                            "prompt its basic_bench.py reads)", "judge_prompts")  # fmt: skip
        return ImgEditRubric.load(prompts)
    if fmt == GEDIT:
        if prompts is None:
            raise UserError("judging GEdit-Bench needs its prompts: give {judge_prompts} (VIEScore's "
                            "vie_prompts.py, or a JSON with SC and PQ)", "judge_prompts")  # fmt: skip
        return GEditRubric.load(prompts)
    return PBenchRubric.load(prompts) if prompts is not None else PBenchRubric()
