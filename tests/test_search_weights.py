"""The scale search's loss is not owned by a few outlier tokens (issue 19).

Attention-sink tokens carry "massive activations": on Qwen2.5-0.5B the first
token of each window held 97-98% of the MLP output's squared norm in layers 2-3
(SmolLM2-135M: 100% in layer 11), so a plain MSE tuned the scales for them alone.
"""

from __future__ import annotations

import pytest
import torch

from awq_plugin.algorithm.awq import AwqOptions
from awq_plugin.algorithm.search import token_loss_weights, weighted_output_mse
from awq_plugin.errors import ConfigError


def _outputs_with_a_sink(seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    y = torch.randn(2, 64, 16, generator=gen)  # (B, T, H)
    y[:, 0] *= 300.0  # the sink: 9e4 times a normal token's squared norm
    return y


def test_normal_tokens_keep_weight_one_and_the_sink_counts_by_relative_error() -> None:
    y = _outputs_with_a_sink()
    (w,) = token_loss_weights([y], outlier_ratio=16.0)
    assert w.shape == (2, 64)
    assert torch.all(w[:, 1:] == 1.0)
    assert torch.all(w[:, 0] < 1e-3)
    # The same relative error on every token: the sink now weighs at most 16 median tokens.
    noisy = y * 1.01
    per_token = (noisy - y).pow(2).sum(-1) * w
    median = per_token[:, 1:].median()
    assert per_token[:, 0].max() <= 16.0 * median * 1.5


def test_plain_mse_owned_by_the_sink_is_not_when_weighted() -> None:
    y = _outputs_with_a_sink()
    hurt_normal = y.clone()
    hurt_normal[:, 1:] += 0.5  # a large error on every normal token
    hurt_sink = y.clone()
    hurt_sink[:, 0] *= 1.05  # a 5% error on the sink only
    plain = [weighted_output_mse([o], [y], None) for o in (hurt_normal, hurt_sink)]
    assert plain[1] > plain[0]  # plain MSE prefers ruining every normal token
    weights = token_loss_weights([y], 16.0)
    weighted = [weighted_output_mse([o], [y], weights) for o in (hurt_normal, hurt_sink)]
    assert weighted[0] > weighted[1]


def test_no_ratio_is_the_plain_mean_squared_error() -> None:
    y = _outputs_with_a_sink()
    out = y + 0.1 * torch.randn_like(y)
    assert token_loss_weights([y], None) is None
    expected = float((out - y).pow(2).mean(dtype=torch.float64))
    # each token's squared error summed in fp32 (H terms), the tokens in fp64
    assert weighted_output_mse([out], [y], None) == pytest.approx(expected, rel=1e-6)


def test_outlier_ratio_below_one_is_refused() -> None:
    with pytest.raises(ConfigError, match="outlier_token_ratio"):
        AwqOptions(outlier_token_ratio=0.5)
