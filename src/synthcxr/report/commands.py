"""`synthcxr report` command (being built)."""

from synthcxr.errors import SynthCXRError


def report() -> None:
    raise SynthCXRError("not built yet")
