"""Mismatched pairs: the conditional model's per-label errors, the scores made of them, and the confident-learning
baseline (python/robust_diffusion/training/pairs.py)."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

import robust_diffusion as rd
from robust_diffusion.training.metrics import auroc
from robust_diffusion.training.pairs import confident_learning_scores, label_errors, pair_scores

pytestmark = pytest.mark.usefixtures("one_thread")


class OracleDenoiser(nn.Module):
    """A class-conditional epsilon predictor that knows each class's one image: under label y it predicts the noise
    as if x_0 were class y's image, exactly right when it is; the null label assumes the classes' mean. It looks
    like a diffusers model with ``num_class_embeds = K + 1`` to ``null_class_label``."""

    def __init__(self, means, schedule):
        super().__init__()
        self.means = torch.cat([means, means.mean(0, keepdim=True)])
        self.schedule = schedule
        self.config = SimpleNamespace(num_class_embeds=len(means) + 1)
        self.anchor = nn.Parameter(torch.zeros(()))  # a parameter, for the device

    def forward(self, x_t, t, class_labels):
        alpha_bar = self.schedule.alphas_cumprod.to(x_t)[t].view(-1, 1, 1, 1)
        return (x_t - alpha_bar.sqrt() * self.means[class_labels]) / (1 - alpha_bar).sqrt()


def test_label_errors_are_paired_across_labels_and_the_scores_find_the_wrong_labels():
    schedule = rd.NoiseSchedule.linear(1000)
    means = torch.linspace(-0.8, 0.8, 4).view(4, 1, 1, 1).expand(4, 1, 6, 6).clone()
    truth = torch.arange(24) % 4
    images = means[truth]
    given = truth.clone()
    given[:6] = (truth[:6] + 1) % 4  # six mismatched pairs
    model = OracleDenoiser(means, schedule)
    errors = label_errors(model, schedule, images, levels=(0.3, 0.5), draws=2, batch_size=10)
    assert errors.shape == (24, 5) and errors.dtype == torch.float32
    assert torch.allclose(errors[torch.arange(24), truth], torch.zeros(24), atol=1e-8)  # its own class: exact
    assert (errors[:, :4].min(dim=1).values == errors[torch.arange(24), truth]).all()
    again = label_errors(model, schedule, images, levels=(0.3, 0.5), draws=2, batch_size=7)
    torch.testing.assert_close(errors, again)  # the noise is drawn for the whole set: batching changes nothing
    scores = pair_scores(errors, given)
    assert torch.equal(scores.preferred, truth)
    flipped = torch.arange(24) < 6
    for score in (scores.margin, scores.mistrust):
        assert auroc(score, flipped) == 1.0
    # the contrast only says whether the label helps at all: a right label always does, a wrong one near the
    # truth may too
    assert (scores.contrast[~flipped] < 0).all() and auroc(scores.contrast, flipped) > 0.5
    assert (scores.margin[~flipped] == 0).all() and (scores.margin[flipped] > 0).all()
    assert ((scores.mistrust >= 0) & (scores.mistrust <= 1)).all()


def test_pair_scores_and_label_errors_refuse_what_they_cannot_score():
    with pytest.raises(ValueError, match=r"errors must be \[N, K \+ 1\]"):
        pair_scores(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        pair_scores(torch.zeros(2, 4), torch.tensor([0, 3]))
    schedule = rd.NoiseSchedule.linear(100)
    with pytest.raises(ValueError, match="needs a class-conditional model"):
        label_errors(nn.Conv2d(1, 1, 1), schedule, torch.zeros(2, 1, 4, 4))
    model = OracleDenoiser(torch.zeros(2, 1, 4, 4), schedule)
    with pytest.raises(ValueError, match=r"at least one noise level in \(0, 1\)"):
        label_errors(model, schedule, torch.zeros(2, 1, 4, 4), levels=(1.5,))


def test_confident_learning_ranks_flipped_labels_of_separable_images_first():
    g = torch.Generator().manual_seed(0)
    truth = torch.arange(160) % 2
    images = torch.randn(160, 1, 8, 8, generator=g) * 0.3
    images[truth == 1, :, :4] += 1.0  # class 1: a bright top half
    given = truth.clone()
    flipped = torch.zeros(160, dtype=torch.bool)
    flipped[torch.randperm(160, generator=g)[:16]] = True
    given[flipped] = 1 - given[flipped]
    scores = confident_learning_scores(images, given, num_classes=2, folds=4, epochs=3)
    assert scores.shape == (160,) and ((scores >= 0) & (scores <= 1)).all()
    assert auroc(scores, flipped) > 0.9
    with pytest.raises(ValueError, match="folds must be at least 2"):
        confident_learning_scores(images, given, num_classes=2, folds=1)


def test_label_errors_run_the_kits_conditional_unet_on_flow_matching_too():
    """The real model and both objectives: finite errors for every label and the null label, the same for every
    batching (the noise is drawn for the whole set)."""
    from robust_diffusion.training.experiment import build_model

    torch.manual_seed(0)
    model = build_model("micro", 1, num_classes=3)
    images = torch.rand(5, 1, 8, 8) * 2 - 1
    for schedule in (rd.FlowMatchingSchedule(), rd.NoiseSchedule.linear()):
        errors = label_errors(model, schedule, images, levels=(0.3, 0.7), batch_size=5)
        assert errors.shape == (5, 4) and torch.isfinite(errors).all() and (errors > 0).all()
        torch.testing.assert_close(errors, label_errors(model, schedule, images, levels=(0.3, 0.7), batch_size=2))
