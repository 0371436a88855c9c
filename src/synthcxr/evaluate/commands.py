"""`synthcxr evaluate` command (being built)."""

from synthcxr.errors import SynthCXRError


def evaluate() -> None:
    raise SynthCXRError("not built yet")
