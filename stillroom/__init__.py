"""stillroom: distill large language models into small ones.

As a library: `Distiller` (in-memory models and data; see stillroom/distiller.py), the loss
functions in `stillroom.losses`, the objectives in `stillroom.objectives.core`.
"""
__version__ = "0.1.0"

from stillroom.errors import Stopped, UserError  # noqa: E402


def __getattr__(name):   # the Distiller imports torch and transformers: only when asked for
    if name == "Distiller":
        from stillroom.distiller import Distiller
        return Distiller
    raise AttributeError(f"module 'stillroom' has no attribute {name!r}")


__all__ = ["Distiller", "UserError", "Stopped", "__version__"]
