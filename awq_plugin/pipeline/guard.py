"""The end-to-end guard: after the blocks, is the AWQ model better than plain rounding would be?

Every AWQ decision is taken block by block on a block's own output error. That can
win in every block and still lose end to end (issue 19: Qwen2.5-0.5B, AWQ below
rounding's error in all 24 blocks, worse perplexity), so the finished model is
checked as a whole: its mean loss on a few calibration-text windows that the
search never saw is compared with plain rounding's on the same windows. The
result is a figure in the quantize report; when AWQ loses, the report and the
CLI's closing message say so, with both losses.

The comparison reproduces both models in memory by fake quantization (AWQ:
the saved scales and clips re-applied, which gives the checkpoint's bits), one
model at a time: the peak is one full-precision copy of the model.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from awq_plugin.algorithm.awq import (
    AwqResults,
    QuantConfigLike,
    apply_awq,
    fake_quantize_decoder_linears,
)
from awq_plugin.calibration.text import CalibSource, load_documents, tokenize_stream
from awq_plugin.evaluate import perplexity
from awq_plugin.runtime.modeling import load_fp_model
from awq_plugin.templates import resolve_template

log = logging.getLogger(__name__)

GUARD_WINDOWS = 4  # held-out windows the guard scores (each as long as a calibration sample)


@dataclass(frozen=True)
class GuardResult:
    """Mean loss per predicted token (nats) of the AWQ model and of plain rounding, same windows."""

    nll_awq: float
    nll_rtn: float
    windows: int
    seq_len: int
    text: str  # where the windows come from

    @property
    def awq_lost(self) -> bool:
        """True when AWQ ends worse than rounding (NaN counts as worse)."""
        return not self.nll_awq <= self.nll_rtn

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "awq_lost": self.awq_lost, "message": self.message()}

    def message(self) -> str:
        figures = (
            f"held-out loss {self.nll_awq:.4f} (AWQ) vs {self.nll_rtn:.4f} (plain rounding) nats/token, "
            f"perplexity {_ppl(self.nll_awq):.3f} vs {_ppl(self.nll_rtn):.3f}, "
            f"on {self.windows} x {self.seq_len} {self.text}"
        )
        if self.awq_lost:
            return (
                f"WARNING: AWQ IS WORSE THAN PLAIN ROUNDING on this model: {figures}. "
                "Plain rounding (--method rtn) would give a better model; other calibration text may help."
            )
        return f"end-to-end check: AWQ <= plain rounding: {figures}"


def _ppl(nll: float) -> float:
    return math.exp(nll) if nll < 700 else math.inf


def held_out_windows(
    tokenizer: Any, source: CalibSource, n_samples: int, seq_len: int, seed: int, count: int = GUARD_WINDOWS
) -> torch.Tensor | None:
    """``count`` windows of the calibration text that the calibration draw did not pick: ``[count, seq_len]``.

    The same text, cut and seeded permutation as
    :func:`awq_plugin.calibration.text.calibration_windows` (which takes the
    permutation's first ``n_samples``): these are its next ``count``. None when
    the text has no window left over, or the calibration was given as token ids.
    """
    if isinstance(source, torch.Tensor) or tokenizer is None:
        return None
    stream = tokenize_stream(tokenizer, load_documents(source))
    n = stream.numel() // seq_len
    windows = stream[: n * seq_len].reshape(n, seq_len)  # (n_windows, seq_len)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    spare = perm[n_samples : n_samples + count].sort().values
    return windows[spare].contiguous() if spare.numel() else None


def fake_quantize_linears(model: nn.Module, quant_config: QuantConfigLike, template: Any = None) -> None:
    """:func:`~awq_plugin.algorithm.linears.fake_quantize_decoder_linears` under ``template`` (any
    :func:`resolve_template` spec), in place."""
    fake_quantize_decoder_linears(model, resolve_template(model, template), quant_config)


def mean_nll(model: nn.Module, windows: torch.Tensor) -> float:
    """Mean negative log-likelihood per predicted token over ``windows`` ``[n, L]``."""
    return perplexity(model, windows, batch_size=1, progress=False).nll


def compare_with_rounding(
    load_model: Callable[[], nn.Module],
    results: AwqResults,
    quant_config: QuantConfigLike,
    windows: torch.Tensor,
    text: str = "held-out calibration windows",
) -> GuardResult:
    """Score AWQ (``results`` re-applied) and plain rounding on ``windows``; one model in memory at a time.

    ``load_model()`` returns a fresh full-precision model each call.
    """
    losses = []
    for use_awq in (True, False):
        model = load_model().eval()
        if use_awq:
            apply_awq(model, results)
        fake_quantize_linears(model, quant_config, results.template if use_awq else None)
        losses.append(mean_nll(model, windows))
        del model
    result = GuardResult(losses[0], losses[1], int(windows.shape[0]), int(windows.shape[1]), text)
    (log.warning if result.awq_lost else log.info)("%s", result.message())
    return result


def guard_checkpoint(
    source: str | Path,
    results: AwqResults,
    quant_config: QuantConfigLike,
    calib: CalibSource,
    n_samples: int,
    seq_len: int,
    seed: int,
    trust_remote_code: bool = False,
    count: int = GUARD_WINDOWS,
) -> GuardResult | None:
    """The guard for a quantized transformers folder ``source``; None when there is no held-out text.

    Advisory: the checkpoint is already written, so a model the check cannot load or run
    (another Auto class, remote code) gets a warning saying why, not a failed run.
    """
    try:
        from transformers import AutoTokenizer

        tokenizer = None
        if not isinstance(calib, torch.Tensor):
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        windows = held_out_windows(tokenizer, calib, n_samples, seq_len, seed, count)
        if windows is None:
            log.info("end-to-end check skipped: the calibration leaves no held-out text")
            return None

        def load() -> nn.Module:
            return load_fp_model(source, torch.float32, trust_remote_code)

        name = calib if isinstance(calib, str) else "calibration text"
        return compare_with_rounding(load, results, quant_config, windows, f"held-out windows of {name!r}")
    except Exception as exc:
        log.warning("end-to-end check against plain rounding could not run: %s: %s", type(exc).__name__, exc)
        return None


def copying_loader(model: nn.Module) -> Callable[[], nn.Module]:
    """A ``load_model`` for :func:`compare_with_rounding` over an in-memory model (a deep copy per call)."""
    return lambda: copy.deepcopy(model)
