"""Packages that are also the API function of their name: ``kvq.calibrate(...)`` and ``kvq.evaluate(...)``.

``kvq.calibrate`` must be both the package ``kvq/calibrate/`` (``import kvq.calibrate.run``) and the API
function :func:`kvq.api.calibrate`: Python sets a subpackage as an attribute of its parent when it is
imported, so a function of that name in ``kvq/__init__.py`` would be replaced by the package. Instead
the package's module object is made callable: calling it calls the API function, and
``inspect.signature(kvq.calibrate)`` and ``help`` reach the function through ``__wrapped__``.
"""

from __future__ import annotations

import importlib
import sys
import types


class CallablePackage(types.ModuleType):
    """A package whose call is the function of the same name in :mod:`kvq.api` (imported at the first use)."""

    @property
    def __wrapped__(self):
        return getattr(importlib.import_module("kvq.api"), self.__name__.rpartition(".")[2])

    def __call__(self, *args, **kwargs):
        return self.__wrapped__(*args, **kwargs)


def make_callable(package: str) -> None:
    """Make the (already imported) ``package`` callable as its API function."""
    sys.modules[package].__class__ = CallablePackage
