"""FaultRecord: I/O errors disable writing, item errors do not; warn once, or raise later."""

from __future__ import annotations

import errno
import warnings

import pytest

from torchvitals.store.faults import FaultRecord


def record(strict=False):
    disabled = []
    faults = FaultRecord(run_path="/runs/x", strict=strict, on_disable=lambda: disabled.append(1))
    return faults, disabled


def enospc():
    return OSError(errno.ENOSPC, "No space left on device")


def test_first_io_error_disables_writing_and_warns_once():
    faults, disabled = record()
    first, second = enospc(), enospc()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        faults.fail_io(first, "/runs/x/scalars.rank0.000000.arrows")
        faults.fail_io(second, "/runs/x/layers.rank0.000000.arrows")
    assert faults.writing_disabled and faults.io_error is first
    assert faults.write_errors == 2 and disabled == [1]  # on_disable: once
    (msg,) = [str(r.message) for r in rec]
    assert "scalars.rank0.000000.arrows" in msg and "No space left on device" in msg
    faults.raise_pending()  # not strict: nothing to raise


def test_item_errors_are_counted_warned_once_and_do_not_disable():
    faults, disabled = record()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        faults.item_error(ZeroDivisionError("division by zero"), "scalars", 3)
        faults.item_error(ValueError("bad column"), "layers", 1)
    assert faults.write_errors == 4 and not faults.writing_disabled and disabled == []
    (msg,) = [str(r.message) for r in rec]
    assert "'scalars'" in msg and "/runs/x" in msg and "division by zero" in msg


def test_io_and_item_warnings_are_separate():
    faults, _ = record()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        faults.item_error(ValueError("bad"), "hist", 1)
        faults.fail_io(enospc(), "/runs/x/hist.rank0.000000.arrows")
    assert len(rec) == 2


def test_strict_keeps_the_first_error_for_the_training_thread():
    faults, disabled = record(strict=True)
    first = ZeroDivisionError("first")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # strict never warns
        faults.item_error(first, "scalars", 1)
        faults.fail_io(enospc(), "/runs/x/scalars.rank0.000000.arrows")
    assert faults.write_errors == 2 and faults.writing_disabled and disabled == [1]
    with pytest.raises(ZeroDivisionError, match="first"):
        faults.raise_pending()
    faults.raise_pending()  # raised once only


def test_strict_io_error_after_writing_is_disabled_is_only_counted():
    faults, _ = record(strict=True)
    faults.fail_io(enospc(), "a")
    with pytest.raises(OSError):
        faults.raise_pending()
    faults.fail_io(enospc(), "b")
    faults.raise_pending()  # the second failure is a consequence of the first: not raised
    assert faults.write_errors == 2
