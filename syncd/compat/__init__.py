"""Every use of a dependency's private state, one module per library.

Each module names the versions it was verified on and checks at run time which of its
features can be used on the installed version: on any other version a feature is off and
the caller logs that once (`compat_feature_off`), never a hook that silently goes missing.
Nothing outside this package reads or writes a library's underscore names.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class FeatureOff:
    """A compat feature that is off on the installed version of its library."""

    library: str
    version: str
    feature: str
    effect: str        # what the user loses
    fix: str           # what to do about it

    def log(self, log: object) -> None:
        log.warning("compat_feature_off", library=self.library,  # type: ignore[attr-defined]
                    version=self.version, feature=self.feature, effect=self.effect,
                    fix=self.fix)


@functools.cache
def installed_version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"
