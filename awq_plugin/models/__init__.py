"""Model surgery the other stages share: fused mixture-of-experts weights as one ``nn.Linear`` per expert."""

from torch import nn


def has_submodule(root: nn.Module, path: str) -> bool:
    """Whether ``root.get_submodule(path)`` exists (hybrid stacks' layers differ in their modules)."""
    try:
        root.get_submodule(path)
    except AttributeError:
        return False
    return True
