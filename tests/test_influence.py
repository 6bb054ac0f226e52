"""rd.InfluenceTracker: per-sample influence statistics, poison cases, its state, DDP, and the Trainer's use of it."""

import math
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils.data import TensorDataset

import robust_diffusion as rd
from conftest import DEVICES, subprocess_pythonpath
from robust_diffusion.training.data import contaminate
from robust_diffusion.training.experiment import build_model
from robust_diffusion.training.checkpoint import save_state
from robust_diffusion.training.trainer import TrainConfig, Trainer
from robust_diffusion.training.trainer_checkpoint import CHECKPOINT_KIND, CHECKPOINT_NAME, CHECKPOINT_VERSION, read_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")
NAN = math.nan


def _tracker(n=6, buckets=2, steps=10, **kwargs):
    return rd.InfluenceTracker(n, num_buckets=buckets, num_timesteps=steps, **kwargs)


def _filled():
    tracker = _tracker()
    tracker.update(torch.tensor([0, 1, 2, 3]), torch.tensor([0.5, 1.0, 0.2, 0.9]), torch.tensor([1.0, 0.5, 3.0, 0.7]),
                   torch.tensor([0, 9, 4, 5]))
    tracker.update(torch.tensor([0, 2, 2]), torch.tensor([0.7, 0.4, 0.3]), torch.tensor([2.0, 1.0, 2.0]),
                   torch.tensor([8, 1, 7]))
    return tracker


# ---------------------------------------------------------------------------------------------- statistics
def test_means_counts_buckets_and_ranking():
    tracker = _filled()
    mean, penalty, count = tracker.mean_influence(), tracker.mean_penalty(), tracker.counts()
    assert mean.dtype == torch.float64 and count.dtype == torch.int64 and mean.device.type == "cpu"
    torch.testing.assert_close(mean[:4], torch.tensor([0.6, 1.0, 0.3, 0.9], dtype=torch.float64))
    torch.testing.assert_close(penalty[:4], torch.tensor([1.5, 0.5, 2.0, 0.7], dtype=torch.float64))
    assert count.tolist() == [2, 1, 3, 1, 0, 0] and math.isnan(mean[4]) and math.isnan(penalty[5])
    # Buckets: t in [0, 5) -> 0, [5, 10) -> 1; a sample drawn twice in one batch counts twice.
    assert tracker.counts(per_bucket=True).tolist() == [[1, 1], [0, 1], [2, 1], [0, 1], [0, 0], [0, 0]]
    per_bucket = tracker.mean_influence(per_bucket=True)
    torch.testing.assert_close(per_bucket[2], torch.tensor([0.3, 0.3], dtype=torch.float64))
    assert per_bucket.shape == (6, 2) and math.isnan(per_bucket[1, 0])
    # Least trusted first; never-seen samples last, in index order.
    assert tracker.ranking().tolist() == [2, 0, 3, 1, 4, 5]
    rows = tracker.table()
    assert [r["rank"] for r in rows] == [1, 2, 3, 4, 5, 6] and [r["index"] for r in rows] == [2, 0, 3, 1, 4, 5]
    assert rows[0] == {"rank": 1, "index": 2, "mean_influence": pytest.approx(0.3), "mean_penalty": pytest.approx(2.0),
                       "times_seen": 3}
    assert rows[-1]["times_seen"] == 0 and math.isnan(rows[-1]["mean_influence"])


def test_ties_are_broken_by_the_higher_penalty_then_the_index():
    tracker = _tracker(4, buckets=1)
    tracker.update([0, 1, 2, 3], torch.ones(4), torch.tensor([1.0, 3.0, 2.0, 3.0]))
    assert tracker.ranking().tolist() == [1, 3, 2, 0]


def test_it_takes_the_losses_outputs():
    schedule = rd.NoiseSchedule.linear(100)
    criterion = rd.RobustDiffusionLoss("ned", schedule, scale=1.0)
    tracker = rd.InfluenceTracker(20, num_timesteps=100)
    torch.manual_seed(0)
    x, y = torch.randn(8, 1, 4, 4), torch.randn(8, 1, 4, 4) * 0.3
    y[0] += 10  # an outlier
    t, indices = torch.randint(0, 100, (8,)), torch.arange(8) * 2
    criterion(x, y, t)
    tracker.update(indices, criterion.last_influence, criterion.last_penalty, t)
    tracker.update(indices + 1, rd.influence_weights(x, y, t, divergence="ned", schedule=schedule), t=t)
    assert tracker.ranking()[:2].tolist() == [0, 1]  # the outlier twice (a tie: the one with a penalty first)
    assert tracker.counts().sum() == 16 and tracker.counts()[16:].sum() == 0
    assert torch.isnan(tracker.mean_penalty()[1::2]).all()  # no penalty given for those


def test_buckets_match_the_adaptive_scale():
    criterion = rd.RobustDiffusionLoss("hellinger", rd.NoiseSchedule.linear(1000))
    tracker = rd.InfluenceTracker(1000)
    t = torch.arange(1000)
    tracker.update(t, torch.ones(1000), t=t)
    bucket_of = tracker.counts(per_bucket=True).argmax(1)
    assert torch.equal(bucket_of, criterion.buckets(t))


# ---------------------------------------------------------------------------------------------- poison
def test_non_finite_weights_and_penalties_are_not_counted():
    tracker = _tracker(3)
    tracker.update([0, 1, 2], torch.tensor([NAN, math.inf, 0.5]), torch.tensor([1.0, NAN, -math.inf]), [1, 2, 3])
    tracker.update([0, 1, 2], torch.tensor([0.8, 0.6, 0.7]), torch.tensor([2.0, 3.0, 4.0]), [6, 7, 8])
    assert tracker.counts().tolist() == [1, 1, 2]
    torch.testing.assert_close(tracker.mean_influence(), torch.tensor([0.8, 0.6, 0.6], dtype=torch.float64))
    torch.testing.assert_close(tracker.mean_penalty(), torch.tensor([1.5, 3.0, 4.0], dtype=torch.float64))
    assert all(torch.isfinite(getattr(tracker, name)).all() for name, _ in tracker.named_buffers())


@pytest.mark.parametrize("call, message", [
    (lambda tr: tr.update([0, 6], torch.ones(2), t=[1, 1]), r"indices must lie in \[0, 6\) .*got values in \[0, 6\]"),
    (lambda tr: tr.update([-1, 2], torch.ones(2), t=[1, 1]), r"indices must lie in \[0, 6\).*\[-1, 2\]"),
    (lambda tr: tr.update(torch.zeros(2, 1, dtype=torch.long), torch.ones(2), t=[1, 1]),
     r"indices must be a 1-D tensor, got shape \[2, 1\]"),
    (lambda tr: tr.update(torch.tensor([0.0, 1.0]), torch.ones(2), t=[1, 1]), r"indices must hold integers"),
    (lambda tr: tr.update(torch.tensor([True, False]), torch.ones(2), t=[1, 1]), r"indices must hold integers"),
    (lambda tr: tr.update([0, 1], torch.ones(3), t=[1, 1]), r"influence must be a 1-D tensor of 2 entries.*\[3\]"),
    (lambda tr: tr.update([0, 1], torch.ones(2, 1), t=[1, 1]), r"influence must be a 1-D tensor of 2 entries"),
    (lambda tr: tr.update([0, 1], torch.ones(2, dtype=torch.long), t=[1, 1]), r"influence must be a floating tensor"),
    (lambda tr: tr.update([0, 1], torch.ones(2), torch.ones(1), t=[1, 1]), r"penalty must be a 1-D tensor of 2"),
    (lambda tr: tr.update([0, 1], torch.ones(2), t=[1, 10]), r"t must lie in \[0, 10\).*\[1, 10\]"),
    (lambda tr: tr.update([0, 1], torch.ones(2), t=[1]), r"t must be a 1-D tensor of 2 entries"),
    (lambda tr: tr.update([0, 1], torch.ones(2), t=torch.tensor([0.5, 1.0])), r"t must hold integers"),
    (lambda tr: tr.update([0, 1], torch.ones(2)), r"t \(or bucket\) is required with num_buckets=2"),
    (lambda tr: tr.update([0, 1], torch.ones(2), t=[1, 1], bucket=[0, 1]), r"give t or bucket, not both"),
    (lambda tr: tr.update([0, 1], torch.ones(2), bucket=[0, 2]), r"bucket must lie in \[0, 2\) \(noise-level"),
    (lambda tr: tr.update([0, 1], torch.ones(2), bucket=torch.tensor([0.0, 1.0])), r"bucket must hold integers"),
], ids=["index too large", "negative index", "2-D indices", "float indices", "bool indices", "influence length",
        "2-D influence", "integer influence", "penalty length", "t too large", "t length", "float t", "no t",
        "t and bucket", "bucket too large", "float bucket"])
def test_bad_arguments_raise_one_line_errors_that_name_them(call, message):
    tracker = _tracker()
    with pytest.raises(ValueError, match=message) as error:
        call(tracker)
    assert "\n" not in str(error.value) and str(error.value).startswith("InfluenceTracker.update: ")
    assert tracker.counts().sum() == 0  # nothing was taken in


def test_a_continuous_tracker_takes_buckets_instead_of_t():
    tracker = rd.InfluenceTracker(4, num_buckets=3, num_timesteps=None)
    tracker.update([0, 1, 2, 3], torch.tensor([0.5, 1.0, 0.2, 0.9]), bucket=torch.tensor([0, 2, 2, 1]))
    assert tracker.counts(per_bucket=True).tolist() == [[1, 0, 0], [0, 0, 1], [0, 0, 1], [0, 1, 0]]
    with pytest.raises(ValueError, match=r"this tracker has no timesteps \(num_timesteps=None, a continuous "
                                         r"schedule\): pass bucket=criterion.buckets\(t\) instead of t"):
        tracker.update([0], torch.ones(1), t=[0])
    copy_ = rd.InfluenceTracker(4, num_buckets=3, num_timesteps=None)
    copy_.load_state_dict(tracker.state_dict())
    assert torch.equal(copy_.counts(per_bucket=True), tracker.counts(per_bucket=True))
    with pytest.raises(ValueError, match=r"says num_timesteps=None, this tracker has 3"):
        rd.InfluenceTracker(4, num_buckets=3, num_timesteps=3).load_state_dict(tracker.state_dict())


def test_constructor_errors():
    for kwargs, message in [(dict(num_samples=0), "num_samples must be a positive integer"),
                            (dict(num_samples=4, num_buckets=0), "num_buckets must be a positive integer"),
                            (dict(num_samples=4, num_buckets=11, num_timesteps=10), "must not exceed num_timesteps")]:
        n = kwargs.pop("num_samples")
        with pytest.raises(ValueError, match=message):
            rd.InfluenceTracker(n, **kwargs)


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a GPU")
def test_on_a_gpu_the_range_check_is_asynchronous_and_cpu_indices_are_checked_at_once():
    tracker = _tracker().cuda()
    tracker.update(torch.tensor([0, 1]), torch.ones(2, device="cuda"), t=torch.tensor([1, 2], device="cuda"))
    tracker.update(torch.tensor([2, 3], device="cuda"), torch.ones(2, device="cuda"), torch.ones(2, device="cuda"),
                   torch.tensor([1, 9], device="cuda"))
    assert tracker.counts().tolist() == [1, 1, 1, 1, 0, 0] and tracker.influence_sum.device.type == "cuda"
    with pytest.raises(ValueError, match="indices must lie in"):
        tracker.update(torch.tensor([0, 6]), torch.ones(2, device="cuda"), t=torch.tensor([1, 2], device="cuda"))


# ---------------------------------------------------------------------------------------------- state
def test_state_dict_round_trip_and_dtype_casts():
    tracker = _filled()
    other = _tracker()
    other.load_state_dict(tracker.state_dict())
    assert torch.equal(other.ranking(), tracker.ranking()) and torch.equal(other.counts(True), tracker.counts(True))
    tracker.half()
    assert all(buffer.dtype == torch.float64 for buffer in tracker.buffers())
    # Saved inside another module: the prefix is honoured.
    parent = torch.nn.Module()
    parent.tracker = _filled()
    fresh = torch.nn.Module()
    fresh.tracker = _tracker()
    fresh.load_state_dict(parent.state_dict())
    assert torch.equal(fresh.tracker.influence_sum, parent.tracker.influence_sum)


def _corrupt(key, value):
    state = _filled().state_dict()
    if value is None:
        del state[key]
    else:
        state[key] = value(state[key]) if callable(value) else value
    return state


@pytest.mark.parametrize("state, message", [
    (_corrupt("influence_sum", lambda v: v.clone().index_fill_(0, torch.tensor([1]), NAN)),
     "influence_sum holds 1 non-finite value"),
    (_corrupt("bucket_penalty_sum", lambda v: v.clone().fill_(math.inf)), "bucket_penalty_sum holds 12 non-finite"),
    (_corrupt("influence_count", lambda v: v - 5), "influence_count must hold non-negative whole numbers"),
    (_corrupt("penalty_count", lambda v: v + 0.5), "penalty_count must hold non-negative whole numbers"),
    (_corrupt("influence_sum", lambda v: v.float()), "influence_sum must be float64, got torch.float32"),
    (_corrupt("bucket_influence_count", lambda v: v[:, :1]), r"bucket_influence_count has shape \[6, 1\], this "
                                                             r"tracker needs \[6, 2\]"),
    (_corrupt("influence_sum", [1.0, 2.0]), "influence_sum must be a tensor, got list"),
    (_corrupt("penalty_sum", None), "missing key 'penalty_sum'"),
    (_corrupt("_extra_state", None), "missing key '_extra_state'"),
    (_corrupt("_extra_state", {"version": 1, "num_timesteps": 1000}), "says num_timesteps=1000, this tracker has 10"),
    ({**_filled().state_dict(), "bucket_bounds": torch.zeros(2)}, "unexpected key 'bucket_bounds'"),
], ids=["nan sum", "inf bucket sum", "negative count", "fractional count", "float32", "bucket shape", "not a tensor",
        "missing", "missing extra", "other schedule", "unexpected"])
def test_a_corrupted_state_dict_is_refused_with_a_one_line_error_naming_the_key(state, message):
    tracker = _filled()
    before = {name: buffer.clone() for name, buffer in tracker.named_buffers()}
    with pytest.raises(ValueError, match=message) as error:
        tracker.load_state_dict(state)
    assert "\n" not in str(error.value) and str(error.value).startswith("InfluenceTracker.load_state_dict: ")
    assert all(torch.equal(before[name], buffer) for name, buffer in tracker.named_buffers())  # nothing copied


def test_loading_into_a_tracker_of_another_size_is_refused():
    with pytest.raises(ValueError, match=r"influence_sum has shape \[6\], this tracker needs \[7\] \(num_samples=7, "
                                         r"num_buckets=2\): a state of another dataset"):
        _tracker(7).load_state_dict(_filled().state_dict())


# ---------------------------------------------------------------------------------------------- DDP
_DDP_SCRIPT = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    import robust_diffusion as rd
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(0)
    indices, weights, t = torch.randint(0, 10, (2, 16), generator=g), torch.rand(2, 16, generator=g), \\
        torch.randint(0, 100, (2, 16), generator=g)
    local = rd.InfluenceTracker(10, num_buckets=4, num_timesteps=100)
    local.update(indices[rank], weights[rank], weights[rank] * 2, t[rank])       # each rank sees its own half
    gathered = rd.InfluenceTracker(10, num_buckets=4, num_timesteps=100, gathered=True)
    gathered.update(indices.flatten(), weights.flatten(), weights.flatten() * 2, t.flatten())  # the global batch
    reference = rd.InfluenceTracker(10, num_buckets=4, num_timesteps=100)
    reference.update(indices.flatten(), weights.flatten(), weights.flatten() * 2, t.flatten())
    own = local.counts()
    assert not torch.equal(own, reference.counts())
    assert torch.equal(local.counts(sync=True), reference.counts())
    assert torch.equal(local.ranking(sync=True), reference.ranking())
    torch.testing.assert_close(local.mean_influence(per_bucket=True, sync=True),
                               reference.mean_influence(per_bucket=True), equal_nan=True)
    assert [row["index"] for row in local.table(sync=True)] == reference.ranking().tolist()
    assert torch.equal(gathered.counts(sync=True), reference.counts())  # gathered: sync adds nothing up twice
    assert gathered.synchronized() is gathered
    assert torch.equal(local.counts(), own)  # the local state is left as it was
    dist.destroy_process_group()
    print("ok", flush=True)
""")


def test_results_are_synchronised_across_ranks_when_asked(tmp_path):
    import os

    script = tmp_path / "ddp_tracker.py"
    script.write_text(_DDP_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(subprocess_pythonpath() + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("ok") == 2, result.stdout


# ---------------------------------------------------------------------------------------------- the Trainer
def _trainer(tmp_path, steps, loss_cls=rd.RobustDiffusionLoss):
    images = torch.rand(32, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    dataset = contaminate(images, 0.25, "noise", seed=0)
    schedule = rd.NoiseSchedule.linear(100)
    torch.manual_seed(0)
    return Trainer(build_model("micro", 1), loss_cls("ned", schedule, num_buckets=5, update="step"), dataset, schedule,
                   TrainConfig(steps=steps, batch_size=8, lr=1e-3, log_every=2, progress=False), out_dir=tmp_path)


def test_the_trainer_keeps_its_statistics_in_a_tracker(tmp_path):
    trainer = _trainer(tmp_path, steps=8).train()
    tracker = trainer.influence
    assert isinstance(tracker, rd.InfluenceTracker) and tracker.gathered and tracker.num_buckets == 5
    mean, count = trainer.average_influence()
    assert count.dtype == torch.float64 and torch.equal(count, tracker.counts().double()) and count.sum() == 64
    torch.testing.assert_close(mean, tracker.mean_influence(), equal_nan=True)
    assert torch.isfinite(tracker.mean_penalty()[count > 0]).all()  # the penalties are kept too
    assert tracker.counts(per_bucket=True).sum() == 64
    state = read_checkpoint(trainer.checkpoint_path)
    assert torch.equal(state["influence"]["influence_count"], tracker.influence_count)


def test_a_checkpoint_with_a_corrupted_tracker_state_is_refused(tmp_path):
    _trainer(tmp_path, steps=2).train()
    path = tmp_path / CHECKPOINT_NAME
    state = read_checkpoint(path)
    state["influence"]["influence_sum"][3] = NAN
    save_state(state, path, CHECKPOINT_KIND, CHECKPOINT_VERSION)
    with pytest.raises(ValueError, match=r"cannot resume from .*checkpoint.safetensors: InfluenceTracker.load_state_dict: "
                                         r"influence_sum holds 1 non-finite"):
        _trainer(tmp_path, steps=4).resume()


@pytest.mark.parametrize("key, value", [("config", [1, 2]), ("step", "10"), ("rng", {"a": 1}), (None, [1, 2])],
                         ids=["config", "step", "rng", "whole"])
def test_a_checkpoint_of_the_right_format_but_the_wrong_shape_is_refused_in_one_line(tmp_path, key, value):
    """A file that says it is a checkpoint (someone else's, edited, or from a buggy writer) but holds entries of
    other types is refused with one line before anything is loaded, not a traceback from deep in the resume."""
    _trainer(tmp_path, steps=2).train()
    path = tmp_path / CHECKPOINT_NAME
    state = read_checkpoint(path)
    save_state(value if key is None else {**state, key: value}, path, CHECKPOINT_KIND, CHECKPOINT_VERSION)
    with pytest.raises(ValueError, match=r"^cannot resume from .*checkpoint.safetensors: .*; delete it or pass "
                                         r"another --out$") as error:
        _trainer(tmp_path, steps=4).resume()
    assert len(str(error.value).splitlines()) == 1


def test_a_plain_loss_gives_weight_one_and_no_penalty(tmp_path):
    images = torch.rand(16, 1, 8, 8) * 2 - 1
    schedule = rd.NoiseSchedule.linear(50)
    torch.manual_seed(0)
    trainer = Trainer(build_model("micro", 1), lambda out, target, t: torch.nn.functional.mse_loss(out, target),
                      TensorDataset(images), schedule, TrainConfig(steps=2, batch_size=8, progress=False))
    trainer.train()
    assert trainer.influence.num_buckets == 10
    assert torch.equal(trainer.influence.mean_influence(), torch.ones(16, dtype=torch.float64))
    assert torch.isnan(trainer.influence.mean_penalty()).all()


# ---------------------------------------------------------------------------------------------- trust
def _trust_tracker():
    """Buckets of two steps each; low noise (t < 4) is buckets 0 and 1."""
    tracker = _tracker(5, buckets=4, steps=8)
    tracker.update([0, 1, 2, 3], torch.tensor([0.8, 0.4, 0.1, 0.6]), t=[0, 0, 0, 0])  # bucket 0: median 0.4
    tracker.update([0, 2, 4], torch.tensor([0.5, 0.05, 0.3]), t=[2, 3, 3])
    tracker.update([2], torch.tensor([0.15]), t=[2])  # bucket 1: means 0.5, 0.1, 0.3, median 0.3
    tracker.update([1, 2], torch.tensor([0.0, 1.0]), t=[6, 7])  # high noise: no say in the trust
    return tracker


def test_trust_is_the_draw_weighted_relative_low_noise_influence_capped_at_one():
    tracker = _trust_tracker()
    trust = tracker.trust()
    assert trust.dtype == torch.float32 and trust.shape == (5,)
    # Sample 2: one draw at 0.1 / 0.4 of bucket 0's median, two at 0.1 / 0.3 of bucket 1's. Sample 0 lies above
    # the medians (capped at 1), samples 1 and 4 at them, sample 3 above.
    expected = torch.tensor([1.0, 1.0, (0.25 + 2 * (0.1 / 0.3)) / 3, 1.0, 1.0])
    torch.testing.assert_close(trust, expected)
    # Only bucket 0 (t < 2): sample 4 was never drawn there, so it keeps trust 1.
    torch.testing.assert_close(tracker.trust(low_noise=0.25), torch.tensor([1.0, 1.0, 0.25, 1.0, 1.0]))
    # All buckets: bucket 3's median weight is 0 (samples 1 and 2 at 0 and 1), which carries no information.
    torch.testing.assert_close(tracker.trust(low_noise=1.0), expected)
    torch.testing.assert_close(tracker.trust([2, 2, 4]), expected[[2, 2, 4]])
    assert torch.equal(_tracker(3).trust(), torch.ones(3))  # nothing seen yet: everyone trusted


def test_trust_survives_poison_and_a_state_round_trip():
    tracker = _trust_tracker()
    before = tracker.trust()
    tracker.update([0, 2, 3], torch.tensor([NAN, math.inf, -math.inf]), t=[0, 1, 2])  # not counted
    assert torch.equal(tracker.trust(), before)
    zeros = _tracker(4, buckets=2, steps=4)
    zeros.update([0, 1, 2, 3], torch.zeros(4), t=[0, 0, 1, 1])  # every weight 0: no information, not distrust
    assert torch.equal(zeros.trust(), torch.ones(4))
    copy_ = _tracker(5, buckets=4, steps=8)
    copy_.load_state_dict(tracker.state_dict())
    assert torch.equal(copy_.trust(), before)
    generator = torch.Generator().manual_seed(0)
    random = _tracker(50, buckets=5, steps=20)
    for _ in range(20):
        random.update(torch.randint(0, 50, (8,), generator=generator),
                      torch.rand(8, generator=generator).pow(3), t=torch.randint(0, 20, (8,), generator=generator))
    trust = random.trust()
    assert torch.isfinite(trust).all() and (trust >= 0).all() and (trust <= 1).all() and (trust < 1).any()


@pytest.mark.parametrize("kwargs, message", [
    (dict(low_noise=0.0), r"low_noise must be a fraction of the timesteps in \(0, 1\], got 0.0"),
    (dict(low_noise=1.5), r"low_noise must be .* got 1.5"),
    (dict(low_noise=True), r"low_noise must be .* got True"),
    (dict(indices=[0, 5]), r"indices must lie in \[0, 5\) \(dataset indices\), got values in \[0, 5\]"),
    (dict(indices=torch.tensor([0.0])), r"indices must hold integers"),
    (dict(indices=torch.zeros(1, 1, dtype=torch.long)), r"indices must be a 1-D tensor"),
], ids=["zero", "above one", "bool", "index out of range", "float indices", "2-D indices"])
def test_trust_refuses_bad_arguments_in_one_line(kwargs, message):
    with pytest.raises(ValueError, match=message) as error:
        _trust_tracker().trust(**kwargs)
    assert "\n" not in str(error.value) and str(error.value).startswith("InfluenceTracker.trust: ")


class _RecordingLoss(rd.RobustDiffusionLoss):
    """Records the per-sample weight each call was given."""

    def forward(self, input, target, t, weight=None):
        self.weights = getattr(self, "weights", []) + [weight]
        return super().forward(input, target, t, weight)


def _trust_trainer(tmp_path, steps, loss="ned", **config):
    images = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.2 - 0.1
    dataset = contaminate(images, 0.25, "noise", seed=0)
    schedule = rd.NoiseSchedule.linear(100)
    torch.manual_seed(0)
    return Trainer(build_model("micro", 1), _RecordingLoss(loss, schedule, num_buckets=5, update="step"), dataset, schedule,
                   TrainConfig(steps=steps, batch_size=16, lr=2e-3, log_every=5, progress=False, **config),
                   out_dir=tmp_path)


def test_the_trainer_weights_each_sample_by_its_trust(tmp_path):
    trainer = _trust_trainer(tmp_path / "trust", 60, sample_trust=True, influence_from_step=10)
    trainer.train()
    weights = trainer.loss_fn.weights
    assert all(torch.equal(w, torch.ones(16)) for w in weights[:11])  # the tracker starts at step 10
    assert all(w.dtype == torch.float32 and ((w >= 0) & (w <= 1)).all() for w in weights)
    assert any((w < 1).any() for w in weights[11:])
    # The junk (uniform noise among near-constant images) loses the trust the clean images keep.
    trust, flags = trainer.influence.trust(), trainer.is_contaminated.cpu()
    assert trust[flags].mean() < 0.5 * trust[~flags].mean()
    # Without tracker statistics every trust is 1 and the run is the plain one, bit for bit.
    plain = _trust_trainer(tmp_path / "plain", 6).train()
    untrusting = _trust_trainer(tmp_path / "never", 6, sample_trust=True, influence_from_step=6).train()
    assert all(w is None for w in plain.loss_fn.weights)
    for a, b in zip(plain.model.parameters(), untrusting.model.parameters()):
        assert torch.equal(a, b)


def test_sample_trust_needs_a_loss_that_weighs_samples_and_resumes_only_as_written(tmp_path):
    with pytest.raises(ValueError, match=r"sample_trust=True needs a loss whose influence weights differ between "
                                         r"samples; 'kl' gives every sample weight 1"):
        _trust_trainer(tmp_path / "kl", 2, loss="kl", sample_trust=True)
    images = torch.rand(16, 1, 8, 8)
    schedule = rd.NoiseSchedule.linear(50)
    with pytest.raises(ValueError, match="sample_trust=True needs a RobustDiffusionLoss as loss_fn"):
        Trainer(build_model("micro", 1), lambda out, target, t: (out - target).pow(2).mean(), TensorDataset(images),
                schedule, TrainConfig(steps=2, batch_size=8, sample_trust=True, progress=False))
    _trust_trainer(tmp_path / "run", 2).train()
    with pytest.raises(ValueError, match=r"cannot resume from .*checkpoint.safetensors: it was written with "
                                         r"sample_trust=False, this run has True"):
        _trust_trainer(tmp_path / "run", 4, sample_trust=True).resume()
