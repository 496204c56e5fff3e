"""Exceptions raised by reparam. Every error says which module or argument is at fault."""


class ReparamError(Exception):
    """Base class of every error reparam raises on purpose."""


class InputError(ReparamError, ValueError):
    """An argument is not what reparam needs (not a module, a bad example input, ...)."""


class TraceFailure(ReparamError):
    """The model cannot be traced with torch.fx at all.

    `reason`: why torch.fx failed, in one line (the message adds which module and what to do)."""

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason if reason is not None else message


class VerificationError(ReparamError):
    """The fused model disagrees with the original beyond the tolerance."""

    def __init__(self, message: str, max_abs_diff: float, allowed: float):
        super().__init__(message)
        self.max_abs_diff = max_abs_diff
        self.allowed = allowed


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (or its type), for one-line error reports."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
