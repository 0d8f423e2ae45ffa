"""AWQ on plain torch modules: per-channel scale search (``search``), clip search (``clip``), the
per-block step and whole-model driver (``awq``, which also calibrates MoE experts on their routed
tokens), and the results as data (``results``)."""
