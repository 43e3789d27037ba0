"""Old import paths of modules that moved into packages: `import kopru.recipes` gives `kopru.training.recipes`.

The alias is the module itself, not a copy, so attributes set or patched through either name are seen through
both. `MOVED` is the one list; `kopru/__init__.py` installs the finder.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from types import ModuleType

MOVED: dict[str, str] = {
    "kopru.recipes": "kopru.training.recipes",
    "kopru.checkpoint": "kopru.training.checkpoint",
    "kopru.qformer_pretraining": "kopru.training.qformer_stage1",
    "kopru.compare": "kopru.lesson.compare",
    "kopru.report": "kopru.lesson.report",
    "kopru.scale": "kopru.lesson.scale",
    "kopru.significance": "kopru.lesson.significance",
    "kopru.demo": "kopru.lesson.demo",
    "kopru.tiny": "kopru.lesson.tiny",
    "kopru.pretrain_tiny": "kopru.lesson.pretrain_tiny",
}


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self.target = target
        self.own_spec = None

    def create_module(self, spec) -> ModuleType:
        module = importlib.import_module(self.target)
        self.own_spec = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        # The import system has stamped the alias's spec on the module in between: give it back its own.
        module.__spec__ = self.own_spec


class MovedModules(importlib.abc.MetaPathFinder):
    """Finds the old names in `MOVED` and answers with the module under its new name."""

    def find_spec(self, name: str, path=None, target=None):
        if name not in MOVED:
            return None
        return importlib.util.spec_from_loader(name, _AliasLoader(MOVED[name]))


def install() -> None:
    if not any(isinstance(finder, MovedModules) for finder in sys.meta_path):
        sys.meta_path.append(MovedModules())
