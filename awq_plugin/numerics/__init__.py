"""The numbers: group quantization, its one pure-PyTorch reference, and the packed bit layout.

``quant_ref`` is the math every other stage uses (the search's fake quantization,
the packing tests' oracle, every kernel's oracle and the fallback kernel);
``pack`` is the AutoAWQ int32 layout. This ``__init__`` holds only torch-free rules,
so the config can import them without pulling in torch.
"""

PER_CHANNEL = -1  # group_size value meaning one group spanning all K input channels of an output row
PACKABLE_BITS = (4,)  # widths the AWQ GEMM layout stores (``pack``); others exist only as fake quant


def check_packable(bits: int) -> None:
    """Raise ``ValueError`` unless ``bits``-bit integers fit the AWQ GEMM layout."""
    if bits not in PACKABLE_BITS:
        raise ValueError(
            f"bits={bits} cannot be packed into the AWQ GEMM layout (supported: "
            f"{list(PACKABLE_BITS)}); {bits}-bit is available only as fake quantization "
            "(awq-plugin eval --fake-quant)"
        )


def effective_group_size(group_size: int, in_features: int) -> int:
    """The group length along K: ``PER_CHANNEL`` (-1) means all ``in_features``.

    The one place this rule lives; callers wanting their own error message for a size that
    does not divide K check divisibility themselves (``quant_ref.resolve_group_size`` does).
    """
    return in_features if group_size == PER_CHANNEL else group_size
