"""`synthcxr train` command (being built)."""

from synthcxr.errors import SynthCXRError


def train() -> None:
    raise SynthCXRError("not built yet")
