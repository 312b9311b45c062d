"""The rule language: load and check a program, evaluate receipts against it."""

from .arith import largest_remainder
from .engine import RuleEngineError
from .explain import Explanation, RuleExplanation, format_explanation
from .loader import check_dir, check_files, load_files, load_program
from .problems import Problem, ProgramError
from .program import Program
from .records import EventRule, Evaluation, MemberFacts, Partner, Store

__all__ = [
    "Evaluation",
    "EventRule",
    "Explanation",
    "MemberFacts",
    "Partner",
    "Problem",
    "Program",
    "ProgramError",
    "RuleEngineError",
    "RuleExplanation",
    "Store",
    "check_dir",
    "check_files",
    "format_explanation",
    "largest_remainder",
    "load_files",
    "load_program",
]
