"""`synthcxr generate` command (being built)."""

from synthcxr.errors import SynthCXRError


def generate() -> None:
    raise SynthCXRError("not built yet")
