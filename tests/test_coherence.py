"""Coherence-gated trust (docs/DESIGN.md, Data audit): rd.coherence, InfluenceTracker.set_coherence, the Trainer's
influence_loss and trust_coherence, and the promise that trust silences junk but not a rare, learnable group."""

import math

import pytest
import torch
from torch.utils.data import TensorDataset

import robust_diffusion as rd
from conftest import example_module
from robust_diffusion.training.checkpoint import load_state, save_state
from robust_diffusion.training.data import contaminate
from robust_diffusion.training.experiment import build_model
from robust_diffusion.training.trainer import TrainConfig, Trainer
from robust_diffusion.training.trainer_checkpoint import CHECKPOINT_KIND, CHECKPOINT_NAME, CHECKPOINT_VERSION


def _reference(x: torch.Tensor, k: int) -> torch.Tensor:
    """The definition in float64, one sample at a time: distance to the k-th nearest other sample, against the
    median of those distances, squared, capped at 1."""
    x = x.reshape(x.shape[0], -1).double()
    distance = torch.stack([torch.cat([(x[i] - x[j]).norm().view(1) for j in range(len(x)) if j != i]).sort().values[k - 1]
                            for i in range(len(x))])
    return (distance.median() / distance).pow(2).clamp(max=1.0)


def _mixture(seed=0):
    """40 samples near one pattern, 12 near another (the rare group), 6 isolated uniform-noise vectors."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.sign(torch.randn(2, 16, generator=g))
    common = centers[0] + 0.1 * torch.randn(40, 16, generator=g)
    rare = centers[1] + 0.1 * torch.randn(12, 16, generator=g)
    junk = torch.rand(6, 16, generator=g) * 4 - 2
    return torch.cat([common, rare, junk])


def test_coherence_matches_its_float64_definition_and_tells_a_rare_group_from_junk():
    x = _mixture()
    value = rd.coherence(x, k=5, reference=None)
    assert value.dtype == torch.float32 and value.shape == (58,)
    # float32 distances through matrix products: a relative error of a few 1e-5
    torch.testing.assert_close(value.double(), _reference(x, 5), rtol=2e-4, atol=1e-6)
    assert (value[40:52] > 0.5).all()  # the rare group: about as close to its 5th neighbour as the common one
    assert (value[52:] < 0.2).all()  # junk: far from everything
    # images are flattened; every sample is measured against at most `reference` others, never itself
    images = x.view(58, 1, 4, 4)
    assert torch.equal(rd.coherence(images, reference=58), rd.coherence(x, reference=None))
    subset = rd.coherence(x, reference=30, seed=1)
    assert subset.shape == (58,) and ((subset > 0) & (subset <= 1)).all()
    duplicates = torch.cat([x[:1].repeat(6, 1), x[1:20]])  # six copies of one sample: each other's neighbours
    assert (rd.coherence(duplicates, reference=None)[:6] == 1).all()


@pytest.mark.parametrize("call, message", [
    (lambda: rd.coherence(torch.arange(12).view(6, 2)), "features must be a floating tensor"),
    (lambda: rd.coherence(torch.randn(6)), "features must be a floating tensor"),
    (lambda: rd.coherence(torch.tensor([[math.nan, 0.0]] + [[0.0, 1.0]] * 6)), "features hold NaN or infinite"),
    (lambda: rd.coherence(torch.randn(5, 2), k=5), "k=5 needs more than 5 samples"),
    (lambda: rd.coherence(torch.randn(9, 2), k=0), "k must be a positive integer"),
    (lambda: rd.coherence(torch.randn(9, 2), reference=0), "reference must be a positive integer"),
])
def test_coherence_errors_name_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_the_tracker_gates_trust_by_coherence_and_keeps_it_out_of_its_state():
    tracker = rd.InfluenceTracker(5, num_buckets=2, num_timesteps=10)
    tracker.update([0, 1, 2, 3, 4], torch.tensor([1.0, 1.0, 1.0, 0.1, 0.1]), t=torch.tensor([0, 1, 2, 3, 4]))
    plain = tracker.trust()
    torch.testing.assert_close(plain, torch.tensor([1.0, 1.0, 1.0, 0.1, 0.1]))
    gate = torch.tensor([0.0, 0.0, 0.0, 1.0, 0.5])
    gated = tracker.set_coherence(gate).trust()
    torch.testing.assert_close(gated, torch.tensor([1.0, 1.0, 1.0, 1.0, 0.55]))  # 1 - (1 - trust)(1 - coherence)
    assert "coherence" not in tracker.state_dict()  # a function of the data, set again by whoever builds it
    assert torch.equal(tracker.set_coherence(None).trust(), plain)
    for bad, message in ((torch.ones(3), "of 5 entries"), (torch.tensor([0.0, 0.5, 1.5, 1.0, 1.0]), "must lie in"),
                         (torch.tensor([0.0, math.nan, 1.0, 1.0, 1.0]), "must lie in"), ([1] * 5, "floating 1-D")):
        with pytest.raises(ValueError, match=f"InfluenceTracker.set_coherence: coherence .*{message}"):
            tracker.set_coherence(bad)


def _trainer(out, steps, loss="kl", measure="ned", scale=1.0, **config):
    images = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.2 - 0.1
    dataset = contaminate(images, 0.25, "noise", seed=0)
    schedule = rd.NoiseSchedule.linear(100)
    torch.manual_seed(0)
    influence_loss = rd.RobustDiffusionLoss(measure, schedule, num_buckets=5, update="step") if measure else None
    return Trainer(build_model("micro", 1), rd.RobustDiffusionLoss(loss, schedule, scale=scale, num_buckets=5,
                                                                   update="step"),
                   dataset, schedule, TrainConfig(steps=steps, batch_size=16, lr=2e-3, log_every=5, progress=False,
                                                  **config),
                   out_dir=out, influence_loss=influence_loss)


def test_an_influence_loss_measures_without_changing_the_training(tmp_path):
    measured = _trainer(tmp_path / "measured", 30).train()
    plain = _trainer(tmp_path / "plain", 30, measure=None).train()
    for a, b in zip(measured.model.parameters(), plain.model.parameters()):
        assert torch.equal(a, b)  # the MSE trains as it would alone
    assert (plain.influence.mean_influence() == 1).all()  # the MSE weighs every sample alike
    flags = measured.is_contaminated.cpu()
    influence = measured.influence.mean_influence()
    assert influence[flags].mean() < influence[~flags].mean()  # NED's weights, measured on the MSE's predictions
    assert measured.influence_loss.adaptive_scale.initialized.any()  # its scale followed the run


def test_mse_with_neds_trust_gated_by_coherence_resumes_exactly_and_refuses_other_runs(tmp_path):
    config = dict(sample_trust=True, trust_coherence=True, influence_from_step=4, checkpoint_every=6)
    whole = _trainer(tmp_path / "whole", 12, **config).train()
    assert whole.influence.coherence is not None
    flags = whole.is_contaminated.cpu()
    assert whole.influence.coherence[flags].max() < whole.influence.coherence[~flags].median()  # junk is isolated
    part = _trainer(tmp_path / "part", 6, **config).train()
    resumed = _trainer(tmp_path / "part", 12, **config)
    assert resumed.resume() and resumed.step == 6
    resumed.train()
    for a, b in zip(whole.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(whole.influence.trust(), resumed.influence.trust())
    del part
    with pytest.raises(ValueError, match=r"it was written with an influence_loss, this run has none"):
        _trainer(tmp_path / "part", 12, measure=None, loss="ned", scale="adaptive", **config).resume()
    with pytest.raises(ValueError, match=r"it was written with trust_coherence=True, this run has False"):
        _trainer(tmp_path / "part", 12, sample_trust=True, influence_from_step=4).resume()
    # a checkpoint whose influence_loss state is poisoned is refused before anything is loaded into the run
    path = tmp_path / "part" / CHECKPOINT_NAME
    state = load_state(path, CHECKPOINT_KIND, CHECKPOINT_VERSION)
    key = next(k for k, v in state["influence_loss"].items() if torch.is_tensor(v) and v.is_floating_point())
    state["influence_loss"][key] = torch.full_like(state["influence_loss"][key], math.nan)
    save_state(state, path, CHECKPOINT_KIND, CHECKPOINT_VERSION)
    fresh = _trainer(tmp_path / "part", 12, **config)
    before = [p.clone() for p in fresh.model.parameters()]
    with pytest.raises(ValueError, match=key.split(".")[-1]):
        fresh.resume()
    assert all(torch.equal(a, b) for a, b in zip(before, fresh.model.parameters()))


def test_the_trainer_refuses_what_an_influence_loss_cannot_do(tmp_path):
    with pytest.raises(ValueError, match="influence_loss must be a RobustDiffusionLoss"):
        Trainer(build_model("micro", 1), rd.RobustDiffusionLoss("kl", rd.NoiseSchedule.linear(100), update="step"),
                TensorDataset(torch.rand(16, 1, 8, 8)), rd.NoiseSchedule.linear(100),
                TrainConfig(steps=2, batch_size=8, progress=False), influence_loss=lambda o, t, s: o.mean())
    with pytest.raises(ValueError, match="trust_coherence gates the per-sample trust: set sample_trust=True too"):
        TrainConfig(trust_coherence=True)
    with pytest.raises(ValueError, match=r"'kl' gives every sample weight 1.*pass one as influence_loss"):
        _trainer(tmp_path / "kl", 2, measure=None, sample_trust=True)


def test_trust_silences_the_junk_and_not_a_rare_learnable_mode():
    """The promise on the toy of examples/rare_mode_toy.py (four common modes, a 3% mode, 30% uniform junk): with
    the KL gradient and NED's trust gated by coherence, the rare mode keeps its weight and is being learnt, the junk
    loses its weight. (NED at temperature 0.25 with plain trust silences both: docs/RESULTS.md, finding 15.)"""
    torch.set_num_threads(1)
    with example_module("rare_mode_toy") as toy:
        gated = toy.run("kl+trust+coherence", 0, steps=1200)
    assert gated["rare"][0] > 0.8 and gated["junk"][0] < 0.5  # trust: the rare mode kept, the junk silenced
    assert gated["rare"][1] < gated["junk"][1]  # the rare mode is being learnt, the junk is not
