"""The engine's layout contract, read from the compiled module (``csrc/stats.h`` writes it
once): dtype codes, descriptor columns and output columns, by name. Torch-free, so the
Arrow schema can share the column names."""

from __future__ import annotations

from torchvitals import _C

#: Output columns: ``counts [T, len(COUNT_KEYS)]`` (int64), ``moments [T, len(MOMENT_KEYS)]``
#: (float64), in this order.
COUNT_KEYS: tuple[str, ...] = tuple(_C.COUNT_COLUMNS)
MOMENT_KEYS: tuple[str, ...] = tuple(_C.MOMENT_COLUMNS)
#: Columns of the int64 descriptor table ``[T, len(DESC_COLUMNS)]``, one row per tensor.
DESC_COLUMNS: tuple[str, ...] = tuple(_C.DESC_COLUMNS)
#: ``{torch dtype name: the engine's code}``.
DTYPE_CODE_BY_NAME: dict[str, int] = {name: code for code, name in enumerate(_C.DTYPES)}
#: Elements one CPU task or one CUDA block reduces.
CHUNK_ELEMS: int = _C.CHUNK_ELEMS
