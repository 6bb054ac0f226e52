"""The adaptive scale's operators (bucket_statistic, adaptive_scale_update) against the plain-torch
implementation they replace (adaptive_scale_reference.py), bit for bit: medians, seeding, the EMA, the clamp,
refusals, skipped steps and the counters; their argument checks, opcheck, and state that a poisoned statistic
cannot corrupt."""

import pytest
import torch

import adaptive_scale_reference as reference
from robust_diffusion.adaptive_scale import MAX_UPDATE_RATIO, PENALTY_FLOOR

OPS = torch.ops.robust_diffusion


def penalties(batch, buckets, seed, dtype=torch.float32):
    """Penalties over several decades, with ties, and buckets with even, odd and no members."""
    g = torch.Generator().manual_seed(seed)
    values = torch.exp(torch.randn(batch, generator=g, dtype=torch.float64) * 3)
    values[batch // 3] = values[0]  # a tie
    return values.to(dtype), torch.randint(0, buckets - 1, (batch,), generator=g)  # the last bucket stays empty


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("batch", [1, 2, 7, 64, 301])
def test_statistic_is_the_reference_bit_for_bit(dtype, batch, device):
    for seed in range(3):
        penalty, bucket = penalties(batch, 6, seed, dtype)
        expected = reference.as_statistic(*reference.bucket_medians(penalty, bucket, 6, PENALTY_FLOOR))
        got = OPS.bucket_statistic(penalty.to(device), bucket.to(device), 6, PENALTY_FLOOR)
        assert got.dtype == torch.float32 and got.shape == (13,)
        assert torch.equal(got.cpu(), expected), (seed, got, expected)


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_penalty_refuses_the_whole_batch(poison, device):
    penalty, bucket = penalties(16, 4, seed=0)
    penalty[5] = poison
    got = OPS.bucket_statistic(penalty.to(device), bucket.int().to(device), 4, PENALTY_FLOOR).cpu()
    assert torch.equal(got, torch.tensor([0.0] * 8 + [1.0]))


def test_medians_below_the_floor_are_dropped_and_a_batch_left_with_none_is_refused(device):
    penalty = torch.tensor([0.0, 0.0, 0.0, 2.0, 3.0, 1e-13])
    bucket = torch.tensor([0, 0, 1, 1, 1, 2])
    got = OPS.bucket_statistic(penalty.to(device), bucket.to(device), 3, PENALTY_FLOOR).cpu()
    assert torch.equal(got, torch.tensor([0.0, 2.0, 0.0, 0.0, 1.0, 0.0, 0.0]))
    nothing = OPS.bucket_statistic(torch.zeros(4, device=device), torch.arange(4, device=device), 4, PENALTY_FLOOR)
    assert torch.equal(nothing.cpu(), torch.tensor([0.0] * 8 + [1.0]))


def fresh_state(buckets, device="cpu", values=None):
    return {"bucket_penalty": (torch.ones(buckets) if values is None else values.clone()).to(device),
            "initialized": torch.zeros((), dtype=torch.bool, device=device),
            "skipped_updates": torch.zeros((), dtype=torch.int64, device=device),
            "limited_updates": torch.zeros((), dtype=torch.int64, device=device)}


def call_update(state, statistic, ok, momentum=0.9):
    ok = None if ok is None else torch.tensor(ok, device=statistic.device)
    OPS.adaptive_scale_update(state["bucket_penalty"], state["initialized"], state["skipped_updates"],
                              state["limited_updates"], statistic, ok, momentum, MAX_UPDATE_RATIO, PENALTY_FLOOR)


@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.9, 0.999])
def test_updates_are_the_reference_bit_for_bit(momentum, device):
    """A run of statistics: seeding (buckets it lacks take the median over buckets), EMA updates, clamped jumps
    (x1000), staged sums of several passes, refused batches and skipped steps."""
    K = 7
    g = torch.Generator().manual_seed(5)
    ours, theirs = fresh_state(K, device), fresh_state(K)
    for step in range(40):
        penalty, bucket = penalties(int(torch.randint(1, 40, (1,), generator=g)), K, seed=step)
        if step % 9 == 4:
            penalty = penalty * 1000  # clamped upward
        statistic = reference.as_statistic(*reference.bucket_medians(penalty, bucket, K, PENALTY_FLOOR))
        if step % 5 == 2:  # staged: the sum of three passes' statistics
            for extra in (1, 2):
                more, more_bucket = penalties(9, K, seed=100 * step + extra)
                statistic = statistic + reference.as_statistic(*reference.bucket_medians(more, more_bucket, K,
                                                                                           PENALTY_FLOOR))
        if step % 11 == 3:
            statistic = reference.as_statistic(torch.full((K,), float("nan")), torch.tensor(1))  # refused
        ok = [None, True, False][step % 3] if step > 0 else None
        reference.update(theirs, statistic, ok, momentum, MAX_UPDATE_RATIO, PENALTY_FLOOR)
        call_update(ours, statistic.to(device), ok, momentum)
        for name in theirs:
            assert torch.equal(ours[name].cpu(), theirs[name]), (step, name, ours[name], theirs[name])
    assert int(theirs["limited_updates"]) > 0 and int(theirs["skipped_updates"]) > 0


def test_a_skipped_first_step_leaves_the_state_unseeded(device):
    state = fresh_state(3, device)
    statistic = torch.tensor([2.0, 0.0, 4.0, 1.0, 0.0, 1.0, 0.0], device=device)
    call_update(state, statistic, False)
    assert not bool(state["initialized"]) and int(state["skipped_updates"]) == 1
    assert torch.equal(state["bucket_penalty"].cpu(), torch.ones(3))
    call_update(state, statistic, True)  # seeds; bucket 1 takes the lower median over buckets (2)
    assert bool(state["initialized"]) and torch.equal(state["bucket_penalty"].cpu(), torch.tensor([2.0, 2.0, 4.0]))


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf"), -5.0, 3e38])
def test_a_poisoned_statistic_never_makes_the_state_non_finite_or_below_the_floor(poison, device):
    """A statistic from a corrupted all-reduce or a user's own code: the state stays finite, at least the floor,
    and moves by at most the clamp."""
    state = fresh_state(4, device, values=torch.tensor([1.0, 2.0, 3.0, 4.0]))
    state["initialized"].fill_(True)
    statistic = torch.tensor([poison, poison, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0], device=device)
    call_update(state, statistic, None)
    value = state["bucket_penalty"].cpu()
    assert torch.isfinite(value).all() and (value >= PENALTY_FLOOR).all(), value
    assert (value <= torch.tensor([1.0, 2.0, 3.0, 4.0]) * (0.9 + 0.1 * MAX_UPDATE_RATIO) * (1 + 1e-6)).all(), value


def test_bucket_out_of_range_is_refused_on_the_cpu():
    with pytest.raises(ValueError, match=r"bucket_statistic: bucket must lie in \[0, 3\) \(num_buckets\), got values "
                                         r"in \[0, 3\]"):
        OPS.bucket_statistic(torch.ones(4), torch.tensor([0, 1, 2, 3]), 3, PENALTY_FLOOR)


def _state(k=3):
    s = fresh_state(k)
    return [s["bucket_penalty"], s["initialized"], s["skipped_updates"], s["limited_updates"], torch.zeros(2 * k + 1)]


BAD_UPDATES = [
    (lambda a: a.__setitem__(0, torch.ones(3, dtype=torch.float64)), TypeError, r"bucket_penalty must be float32"),
    (lambda a: a.__setitem__(1, torch.zeros(1, dtype=torch.bool)), ValueError, r"initialized must be a 0-dim tensor"),
    (lambda a: a.__setitem__(2, torch.zeros((), dtype=torch.int32)), TypeError, r"skipped_updates must be Long"),
    (lambda a: a.__setitem__(4, torch.zeros(6)), ValueError, r"statistic must be bucket_statistic's \[2 \* 3 \+ 1\]"),
]


@pytest.mark.parametrize("corrupt, error, message", BAD_UPDATES, ids=["penalty dtype", "initialized shape",
                                                                     "counter dtype", "statistic shape"])
@pytest.mark.parametrize("path", ["cpu", "meta"])
def test_update_arguments_are_checked_by_name(corrupt, error, message, path):
    args = _state()
    corrupt(args)
    args = [a.to(path) for a in args]
    with pytest.raises(error, match="adaptive_scale_update: " + message):
        OPS.adaptive_scale_update(*args, None, 0.9, MAX_UPDATE_RATIO, PENALTY_FLOOR)


@pytest.mark.parametrize("call, error, message", [
    (lambda: OPS.adaptive_scale_update(*_state(), torch.tensor(1.0), 0.9, 2.0, 1e-12), TypeError, r"ok must be a bool"),
    (lambda: OPS.adaptive_scale_update(*_state(), None, 1.0, 2.0, 1e-12), ValueError, r"momentum must lie in \[0, 1\)"),
    (lambda: OPS.adaptive_scale_update(*_state(), None, 0.9, 0.5, 1e-12), ValueError, r"max_ratio must be finite"),
    (lambda: OPS.bucket_statistic(torch.ones(4), torch.zeros(4), 3, 1e-12), TypeError, r"bucket must be int32 or int64"),
    (lambda: OPS.bucket_statistic(torch.ones(4, 1), torch.zeros(4, dtype=torch.long), 3, 1e-12), ValueError,
     r"penalty must be 1-D"),
    (lambda: OPS.bucket_statistic(torch.ones(4), torch.zeros(3, dtype=torch.long), 3, 1e-12), ValueError,
     r"bucket must have one value per sample of penalty, shape \[4\], got shape \[3\]"),
    (lambda: OPS.bucket_statistic(torch.ones(4), torch.zeros(4, dtype=torch.long), 0, 1e-12), ValueError,
     r"num_buckets must be positive"),
    (lambda: OPS.bucket_statistic(torch.ones(4, requires_grad=True), torch.zeros(4, dtype=torch.long), 3, 1e-12),
     RuntimeError, r"penalty requires grad, but bucket_statistic has no gradient"),
])
def test_other_bad_arguments_name_themselves(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_opcheck(device):
    penalty, bucket = penalties(12, 4, seed=1)
    torch.library.opcheck(OPS.bucket_statistic.default, (penalty.to(device), bucket.to(device), 4, PENALTY_FLOOR))
    statistic = OPS.bucket_statistic(penalty.to(device), bucket.to(device), 4, PENALTY_FLOOR)
    for ok in (None, torch.tensor(False, device=device)):
        s = fresh_state(4, device)
        torch.library.opcheck(OPS.adaptive_scale_update.default,
                              (s["bucket_penalty"], s["initialized"], s["skipped_updates"], s["limited_updates"],
                               statistic, ok, 0.9, MAX_UPDATE_RATIO, PENALTY_FLOOR))


def test_the_update_bumps_the_version_of_the_state_it_changes():
    s = fresh_state(3)
    before = [t._version for t in s.values()]
    call_update(s, torch.tensor([1.0, 0, 0, 1, 0, 0, 0]), None)
    assert all(t._version > v for t, v in zip(s.values(), before))
