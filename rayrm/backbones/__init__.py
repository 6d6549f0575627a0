"""Frame and prompt encoders, chosen by name.

Every backbone implements :class:`Backbone`. ``build_backbone(cfg)`` looks the name up in
the registry; modules register themselves with ``@register_backbone("name")``. The built-in
modules are imported lazily (only the chosen one), so a missing optional dependency of one
backbone never breaks another.
"""

from rayrm.backbones.base import (
    Backbone,
    UnknownBackboneError,
    available_backbones,
    build_backbone,
    check_backbone,
    register_backbone,
)

__all__ = [
    "Backbone",
    "UnknownBackboneError",
    "available_backbones",
    "build_backbone",
    "check_backbone",
    "register_backbone",
]
