"""Tied parameters: the ones a checkpoint does not store because they share another's tensor.

Most models tie only ``lm_head.weight`` to the input embeddings, and only when
``tie_word_embeddings`` is set; others tie heads under other names (RoFormer's
``cls.predictions.decoder``, XLM-RoBERTa-XL's ``lm_head.decoder``, with their biases).
``save_pretrained`` writes the source of each tie only, so every stage that checks a
checkpoint against a model skips the targets here and calls ``model.tie_weights()``.
"""

from __future__ import annotations

from torch import nn


def tied_parameters(model: nn.Module) -> dict[str, str]:
    """``{tied parameter: the parameter it shares}`` as the model's config ties them, full names."""
    expand = getattr(model, "get_expanded_tied_weights_keys", None)
    if expand is not None:  # transformers >= 5: every tie the model declares, config-aware
        return dict(expand(all_submodels=True))
    config = getattr(model, "config", None)
    get_head = getattr(model, "get_output_embeddings", None)
    if not getattr(config, "tie_word_embeddings", False) or get_head is None or get_head() is None:
        return {}
    head, embeddings = get_head(), model.get_input_embeddings()
    names = {module: name for name, module in model.named_modules()}
    return {f"{names[head]}.weight": f"{names[embeddings]}.weight"}
