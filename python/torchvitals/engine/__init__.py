"""The engine: the fused statistics op, its backend dispatch, the C++ column contract, the
histogram layout and the float64 reference that defines every statistic."""
