"""The rule language: load and check a program, evaluate receipts against it."""

from .arith import largest_remainder
from .engine import RuleEngineError
from .explain import Explanation, RuleExplanation, format_explanation
from .loader import check_dir, check_files, load_files, load_program
from .problems import Problem, ProgramError
from .program import Program
from .records import CouponCampaign, EventRule, Evaluation, MemberFacts, Partner, SegmentFacts, Store
from .segments import Segment, holdout_member

__all__ = [
    "CouponCampaign",
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
    "Segment",
    "SegmentFacts",
    "Store",
    "check_dir",
    "check_files",
    "format_explanation",
    "holdout_member",
    "largest_remainder",
    "load_files",
    "load_program",
]
