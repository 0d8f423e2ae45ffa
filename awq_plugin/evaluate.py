"""Perplexity of a causal language model on fixed token windows."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float  # exp(mean negative log-likelihood per predicted token)
    nll: float  # mean negative log-likelihood per predicted token (nats)
    tokens: int  # predicted tokens: windows x (seq_len - 1)
    windows: int
    seq_len: int
    # Each window's mean negative log-likelihood per predicted token (nats), in window order:
    # two models scored on the same windows compare by their paired differences.
    window_nll: tuple[float, ...] = ()

    def to_dict(self) -> dict[str, float | int | list[float]]:
        out = asdict(self)
        out["window_nll"] = list(self.window_nll)
        return out


def paired_difference(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Mean of ``a - b`` over paired windows and its standard error (``nan`` for one window)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired windows needed, got {len(a)} and {len(b)}")
    diff = [x - y for x, y in zip(a, b)]
    mean = math.fsum(diff) / len(diff)
    if len(diff) < 2:
        return mean, math.nan
    var = math.fsum((d - mean) ** 2 for d in diff) / (len(diff) - 1)
    return mean, math.sqrt(var / len(diff))


@torch.inference_mode()
def perplexity(
    model: torch.nn.Module,
    windows: torch.Tensor,
    batch_size: int = 1,
    progress: bool = True,
    desc: str = "perplexity",
) -> PerplexityResult:
    """Perplexity over ``windows`` ``[n, L]``: every window is scored independently.

    Each window predicts its tokens 1..L-1 from the ones before; the loss is
    summed in fp64 so that the result does not depend on the batch size.
    """
    model.eval()
    n, seq_len = windows.shape
    device = next(model.parameters()).device
    total_nll = 0.0
    total_tokens = 0
    window_nll: list[float] = []
    for start in tqdm(range(0, n, batch_size), desc=desc, disable=not progress, unit="batch"):
        ids = windows[start : start + batch_size].to(device)  # (B, L)
        logits = model(input_ids=ids).logits.float()  # (B, L, V)
        nll = F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]),  # (B*(L-1), V)
            ids[:, 1:].reshape(-1),
            reduction="none",
        ).reshape(ids.shape[0], -1)  # (B, L-1)
        per_window = nll.double().sum(dim=1)  # (B,)
        window_nll.extend((per_window / (seq_len - 1)).tolist())
        total_nll += float(per_window.sum())
        total_tokens += ids[:, 1:].numel()
    mean_nll = total_nll / total_tokens
    return PerplexityResult(
        ppl=math.exp(mean_nll),
        nll=mean_nll,
        tokens=total_tokens,
        windows=n,
        seq_len=seq_len,
        window_nll=tuple(window_nll),
    )
