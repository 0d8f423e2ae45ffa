"""Which transformers Auto class builds a config's architecture (causal LM or vision-language)."""

from __future__ import annotations

from typing import Any


def auto_model_class(hf_config: Any) -> Any:
    """The transformers Auto class that builds ``config.architectures[0]``.

    A causal LM's class is in ``AutoModelForCausalLM``'s mapping; a vision-language model
    (``Qwen2VLForConditionalGeneration``, ``LlavaForConditionalGeneration``) only in
    ``AutoModelForImageTextToText``'s. Without ``architectures`` the causal LM is assumed.
    A text config that no Auto mapping lists (``mllama_text_model``, saved by
    ``MllamaForCausalLM``) is built by the class its ``architectures`` names.
    """
    import transformers
    from transformers.models.auto import modeling_auto

    wanted = (getattr(hf_config, "architectures", None) or [None])[0]
    model_type = getattr(hf_config, "model_type", None)
    causal = modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    vlm = modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.get(model_type)
    if vlm is not None and (causal is None or (wanted is not None and wanted == vlm != causal)):
        return transformers.AutoModelForImageTextToText
    if causal is None and vlm is None and isinstance(wanted, str):
        named = getattr(transformers, wanted, None)
        if isinstance(named, type) and hasattr(named, "_from_config"):
            return _NamedClass(named)
    return transformers.AutoModelForCausalLM


class _NamedClass:
    """A transformers model class behind the two Auto-class calls the plugin makes."""

    def __init__(self, cls: Any) -> None:
        self.cls = cls

    def from_config(self, config: Any, **kwargs: Any) -> Any:
        kwargs.pop("trust_remote_code", None)  # the class is transformers' own
        return self.cls._from_config(config, **kwargs)

    def from_pretrained(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.pop("trust_remote_code", None)
        return self.cls.from_pretrained(*args, **kwargs)
