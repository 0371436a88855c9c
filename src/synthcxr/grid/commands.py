"""`synthcxr grid` command (being built)."""

from synthcxr.errors import SynthCXRError


def grid() -> None:
    raise SynthCXRError("not built yet")
