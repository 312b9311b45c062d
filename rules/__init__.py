"""The rule language: load and check a program, evaluate receipts against it."""

from .arith import largest_remainder
from .engine import RuleEngineError
from .loader import check_dir, check_files, load_files, load_program
from .problems import Problem, ProgramError
from .program import Program
from .records import EventRule, Evaluation, MemberFacts, Partner, Store

__all__ = [
    "Evaluation",
    "EventRule",
    "MemberFacts",
    "Partner",
    "Problem",
    "Program",
    "ProgramError",
    "RuleEngineError",
    "Store",
    "check_dir",
    "check_files",
    "largest_remainder",
    "load_files",
    "load_program",
]
