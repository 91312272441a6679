"""Sampler: greedy, filters, distributions, per-request seeds independent of the batch, logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from pdserve.engine.sampler import Sampler, SamplerError
from pdserve.engine.sampling_params import SamplingParams

pytestmark = pytest.mark.unit

V = 6


def logits_rows(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, V, generator=torch.Generator().manual_seed(seed)) * 2


def test_greedy_is_argmax_first_index_on_ties() -> None:
    s = Sampler()
    x = torch.tensor([[0.0, 3.0, 3.0, 1.0, 0.0, 0.0], [5.0, 0.0, 0.0, 0.0, 0.0, 9.0]])
    out = s.sample(x, [SamplingParams(temperature=0)] * 2, [None, None])
    assert out.token_ids == [1, 5] and out.logprobs == [None, None]


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.5, top_k=1),
        SamplingParams(temperature=1.0, top_p=1e-6),
        SamplingParams(temperature=2.0, min_p=1.0),
    ],
)
def test_filters_that_leave_one_token_act_greedy(params: SamplingParams) -> None:
    x = logits_rows(16, seed=3)
    out = Sampler(seed=1).sample(x, [params] * 16, [None] * 16)
    assert out.token_ids == x.argmax(-1).tolist()


def empirical(params: SamplingParams, row: torch.Tensor, n: int = 20000) -> torch.Tensor:
    out = Sampler(seed=5).sample(row.expand(n, V).contiguous(), [params] * n, [None] * n)
    return torch.bincount(torch.tensor(out.token_ids), minlength=V).float() / n


def test_temperature_distribution_matches_softmax() -> None:
    row = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0, 0.2])
    for temp in (1.0, 0.5, 2.0):
        freq = empirical(SamplingParams(temperature=temp), row)
        assert torch.allclose(freq, torch.softmax(row / temp, -1), atol=0.015), temp


def test_top_k_top_p_min_p_restrict_support_and_renormalise() -> None:
    row = torch.log(torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04]))
    freq = empirical(SamplingParams(top_k=2), row)
    assert torch.allclose(freq, torch.tensor([0.4, 0.25, 0, 0, 0, 0]) / 0.65, atol=0.015)
    freq = empirical(SamplingParams(top_p=0.7), row)  # smallest set with mass >= 0.7: first three
    assert torch.allclose(freq, torch.tensor([0.4, 0.25, 0.15, 0, 0, 0]) / 0.8, atol=0.015)
    freq = empirical(SamplingParams(min_p=0.3), row)  # keep p >= 0.12
    assert torch.allclose(freq, torch.tensor([0.4, 0.25, 0.15, 0, 0, 0]) / 0.8, atol=0.015)
    freq = empirical(SamplingParams(top_k=3, top_p=0.6), row)  # top-p over the top-3 renormalised
    assert (freq[2:] == 0).all() and freq[1] > 0


def test_seeded_rows_do_not_depend_on_the_batch() -> None:
    x = logits_rows(5, seed=11)
    p_seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=42)
    s = Sampler(seed=0)
    gen_a = s.new_generator(42)
    seq_alone = [s.sample(x[2:3], [p_seeded], [gen_a]).token_ids[0] for _ in range(30)]
    # same request inside mixed batches (other seeded, unseeded and greedy rows), at another row
    s2 = Sampler(seed=123)
    gen_b, gen_other = s2.new_generator(42), s2.new_generator(7)
    params = [
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=0),
        p_seeded,
        SamplingParams(seed=7),
    ]
    rows = torch.stack([x[0], x[1], x[2], x[3]])
    seq_batched = [s2.sample(rows, params, [None, None, gen_b, gen_other]).token_ids[2] for _ in range(30)]
    assert seq_batched == seq_alone
    assert len(set(seq_alone)) > 1  # it really samples


def test_skip_advances_like_one_sampling_step() -> None:
    x = logits_rows(1, seed=2)
    p = SamplingParams(temperature=1.0, seed=3)
    s = Sampler()
    g1, g2 = s.new_generator(3), s.new_generator(3)
    s.sample(x, [p], [g1])
    s.skip(p, g2, V)
    a = [s.sample(x, [p], [g1]).token_ids[0] for _ in range(20)]
    b = [s.sample(x, [p], [g2]).token_ids[0] for _ in range(20)]
    assert a == b


def test_logprobs_are_raw_log_softmax_with_sorted_top() -> None:
    x = logits_rows(3, seed=4)
    params = [
        SamplingParams(temperature=0, logprobs=3),
        SamplingParams(temperature=0.5, logprobs=0),
        SamplingParams(temperature=0),
    ]
    out = Sampler().sample(x, params, [None] * 3, force_logprob=[False, False, True])
    ref = torch.log_softmax(x, -1)
    lp0, lp1, lp2 = out.logprobs
    assert lp0 is not None and lp1 is not None and lp2 is not None
    assert math.isclose(lp0.logprob, ref[0, out.token_ids[0]].item(), rel_tol=1e-5)
    assert [t for t, _ in lp0.top] == ref[0].argsort(descending=True)[:3].tolist()
    assert all(a[1] >= b[1] for a, b in zip(lp0.top, lp0.top[1:], strict=False))
    # temperature does not change the reported numbers (vLLM's raw_logprobs convention)
    assert math.isclose(lp1.logprob, ref[1, out.token_ids[1]].item(), rel_tol=1e-5) and lp1.top == []
    assert lp2.top == [] and math.isclose(lp2.logprob, ref[2].max().item(), rel_tol=1e-5)


def test_shape_mismatch_raises() -> None:
    with pytest.raises(SamplerError):
        Sampler().sample(logits_rows(2), [SamplingParams()], [None])
    assert Sampler().sample(torch.empty(0, V), [], []).token_ids == []
