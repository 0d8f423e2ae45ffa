"""Calibration: text to token windows (``text``), the defaults (``settings``), and the block inputs and
statistics recorded from them (``capture``, ``statistics``)."""
