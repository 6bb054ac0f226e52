"""Tests for robust_diffusion.training.models: the UNet's shapes, conditioning, TorchScript and torch.export."""

import io
import warnings

import pytest
import torch

from robust_diffusion.training.models import UNET_PRESETS, UNet, timestep_embedding


def _micro_unet(in_channels: int = 1, seed: int = 0) -> UNet:
    """A UNet small enough for fast scripting/export, with random (not zero) output weights."""
    torch.manual_seed(seed)
    model = UNet(in_channels=in_channels, base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
                 attention_levels=(1,), num_heads=2, norm_groups=4)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.1)
    return model.eval()


def test_timestep_embedding_values():
    embedding = timestep_embedding(torch.tensor([0, 5]), 8)
    assert embedding.shape == (2, 8)
    torch.testing.assert_close(embedding[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    freqs = torch.tensor([1.0, 10000 ** -0.25, 10000 ** -0.5, 10000 ** -0.75])
    torch.testing.assert_close(embedding[1], torch.cat([torch.cos(5 * freqs), torch.sin(5 * freqs)]))
    assert timestep_embedding(torch.tensor([1.5]), 7).shape == (1, 7)


@pytest.mark.parametrize("in_channels, size", [(1, 28), (1, 32), (3, 32)])
def test_unet_shapes_and_timestep_dtypes(in_channels, size):
    model = _micro_unet(in_channels)
    x = torch.randn(3, in_channels, size, size)
    with torch.no_grad():
        out_int = model(x, torch.tensor([0, 10, 999]))
        out_float = model(x, torch.tensor([0.0, 10.0, 999.0]))
        out_scalar = model(x, torch.tensor(10))
    assert out_int.shape == x.shape
    torch.testing.assert_close(out_int, out_float)
    torch.testing.assert_close(out_scalar[1], out_int[1])


def test_unet_depends_on_timestep_and_starts_at_zero():
    model = _micro_unet()
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert not torch.allclose(model(x, torch.tensor([1, 1])), model(x, torch.tensor([500, 500])))
        fresh = UNet(base_channels=8, channel_mults=(1, 2), attention_levels=(1,), norm_groups=4)
        assert (fresh(x, torch.tensor([1, 2])) == 0).all()  # zero-initialised output convolution


def test_unet_presets():
    tiny = UNet.from_preset("tiny")
    count = sum(p.numel() for p in tiny.parameters())
    assert 0.5e6 <= count <= 2e6
    assert set(UNET_PRESETS) == {"tiny", "small", "ddpm_cifar10"}
    color = UNet.from_preset("tiny", in_channels=3, dropout=0.1)
    assert color.config["in_channels"] == 3 and color.config["dropout"] == 0.1
    with torch.no_grad():
        assert tiny(torch.randn(2, 1, 28, 28), torch.tensor([3, 4])).shape == (2, 1, 28, 28)
    with pytest.raises(ValueError, match="unknown UNet preset 'huge'; expected one of tiny, small, ddpm_cifar10"):
        UNet.from_preset("huge")


def test_unet_configuration_errors():
    with pytest.raises(ValueError, match=r"attention_levels \[3\] out of range: levels are 0..2"):
        UNet(attention_levels=(3,))
    with pytest.raises(ValueError, match="norm_groups=5 does not divide 32 channels"):
        UNet(norm_groups=5)
    with pytest.raises(ValueError, match="num_res_blocks must be >= 1"):
        UNet(num_res_blocks=0)


def test_unet_gradients_reach_every_parameter():
    model = _micro_unet().train()
    loss = model(torch.randn(2, 1, 16, 16), torch.tensor([3, 700])).square().mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_unet_torchscript_matches_eager_and_round_trips():
    model = _micro_unet()
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([5, 900])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is deprecated since torch 2.11
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(model)
        buffer = io.BytesIO()
        torch.jit.save(scripted, buffer)
        buffer.seek(0)
        loaded = torch.jit.load(buffer)
    with torch.no_grad():
        expected = model(x, t)
        torch.testing.assert_close(scripted(x, t), expected, rtol=0, atol=0)
        torch.testing.assert_close(loaded(x, t), expected, rtol=0, atol=0)


def test_unet_torch_export_with_dynamic_batch():
    model = _micro_unet()
    x, t = torch.randn(2, 1, 32, 32), torch.tensor([5, 900])
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(model, (x, t), dynamic_shapes=({0: batch}, {0: batch}))
    x3, t3 = torch.randn(3, 1, 32, 32), torch.tensor([0, 1, 999])
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x3, t3), model(x3, t3))


# ---------------------------------------------------------------------------------------------- class labels
def _conditional_unet(num_classes: int = 3, seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    model = UNet(base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_levels=(1,), num_heads=2,
                 norm_groups=4, num_classes=num_classes)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.1)
    return model.eval()


def test_an_unconditional_unet_is_unchanged_by_the_class_option():
    """num_classes=None adds no parameter, no config entry and draws nothing more from the RNG, so existing
    checkpoints load and a seed builds the same weights as before."""
    torch.manual_seed(0)
    plain = UNet(base_channels=8, channel_mults=(1, 2), attention_levels=(1,), norm_groups=4)
    torch.manual_seed(0)
    same = UNet(base_channels=8, channel_mults=(1, 2), attention_levels=(1,), norm_groups=4, num_classes=None)
    assert "num_classes" not in plain.config and plain.num_classes is None
    assert not any(key.startswith("class_embed") for key in plain.state_dict())
    assert plain.state_dict().keys() == same.state_dict().keys()
    for key, value in plain.state_dict().items():
        assert torch.equal(value, same.state_dict()[key]), key
    conditional = _conditional_unet(3)
    assert conditional.class_embed.num_embeddings == 4  # three classes and the null label
    assert conditional.config["num_classes"] == 3
    extra = set(conditional.state_dict()) - set(_micro_unet().state_dict())
    assert extra == {"class_embed.weight"}


def test_class_labels_condition_the_output_and_script():
    model = _conditional_unet(3)
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([5, 5, 5, 5])
    labels = torch.tensor([0, 1, 2, 3])  # 3: the null label
    with torch.no_grad():
        out = model(x, t, class_labels=labels)
        assert out.shape == x.shape
        assert not torch.allclose(out, model(x, t, class_labels=torch.tensor([1, 2, 3, 0])))
        # Each sample sees only its own label: a row is the same in any batch.
        torch.testing.assert_close(model(x[:1], t[:1], class_labels=labels[:1]), out[:1])
        torch.testing.assert_close(model(x, t, class_labels=torch.tensor(2)), model(x, t, torch.full((4,), 2)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript's deprecation warnings
            scripted = torch.jit.script(model)
        torch.testing.assert_close(scripted(x, t, labels), out, rtol=0, atol=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.script(_micro_unet())  # the unconditional model still scripts with the optional argument


def test_class_label_errors_name_the_argument_and_the_fix():
    conditional, plain = _conditional_unet(3), _micro_unet()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([1, 2])
    with pytest.raises(ValueError, match=r"class_labels is missing: this UNet is class-conditional \(num_classes=3\)"):
        conditional(x, t)
    with pytest.raises(ValueError, match=r"class_labels given to an unconditional UNet: build it with "
                                         r"UNet\(num_classes=K\)"):
        plain(x, t, class_labels=torch.tensor([0, 1]))
    for bad in ([0, 4], [-1, 0]):
        with pytest.raises(ValueError, match=r"class_labels must lie in \[0, 3\] \(classes 0..2, 3 the null label\)"):
            conditional(x, t, class_labels=torch.tensor(bad))
    with pytest.raises(ValueError, match=r"class_labels must be an int64 tensor \[2\]"):
        conditional(x, t, class_labels=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"class_labels must be an int64 tensor \[2\]"):
        conditional(x, t, class_labels=torch.tensor([0, 1, 2]))
    for bad in (0, -2, 2.5, True):
        with pytest.raises(ValueError, match="num_classes must be a positive integer"):
            UNet(num_classes=bad)
