"""`synthcxr demo` (being built)."""

from synthcxr.errors import SynthCXRError


def demo() -> None:
    raise SynthCXRError("not built yet")
