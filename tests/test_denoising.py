"""A model's denoising error at fixed noise levels and noise (robust_diffusion.training.denoising), against a float64
reference written out, and its per-class means."""

import math

import pytest
import torch
from torch import nn

import robust_diffusion as rd
from robust_diffusion.training.denoising import class_denoising_errors, denoising_errors


class Scaled(nn.Module):
    """Predicts a fixed multiple of its input; with class labels, the multiple depends on the label."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor(0.5))

    def forward(self, x, t, class_labels=None):
        scale = self.weight if class_labels is None else self.weight * (1 + class_labels.float().view(-1, 1, 1, 1))
        return scale * x


def reference(model, schedule, images, levels, seed, labels=None):
    generator = torch.Generator().manual_seed(seed)
    total = torch.zeros(images.shape[0], dtype=torch.float64)
    for level in levels:
        noise = torch.randn(images.shape, generator=generator)
        t = torch.full((images.shape[0],), round(level * schedule.num_timesteps))
        x_t = schedule.q_sample(images, t, noise)
        with torch.no_grad():
            out = model(x_t, t) if labels is None else model(x_t, t, class_labels=labels)
        total += (out.double() - noise.double()).pow(2).flatten(1).mean(1)
    return total / len(levels)


def test_errors_match_the_written_out_reference_and_are_paired():
    schedule = rd.NoiseSchedule.linear(100)
    images = torch.rand(10, 1, 4, 4, generator=torch.Generator().manual_seed(1)) * 2 - 1
    model = Scaled()
    got = denoising_errors(model, schedule, images, levels=(0.2, 0.6), seed=3, batch_size=4)
    torch.testing.assert_close(got.double(), reference(model, schedule, images, (0.2, 0.6), 3), rtol=1e-5, atol=1e-6)
    assert torch.equal(got, denoising_errors(model, schedule, images, levels=(0.2, 0.6), seed=3, batch_size=7))
    labels = torch.arange(10) % 3
    conditional = denoising_errors(model, schedule, images, levels=(0.2, 0.6), seed=3, class_labels=labels)
    torch.testing.assert_close(conditional.double(), reference(model, schedule, images, (0.2, 0.6), 3, labels),
                               rtol=1e-5, atol=1e-6)
    one = denoising_errors(model, schedule, images, levels=(0.2, 0.6), seed=3, class_labels=2)
    assert torch.equal(one, denoising_errors(model, schedule, images, levels=(0.2, 0.6), seed=3,
                                             class_labels=torch.full((10,), 2)))
    assert model.training  # its mode is restored


def test_class_means_and_refusals():
    schedule = rd.NoiseSchedule.linear(100)
    images = torch.rand(9, 1, 4, 4, generator=torch.Generator().manual_seed(2)) * 2 - 1
    labels = torch.tensor([0, 0, 1, 1, 1, 0, 3, 3, 0])
    per_image = denoising_errors(Scaled(), schedule, images, levels=(0.1, 0.3, 0.5, 0.7, 0.9), seed=0).double()
    per_class = class_denoising_errors(Scaled(), schedule, images, labels, 4)
    for k in (0, 1, 3):
        assert per_class[k].item() == pytest.approx(per_image[labels == k].mean().item())
    assert math.isnan(per_class[2])
    with pytest.raises(ValueError, match="class_denoising_errors: labels must be"):
        class_denoising_errors(Scaled(), schedule, images, labels[:5], 4)
    with pytest.raises(ValueError, match=r"denoising_errors: images must be \[N, C, H, W\]"):
        denoising_errors(Scaled(), schedule, images[0], levels=(0.5,))
    with pytest.raises(ValueError, match="at least one noise level in"):
        denoising_errors(Scaled(), schedule, images, levels=(1.0,))
