"""Evaluation of edits on benchmarks with a VLM judge (``chronoedit eval``).

Readers for ImgEdit-Basic, GEdit-Bench and a generic JSONL/CSV format (:mod:`.readers`); generation through the batch
engine (:mod:`.generate`); the judge's rubrics and its reply cache (:mod:`.rubrics`, :mod:`.judge`); judge-free
metrics (:mod:`.metrics`); aggregation by each benchmark's convention with bootstrap intervals (:mod:`.aggregate`,
:mod:`.stats`); the run itself (:mod:`.run`, :mod:`.sweep`); reports (:mod:`.report`) and comparisons
(:mod:`.compare`).
"""

from .items import FORMATS, GEDIT, GENERIC, IMGEDIT, Benchmark, EvalItem
from .readers import BenchmarkError, read_benchmark
from .rubrics import GEditRubric, ImgEditRubric, PBenchRubric, load_rubric
from .run import EvalRun, JudgeSetup, evaluate

__all__ = [
    "FORMATS", "GEDIT", "GENERIC", "IMGEDIT", "Benchmark", "BenchmarkError", "EvalItem", "EvalRun", "GEditRubric",
    "ImgEditRubric", "JudgeSetup", "PBenchRubric", "evaluate", "load_rubric", "read_benchmark",
]  # fmt: skip
