"""The knobs of the AWQ search: one frozen dataclass, the one owner of their defaults.

Torch-free, so the CLI can take its defaults from here without importing torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from awq_plugin.errors import ConfigError

PROPAGATE_CHOICES = ("fp", "quantized")
# dtypes the block's forwards may run in; "auto": bf16 where the device has bf16 units, else float32
SEARCH_DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")
# What the pipeline does when AWQ ends worse than plain rounding on held-out windows
# (awq_plugin.pipeline.guard): write rounding instead, keep AWQ and warn, or skip the check.
GUARD_MODES = ("fallback", "warn", "off")
# How each weight group's integers are chosen after the scales and clips: each weight to its
# nearest level, or GPTQ's error compensation over the block's calibration inputs
# (algorithm.compensate), kept per block only where its held-out error is lower.
ROUNDINGS = ("nearest", "compensated")
# What each block is fit to (AwqOptions.fit_to).
FIT_TO_CHOICES = ("block", "model")

# The quantizer's output version: bump it whenever the bytes written for the same source,
# request and options can change (an algorithm or format change). The quantize-on-start cache
# keys on it, so a changed quantizer never serves an entry its predecessor made.
# 2: the streaming end-to-end guard (it may write plain rounding); forwards in bf16 by default.
# 3: no weight-fingerprint switch; each block keeps AWQ, its scales alone or rounding by its
#    error on held-out micro-batches.
# 4: the guard's windows run their matmuls in the search dtype; |x| statistics summed in fp32
#    per micro-batch.
# 5: compensated rounding and quantized block inputs by default.
# 6: compensation's x^T x in the search dtype (bf16 chunks where the device has bf16 matmuls).
# 7: the compensation factor in place (its Cholesky factor on the transposed view), and linears
#    that read one input compensated in one walk: the same arithmetic to rounding, which can
#    flip a few integers on wide inputs.
# 8: compensation's corrections within a column block applied a sub-block at a time, x^T x
#    summed as upper triangles, and the clip candidates' per-group errors summed in another
#    order (the fused CPU steps): the same rounding and clips in another order, which can flip
#    near-ties.
# 9: each block fit to the full-precision model's outputs (fit_to="model") by default.
# 10: true-sequential compensation (sequential=True) by default.
QUANTIZER_VERSION = 10

# Options earlier releases had; saved results that carry them still load (the value is ignored).
RETIRED_OPTIONS = frozenset({"prior_awq_share"})


@dataclass(frozen=True)
class AwqOptions:
    """Knobs of the AWQ search. The defaults are the measured best on SmolLM2-135M (see README)."""

    n_grid: int = 20  # alpha grid points in [0, 1) for the scale search
    duo_scaling: bool = False  # s = mean|x|^a / mean|w|^(1-a) instead of mean|x|^a
    clip: bool = True  # run the clip (max-range shrink) search after scaling
    clip_grid: int = 20  # shrink grid: max * (1 - i / clip_grid)
    # Shrink a group's max and min independently (a 2-D grid) instead of the symmetric
    # [-c, c] of llm-awq; only meaningful with zero points.
    clip_asymmetric: bool = True
    # Also clip the linears a template lists in clip_skip (the q/k projections, which llm-awq
    # leaves unclipped because their error passes through the softmax).
    clip_qk: bool = True
    max_shrink: float = 0.5  # smallest range tried is max * (1 - max_shrink) (exclusive)
    # Tokens in the search loss (a fixed seeded subsample; None = all). Statistics always
    # use all tokens. Token-mixing modules (attention) are re-run on whole micro-batches
    # covering at least this many tokens.
    search_tokens: int | None = 4096
    # Tokens in the clip-search statistics (seeded subsample; None = all). The clip loss is
    # evaluated through per-group Gram matrices, so all tokens cost little.
    clip_tokens: int | None = None
    seed: int = 0  # seed of the token / micro-batch subsamples
    micro_batch_size: int = 4  # calibration sequences per forward pass (bounds activation memory)
    # Which output feeds the next block: "fp" = the block's full-precision output (llm-awq,
    # AutoAWQ), "quantized" = the output of this block with AWQ applied and weights
    # fake-quantized (computed in search_dtype), so later blocks calibrate on the inputs
    # they will see at inference (GPTQ's order). "quantized" costs one more forward of each
    # block; with compensated rounding it is what keeps compensation ahead of nearest
    # rounding across the panel (docs/results.md, "Compensated rounding").
    propagate: str = "quantized"
    # dtype of the matmuls in the block's forward passes (the recording pass, the candidate
    # scoring, the block errors) and of the clip search's Gram products: they run under
    # autocast in it, while the residual stream, norms, statistics and loss sums stay fp32 and
    # weights are always quantized from fp32. "auto": bfloat16 where the device multiplies bf16
    # in hardware (AVX-512 BF16, AMX, CUDA), else float32 (algorithm.forward_dtype). On the
    # default model (uint4 g64, 128 x 512, 1 thread, 8 held-out windows) auto (bf16 on AVX-512
    # BF16) closes 61.2% of plain rounding's gap (24.578 perplexity) against 61.4% (24.561) in
    # float32; "awq-plugin bench block-cost" measures the time it saves.
    search_dtype: str = "auto"
    # MoE: an expert routed fewer calibration tokens than this in a block is calibrated on every
    # token reaching its MoE block instead (statistics, search rows and clip statistics), with a
    # warning naming it. Routing itself is unchanged; see awq_block_step.
    expert_min_tokens: int = 16
    # Outlier tokens in the search loss and the block error: a token whose full-precision output
    # has more than this many times the median token's squared norm counts by its relative error
    # (see search.token_loss_weights). Attention-sink tokens with "massive activations" otherwise
    # own 97-100% of the MSE in some blocks (Qwen2.5, SmolLM2), and the scales are tuned for them
    # alone. None: plain MSE over all tokens (llm-awq).
    outlier_token_ratio: float | None = None
    # See ROUNDINGS. "compensated" accumulates each linear's x^T x in the recording pass and
    # solves one Cholesky per linear; "nearest" with propagate="fp" is the fast setting.
    rounding: str = "compensated"
    # Compensated rounding's column order: GPTQ's act-order (the inputs by decreasing second
    # moment, the groups kept where they are: "static groups", so the checkpoint layout is
    # unchanged) instead of index order; "auto": each block walks both orders and keeps the one
    # with the lower held-out error (one more walk and one more held-out forward per block).
    act_order: bool | str = False
    # What each block's error is measured against, and what compensated rounding fits: "model",
    # the full-precision model's own block output (GPTAQ's asymmetric calibration, Li et al.,
    # ICML 2025), so that the linears reading the block's input also work off what the blocks
    # before them got wrong, or "block", the full-precision block's output on the quantized
    # inputs (GPTQ). "model" carries the full-precision hidden states beside the quantized ones:
    # one more forward of each block (1.17x the time on the default model). It closed 5-9 more
    # points of rounding's gap on every panel row it ran on (docs/results.md, "Fitting the
    # full-precision model"). With propagate="fp" the block's inputs are the model's: the two
    # are one.
    fit_to: str = "model"
    # Compensated rounding, true-sequential: each run of linears after the first (o_proj, then
    # gate/up, then down_proj in a Llama block) is fitted on its inputs recorded again with the
    # linears before it rounded, against the inputs the target (fit_to) gives it, so that it
    # works off what those got wrong. One partial forward per run; the target stream's inputs
    # of those linears are kept from the recording pass (tokens x their input widths, per block).
    # On by default since quantizer version 10: it won on two of the three panel models (by 2-52
    # points of rounding's gap) and tied on the third, for 1.4x the time (docs/results.md,
    # "Fitting the full-precision model").
    sequential: bool = True
    # Compensated rounding: after the linears a norm feeds are walked (q/k/v, gate/up), the norm's
    # per-channel weight is refit in closed form so that their rounded outputs come closest to
    # the walk's target (algorithm.norm_fit); kept with the walk where the held-out error says so.
    fit_norms: bool = False
    # Compensated rounding: passes of coordinate descent over each walk's result (QuantEase):
    # every column in turn moved to the level nearest its least-squares optimum with the others
    # fixed. Each pass takes about as long again as the walk (4096 x 4096, 1 thread: 3.7 s, 7.0 s
    # with one pass, 9.5 s with two) and holds one more [K, K] matrix beside the factor while a
    # walk runs; 0: the walk's rounding as it ends. Not the default: one pass gained within the
    # noise on the panel, three lost (docs/results.md, "Coordinate descent after the walk").
    refine_passes: int = 0

    def __post_init__(self) -> None:
        if self.n_grid < 1 or self.clip_grid < 1:
            raise ConfigError(f"n_grid and clip_grid must be >= 1, got {self.n_grid} and {self.clip_grid}")
        if not 0.0 <= self.max_shrink < 1.0:
            raise ConfigError(f"max_shrink must be in [0, 1), got {self.max_shrink}")
        for name in ("search_tokens", "clip_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be a positive token count or None (all), got {value}")
        if self.micro_batch_size < 1:
            raise ConfigError(f"micro_batch_size must be >= 1, got {self.micro_batch_size}")
        if isinstance(self.expert_min_tokens, bool) or self.expert_min_tokens < 1:
            raise ConfigError(
                f"expert_min_tokens must be >= 1 (an expert with no tokens has no statistics), "
                f"got {self.expert_min_tokens}"
            )
        if self.outlier_token_ratio is not None and not self.outlier_token_ratio >= 1.0:
            raise ConfigError(f"outlier_token_ratio must be >= 1 or None, got {self.outlier_token_ratio}")
        if self.search_dtype not in SEARCH_DTYPE_NAMES:
            raise ConfigError(
                f"search_dtype must be one of {sorted(SEARCH_DTYPE_NAMES)}, got {self.search_dtype!r}"
            )
        if not isinstance(self.act_order, bool) and self.act_order != "auto":
            raise ConfigError(f"act_order must be True, False or 'auto', got {self.act_order!r}")
        for name in ("sequential", "fit_norms"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if (
            isinstance(self.refine_passes, bool)
            or not isinstance(self.refine_passes, int)
            or self.refine_passes < 0
        ):
            raise ConfigError(f"refine_passes must be a whole number >= 0, got {self.refine_passes!r}")
        if self.rounding not in ROUNDINGS:
            raise ConfigError(f"rounding must be one of {list(ROUNDINGS)}, got {self.rounding!r}")
        if self.propagate not in PROPAGATE_CHOICES:
            raise ConfigError(f"propagate must be one of {PROPAGATE_CHOICES}, got {self.propagate!r}")
        if self.fit_to not in FIT_TO_CHOICES:
            raise ConfigError(f"fit_to must be one of {list(FIT_TO_CHOICES)}, got {self.fit_to!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AwqOptions:
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in data.items() if k not in RETIRED_OPTIONS}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown AWQ option(s) {unknown}; known: {sorted(known)}")
        return cls(**data)
