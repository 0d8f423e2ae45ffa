"""Model surgery the other stages share: fused mixture-of-experts weights as one ``nn.Linear`` per expert,
and linears of other kinds (GPT-2's ``Conv1D``, grouped projections) as plain ``nn.Linear`` modules."""

from torch import nn


def has_submodule(root: nn.Module, path: str) -> bool:
    """Whether ``root.get_submodule(path)`` exists (hybrid stacks' layers differ in their modules)."""
    try:
        root.get_submodule(path)
    except AttributeError:
        return False
    return True


def as_plain_linears(model: nn.Module) -> list[str]:
    """Every linear of ``model`` that is not an ``nn.Linear`` made one, in place: GPT-2's ``Conv1D``
    (:mod:`awq_plugin.models.conv1d`) and grouped linears such as DeepSeek-V4's ``o_a_proj``
    (:mod:`awq_plugin.models.grouped_linear`). Returns the names replaced."""
    from awq_plugin.models.conv1d import linearize_conv1d
    from awq_plugin.models.grouped_linear import split_grouped_linears

    return linearize_conv1d(model) + split_grouped_linears(model)
