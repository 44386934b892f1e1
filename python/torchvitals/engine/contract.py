"""Names of the engine's output columns, in the order of csrc/stats.h (``CountCol``,
``MomentCol``). Torch-free, so the Arrow schema can share them."""

COUNT_KEYS = (
    "numel",
    "nan",
    "inf",
    "zeros",
    "saturated",
    "units",
    "dead_units",
    "saturated_units",
)
MOMENT_KEYS = ("sum", "sumsq", "max_abs")
