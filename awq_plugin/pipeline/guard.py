"""The end-to-end guard: is the finished AWQ model better than plain rounding would be?

Every AWQ decision is taken block by block on a block's own output error. That can
win in every block and still lose end to end (issue 19: Qwen2.5-0.5B, AWQ below
rounding's error in all 24 blocks, worse perplexity), so the finished model is
judged as a whole: its mean loss per token on calibration-text windows that the
search never saw, against plain rounding's on the same windows, with the standard
error of the paired per-window difference.

In the streaming pipeline the held-out windows travel through the decoder beside the
calibration tokens (:class:`GuardStreams`): each block, while it is in memory, runs
them twice with its weights fake-quantized, once as plain rounding (before the
search) and once as written (after it); after the last block the model's tail (final
norm, output head) turns both streams into losses. Nothing beyond one block and the
non-layer weights is ever in memory. What happens when AWQ loses is the ``guard``
mode's choice (:data:`GUARD_MODES`): ``fallback`` (the default) writes plain rounding
instead, ``warn`` keeps AWQ and warns, ``off`` skips the check.

Models held in memory (``quantize()`` on a model, ``eval --fake-quant``, quantize-on-load)
stream the same windows beside :func:`~awq_plugin.algorithm.awq.run_awq`
(:class:`InMemoryGuard`); :func:`compare_with_rounding` scores two fake-quantized copies
of a model with saved results, one at a time.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from awq_plugin.algorithm.awq import (
    AwqResults,
    QuantConfigLike,
    apply_awq,
    fake_quantize_decoder_linears,
    quantized_linear_names,
)
from awq_plugin.algorithm.block import BlockForwards
from awq_plugin.algorithm.forward_dtype import warn_float32_fallback
from awq_plugin.algorithm.linears import fake_quantized
from awq_plugin.algorithm.options import GUARD_MODES
from awq_plugin.calibration.capture import BlockInputs, CapturedInputs, capture_decoder_inputs, first_output
from awq_plugin.calibration.text import CalibSource, source_stream
from awq_plugin.errors import ConfigError
from awq_plugin.evaluate import paired_difference
from awq_plugin.templates import ResolvedTemplate, resolve_template

log = logging.getLogger(__name__)

GUARD_WINDOWS = 8  # held-out windows the guard scores (each as long as a calibration sample)
# AWQ has lost when its loss is above rounding's by more than this many standard errors of the
# paired per-window difference; a smaller gap is noise (random-weight models, where every
# model is as bad as the next on real text, sit there) and keeps AWQ, saying so.
GUARD_SIGMAS = 2.0


def check_guard_mode(mode: str) -> str:
    if mode not in GUARD_MODES:
        raise ConfigError(f"guard mode {mode!r} is unknown; choose one of {list(GUARD_MODES)}")
    return mode


@dataclass(frozen=True)
class GuardResult:
    """Mean loss per predicted token (nats) of the AWQ model and of plain rounding, same windows.

    ``awq_windows`` / ``rtn_windows`` hold each window's own mean loss; the standard error
    of the paired difference says whether the gap between the two is above the noise.
    ``action`` is what the pipeline did with the verdict: ``kept`` AWQ (it won, or
    ``--guard warn``) or ``rounded`` (wrote plain rounding instead).
    """

    nll_awq: float
    nll_rtn: float
    windows: int
    seq_len: int
    text: str  # where the windows come from
    awq_windows: tuple[float, ...] = ()
    rtn_windows: tuple[float, ...] = ()
    action: str = "kept"

    @classmethod
    def from_windows(cls, awq: Sequence[float], rtn: Sequence[float], seq_len: int, text: str) -> GuardResult:
        """The verdict from per-window mean losses (every window has ``seq_len - 1`` predictions)."""
        return cls(
            nll_awq=math.fsum(awq) / len(awq),
            nll_rtn=math.fsum(rtn) / len(rtn),
            windows=len(awq),
            seq_len=seq_len,
            text=text,
            awq_windows=tuple(map(float, awq)),
            rtn_windows=tuple(map(float, rtn)),
        )

    @property
    def awq_worse(self) -> bool:
        """AWQ's mean loss is above rounding's (NaN counts as above), by any margin."""
        return not self.nll_awq <= self.nll_rtn

    @property
    def awq_lost(self) -> bool:
        """AWQ is worse by more than the noise: :data:`GUARD_SIGMAS` standard errors (with one
        window, or windows that all differ alike, any margin)."""
        if not self.awq_worse:
            return False
        se = self.standard_error
        return not math.isfinite(self.difference) or not se > 0 or self.difference > GUARD_SIGMAS * se

    @property
    def difference(self) -> float:
        """AWQ's loss minus rounding's (nats/token): positive when AWQ is worse."""
        return self.nll_awq - self.nll_rtn

    @property
    def standard_error(self) -> float:
        """Standard error of the mean paired per-window difference (NaN with fewer than 2 windows)."""
        if not self.awq_windows:
            return math.nan
        return paired_difference(self.awq_windows, self.rtn_windows)[1]

    def to_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "awq_worse": self.awq_worse,
            "awq_lost": self.awq_lost,
            "difference": self.difference,
            "standard_error": self.standard_error,
            "message": self.message(),
        }

    def figures(self) -> str:
        return (
            f"held-out loss {self.nll_awq:.4f} (AWQ) vs {self.nll_rtn:.4f} (plain rounding) nats/token, "
            f"difference {self.difference:+.4f} +- {self.standard_error:.4f} (standard error), "
            f"perplexity {_ppl(self.nll_awq):.3f} vs {_ppl(self.nll_rtn):.3f}, "
            f"on {self.windows} x {self.seq_len} {self.text}"
        )

    def message(self) -> str:
        if not self.awq_worse:
            return f"end-to-end check: AWQ <= plain rounding: {self.figures()}"
        if not self.awq_lost:
            return (
                f"end-to-end check: AWQ and plain rounding are within the noise ({self.figures()}; "
                f"a loss counts above {GUARD_SIGMAS:g} standard errors): kept AWQ"
            )
        if self.action == "rounded":
            return (
                f"AWQ LOST TO PLAIN ROUNDING end to end ({self.figures()}): the checkpoint holds plain "
                "rounding instead (--guard warn keeps AWQ; other calibration text may help AWQ)"
            )
        return (
            f"WARNING: AWQ IS WORSE THAN PLAIN ROUNDING on this model: {self.figures()}. "
            "Kept AWQ as asked (--guard warn); --guard fallback or --method rtn gives the better model."
        )


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
    stream = source_stream(tokenizer, source)
    n = stream.numel() // seq_len
    windows = stream[: n * seq_len].reshape(n, seq_len)  # (n_windows, seq_len)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    spare = perm[n_samples : n_samples + count].sort().values
    return windows[spare].contiguous() if spare.numel() else None


def window_losses(logits: torch.Tensor, ids: torch.Tensor) -> list[float]:
    """Each window's mean loss per predicted token: ``logits`` ``[B, L, V]``, ``ids`` ``[B, L]``."""
    nll = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
    )  # (B*(L-1),)
    return nll.double().reshape(ids.shape[0], -1).mean(dim=1).tolist()


@torch.inference_mode()
def model_window_losses(model: nn.Module, windows: torch.Tensor) -> list[float]:
    """Per-window mean loss of a whole model over ``windows`` ``[n, L]`` (one window per forward)."""
    device = next(model.parameters()).device
    losses: list[float] = []
    for row in windows.split(1):
        ids = row.to(device)
        losses += window_losses(_logits(model(input_ids=ids, use_cache=False)), ids)
    return losses


def _logits(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else first_output(out)


def fake_quantize_linears(model: nn.Module, quant_config: QuantConfigLike, template: Any = None) -> None:
    """:func:`~awq_plugin.algorithm.linears.fake_quantize_decoder_linears` under ``template`` (any
    :func:`resolve_template` spec), in place."""
    fake_quantize_decoder_linears(model, resolve_template(model, template), quant_config)


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
        losses.append(model_window_losses(model, windows))
        del model
    result = GuardResult.from_windows(losses[0], losses[1], int(windows.shape[1]), text)
    (log.warning if result.awq_lost else log.info)("%s", result.message())
    return result


def copying_loader(model: nn.Module) -> Callable[[], nn.Module]:
    """A ``load_model`` for :func:`compare_with_rounding` over an in-memory model (a deep copy per call)."""
    return lambda: copy.deepcopy(model)


# ---------------------------------------------------------------------------------------------
# The streaming guard (the pipeline's): both models' held-out activations, one block at a time
# ---------------------------------------------------------------------------------------------

STREAMS = ("awq", "rtn")


@dataclass
class GuardStreams:
    """The held-out windows on their way through the decoder, as written (``awq``) and as plain
    rounding would write them (``rtn``): each stream holds one hidden-state tensor per window.

    ``captured`` holds the windows' layer-0 inputs and the keyword arguments of every layer
    (captured one window per micro-batch, so that the tail can score window by window).
    """

    windows: torch.Tensor  # [W, L] token ids
    captured: CapturedInputs
    hidden: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    output_arity: int | None = None  # a decoder layer returns a tensor (None) or a tuple this long
    # The blocks' matmuls run in this dtype, as the search's forwards do (AwqOptions.search_dtype,
    # resolved): both streams alike, the residual stream, norms and the tail's losses in float32.
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        for stream in STREAMS:
            self.hidden.setdefault(stream, list(self.captured.hidden_states))

    @torch.no_grad()
    def advance(
        self, stream: str, index: int, block: nn.Module, names: Sequence[str], quant_config: QuantConfigLike
    ) -> None:
        """Run ``stream`` through decoder layer ``index`` (``block``) with ``names`` fake-quantized."""
        inputs = self.captured.for_layer(index, self.hidden[stream])
        try:
            self.hidden[stream] = self._forward(block, inputs, names, quant_config)
        except RuntimeError as exc:
            if self.dtype == torch.float32:
                raise
            warn_float32_fallback(index, self.dtype, exc, "the guard's windows")
            self.dtype = torch.float32
            self.hidden[stream] = self._forward(block, inputs, names, quant_config)

    def _forward(
        self, block: nn.Module, inputs: BlockInputs, names: Sequence[str], quant_config: QuantConfigLike
    ) -> list[torch.Tensor]:
        outputs = []
        forwards = BlockForwards(block, inputs, self.dtype, names)
        with fake_quantized(block, names, quant_config, self.dtype), forwards.lowered():
            for hidden, kwargs in zip(inputs.hidden_states, inputs.kwargs):
                out = block(hidden, **kwargs)
                self.output_arity = len(out) if isinstance(out, (tuple, list)) else None
                outputs.append(first_output(out).to(hidden.dtype))  # the stream keeps its dtype
        return outputs

    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Tensors and metadata to store with the next block's inputs (a resumed run reloads them)."""
        tensors = {
            f"guard_{stream}.{w}": h.detach().cpu().contiguous()
            for stream in STREAMS
            for w, h in enumerate(self.hidden[stream])
        }
        return tensors, {"guard_arity": "" if self.output_arity is None else str(self.output_arity)}

    def restore(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str], device: Any) -> None:
        """The inverse of :meth:`state`."""
        for stream in STREAMS:
            self.hidden[stream] = [
                tensors[f"guard_{stream}.{w}"].to(device) for w in range(len(self.captured.hidden_states))
            ]
        arity = metadata.get("guard_arity", "")
        self.output_arity = int(arity) if arity else None

    @torch.inference_mode()
    def score(self, model: nn.Module, layers: nn.ModuleList, text: str) -> GuardResult:
        """Both streams' per-window losses through the model's tail (its non-layer weights loaded)."""
        losses = {stream: self._tail_losses(model, layers, self.hidden[stream]) for stream in STREAMS}
        return GuardResult.from_windows(losses["awq"], losses["rtn"], int(self.windows.shape[1]), text)

    def _tail_losses(
        self, model: nn.Module, layers: nn.ModuleList, finals: list[torch.Tensor]
    ) -> list[float]:
        """Run the model with its decoder layers stood in for: the last one returns the stored
        final hidden states, so the model's own tail (norm, head, soft-capping) makes the logits."""
        losses: list[float] = []
        with _replayed_layers(layers, finals, self.output_arity) as calls:
            for w, row in enumerate(self.windows.split(1)):
                ids = row.to(finals[w].device)
                logits = _logits(model(input_ids=ids, use_cache=False))
                if calls[0] != w + 1 or tuple(logits.shape[:2]) != tuple(ids.shape):
                    raise RuntimeError(
                        "the model's tail did not take the stored decoder output "
                        f"(logits {tuple(logits.shape)} for window {tuple(ids.shape)})"
                    )
                losses += window_losses(logits, ids)
        return losses


@contextmanager
def _replayed_layers(
    layers: nn.ModuleList, finals: list[torch.Tensor], arity: int | None
) -> Iterator[list[int]]:
    """Decoder layers replaced by stand-ins: pass-throughs, and a last layer that returns
    ``finals[w]`` on its ``w``-th call, shaped as the real layers' outputs (``arity``)."""
    calls = [0]

    def shaped(hidden: torch.Tensor) -> Any:
        return hidden if arity is None else (hidden, *([None] * (arity - 1)))

    def passthrough(*args: Any, **kwargs: Any) -> Any:
        return shaped(args[0] if args else kwargs["hidden_states"])

    def replay(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return shaped(finals[calls[0] - 1])

    for layer in layers[:-1]:
        layer.forward = passthrough
    layers[-1].forward = replay
    try:
        yield calls
    finally:
        for layer in layers:
            del layer.forward


class InMemoryGuard:
    """The end-to-end guard for a model held in memory: :func:`run_awq`'s block observer.

    The held-out ``windows`` stream through each block before its AWQ step (as plain
    rounding) and after it (as AWQ left it), exactly as in the pipeline; :meth:`verdict`
    scores them through the model's own tail. With ``keep_originals`` each block's
    full-precision weights are copied to the host before its step, so that
    :meth:`restore` can undo AWQ when it lost (that doubles the decoder's weights in host
    memory for the duration; the streaming pipeline re-reads its shards instead).
    """

    def __init__(
        self,
        model: nn.Module,
        resolved: ResolvedTemplate,
        quant_config: QuantConfigLike,
        windows: torch.Tensor,
        keep_originals: bool,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        model.eval()  # as run_awq runs it: no dropout in the streams
        self.layers = model.get_submodule(resolved.decoder_layers)
        self.resolved, self.quant_config = resolved, quant_config
        device = next(model.parameters()).device
        windows = windows.to(device)
        captured = capture_decoder_inputs(model, self.layers, windows, 1)
        self.streams = GuardStreams(windows, captured, dtype=dtype)
        self.originals: dict[int, dict[str, torch.Tensor]] | None = {} if keep_originals else None

    def _names(self, index: int, block: nn.Module) -> list[str]:
        return quantized_linear_names(block, self.resolved.block(index), self.quant_config)

    def before_block(self, index: int, block: nn.Module) -> None:
        if self.originals is not None:
            self.originals[index] = {
                k: v.detach().to("cpu", copy=True) for k, v in block.state_dict().items()
            }
        self.streams.advance("rtn", index, block, self._names(index, block), self.quant_config)

    def after_block(self, index: int, block: nn.Module) -> None:
        self.streams.advance("awq", index, block, self._names(index, block), self.quant_config)

    def verdict(self, model: nn.Module, text: str) -> GuardResult:
        return self.streams.score(model, self.layers, text)

    def restore(self) -> None:
        """Every block back to its full-precision weights (plain rounding follows from them)."""
        if self.originals is None:
            raise RuntimeError("the guard kept no original weights (keep_originals=False)")
        for index, state in self.originals.items():
            self.layers[index].load_state_dict(state)
