"""The kernel benchmark behind benchmarks/triton_kernels.py.

One module per kernel (its shapes, its eager function, its float64 reference and the call each
peer makes), over a shared harness: case.py (what a case is), measure.py (error, memory, wall
time, ceilings), graphs.py (GPU time by CUDA-graph replay), run.py (one kernel end to end) and
report.py (the markdown tables).
"""

from . import (
    adamw,
    add_rms_norm,
    cross_entropy,
    float8_columns,
    float8_group_columns,
    float8_outputs,
    linear_cross_entropy,
    rms_norm,
    rope,
    swiglu,
)
from .case import Case

CASE_MODULES = (rms_norm, add_rms_norm, swiglu, rope, cross_entropy, linear_cross_entropy, float8_outputs,
                float8_columns, float8_group_columns, adamw)


def build_cases(small: bool) -> list[Case]:
    """Every case in table order; small: the dry run's tiny shapes."""
    return [case for module in CASE_MODULES for case in module.cases(small)]
