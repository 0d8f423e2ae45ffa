"""AWQ on plain torch modules: the search knobs (``options``), per-channel scale search
(``search``), clip search (``clip``), which linears a config quantizes (``linears``), one block's
step (``block``), calibrating experts the calibration leaves unused (``moe_fallback``), the
whole-model driver (``awq``, which re-exports the public names of the others) and the results
as data (``results``)."""
