"""A small DDPM/ADM-style UNet for 1- or 3-channel 28x28 or 32x32 images.

Layout (Ho et al. 2020, simplified from ADM): a sinusoidal timestep embedding fed through an MLP into
every residual block; per resolution level ``num_res_blocks`` residual blocks (GroupNorm, SiLU, dropout),
optional self-attention after them, and a stride-2 convolution between levels; a middle block; the mirrored
decoder with skip connections; a zero-initialised output convolution so training starts from a zero prediction.
With ``num_classes=K`` a learned class embedding (K + 1 rows; the last, ``K``, is the null label that classifier-free
guidance samples the unconditional model with) is added to the time embedding, as ADM and diffusers' ``UNet2DModel``
(``class_embed_type=None``) do.

The module is kept simple enough for ``torch.jit.script`` (deprecated upstream since torch 2.11, still
asked for by the C++ sampler; it emits a deprecation warning) and ``torch.export``.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["UNET_PRESETS", "UNet", "checked_labels", "model_prediction", "null_class_label", "timestep_embedding"]

UNET_PRESETS: Dict[str, Dict[str, object]] = {
    # About 1.1M parameters: the quick CPU preset for tests and small Fashion-MNIST runs.
    "tiny": dict(base_channels=32, channel_mults=(1, 2, 2), num_res_blocks=1, attention_levels=(2,),
                 dropout=0.0, norm_groups=8),
    # About 6.5M parameters: a GPU preset for Fashion-MNIST / CIFAR-10 runs of minutes.
    "small": dict(base_channels=64, channel_mults=(1, 2, 2), num_res_blocks=2, attention_levels=(1,),
                  dropout=0.1, norm_groups=32),
    # DDPM's CIFAR-10 network (Ho et al. 2020, 35.7M parameters): attention at 16x16 for 32x32 inputs.
    "ddpm_cifar10": dict(base_channels=128, channel_mults=(1, 2, 2, 2), num_res_blocks=2, attention_levels=(1,),
                         dropout=0.1, norm_groups=32),
}


def model_prediction(output, like: Tensor) -> Tensor:
    """A denoiser's output as the prediction tensor: our UNet returns it, diffusers' models (``UNet2DModel``)
    return an output object holding it as ``.sample``, or with ``return_dict=False`` a tuple whose first item it
    is. Anything else, or a tensor of another shape than ``like`` (the model's input), is a ValueError."""
    if not isinstance(output, Tensor):
        output = getattr(output, "sample", output)
        if isinstance(output, (tuple, list)) and output:
            output = output[0]
    if not isinstance(output, Tensor) or output.shape != like.shape:
        got = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
        raise ValueError(f"the model must return a tensor of its input's shape {tuple(like.shape)} (or a diffusers "
                         f"output with .sample), got {got}")
    return output


def null_class_label(model) -> Optional[int]:
    """The null label of a class-conditional model (the label classifier-free guidance samples its unconditional
    prediction with, and label dropout trains it on), or ``None`` for an unconditional one: ``K`` for our
    ``UNet(num_classes=K)``, ``num_class_embeds - 1`` for a diffusers ``UNet2DModel(num_class_embeds=K + 1)`` (the
    last of its rows, as our UNet's). A DDP wrapper is looked through."""
    model = getattr(model, "module", model)
    if isinstance(model, UNet):
        return model.num_classes
    embeds = getattr(getattr(model, "config", None), "num_class_embeds", None)
    return int(embeds) - 1 if embeds else None


def checked_labels(labels, num_samples: int, null: int, what: str, *, allow_null: bool = False) -> Tensor:
    """``labels`` as int64 [num_samples] on the CPU, or a one-line ``ValueError`` naming ``what``: integers in
    ``[0, null)``, or ``[0, null]`` with ``allow_null`` (the null label: a sample that trains only the unconditional
    model)."""
    labels = torch.as_tensor(labels)
    if labels.shape != (num_samples,) or labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"{what} must be integers, one per sample [{num_samples}], got {labels.dtype} "
                         f"{tuple(labels.shape)}")
    low, high = (int(labels.min()), int(labels.max())) if num_samples else (0, 0)
    if low < 0:
        raise ValueError(f"{what} must be non-negative class indices, got {low}")
    top = null if allow_null else null - 1
    if high > top:
        hint = (f"labels 0..{null - 1} and the null label {null}" if allow_null
                else f"labels 0..{null - 1}): build it with num_classes={high + 1}")
        raise ValueError(f"{what} lie in [{low}, {high}], the model has {null} classes ({hint}"
                         + (")" if allow_null else ""))
    return labels.to("cpu", torch.int64)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding ``[cos(t f_k), sin(t f_k)]`` of timesteps ``t [B]`` (int or float), ``[B, dim]``.

    Frequencies ``f_k = max_period^(-k / half)`` follow the transformer/DDPM convention, tuned for
    integer timesteps in ``[0, 1000)``; scale continuous times in ``[0, 1]`` up before calling.
    """
    half = dim // 2
    exponents = torch.arange(half, device=t.device, dtype=torch.float32) / half
    freqs = torch.exp(-math.log(max_period) * exponents)
    args = t.to(torch.float32).unsqueeze(1) * freqs.unsqueeze(0)
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2 == 1:
        embedding = F.pad(embedding, (0, 1))
    return embedding


class ResidualBlock(nn.Module):
    """GroupNorm-SiLU-conv, add the projected timestep embedding, GroupNorm-SiLU-dropout-conv, plus skip."""

    def __init__(self, in_channels: int, out_channels: int, embed_dim: int, dropout: float, norm_groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(norm_groups, in_channels), in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.embed = nn.Linear(embed_dim, out_channels)
        self.norm2 = nn.GroupNorm(_groups(norm_groups, out_channels), out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity (ADM's zero_module)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.embed(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Multi-head self-attention over the H*W positions, with a residual connection."""

    def __init__(self, channels: int, num_heads: int, norm_groups: int):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"attention channels {channels} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(_groups(norm_groups, channels), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.num_heads, c // self.num_heads, h * w)
        # [B, heads, HW, head_dim] for scaled_dot_product_attention.
        q = qkv[:, 0].transpose(-1, -2)
        k = qkv[:, 1].transpose(-1, -2)
        v = qkv[:, 2].transpose(-1, -2)
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class ResidualAttentionBlock(nn.Module):
    """A residual block optionally followed by self-attention (one module, so levels loop over one type)."""

    def __init__(self, in_channels: int, out_channels: int, embed_dim: int, dropout: float, norm_groups: int,
                 attention: bool, num_heads: int):
        super().__init__()
        self.residual = ResidualBlock(in_channels, out_channels, embed_dim, dropout, norm_groups)
        self.attention = SelfAttention(out_channels, num_heads, norm_groups) if attention else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        return self.attention(self.residual(x, emb))


class DownLevel(nn.Module):
    """One encoder resolution: blocks, then (except at the deepest level) a stride-2 convolution.
    Every output is pushed on ``skips`` for the decoder."""

    def __init__(self, blocks: List[ResidualAttentionBlock], channels: int, downsample: bool):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.downsample = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if downsample else nn.Identity()
        self.has_downsample = downsample

    def forward(self, h: Tensor, emb: Tensor, skips: List[Tensor]) -> Tensor:
        for block in self.blocks:
            h = block(h, emb)
            skips.append(h)
        if self.has_downsample:
            h = self.downsample(h)
            skips.append(h)
        return h


class UpLevel(nn.Module):
    """One decoder resolution: blocks fed the concatenated skips, then (except at full resolution)
    nearest upsampling to the next skip's size plus a 3x3 convolution. Resizing to the skip's size rather
    than by a fixed factor 2 keeps odd sizes working (28 -> 14 -> 7 -> 4 and back)."""

    def __init__(self, blocks: List[ResidualAttentionBlock], channels: int, upsample: bool):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.upsample = nn.Conv2d(channels, channels, 3, padding=1) if upsample else nn.Identity()
        self.has_upsample = upsample

    def forward(self, h: Tensor, emb: Tensor, skips: List[Tensor]) -> Tensor:
        for block in self.blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        if self.has_upsample:
            target = skips[-1]
            h = F.interpolate(h, size=[target.shape[2], target.shape[3]], mode="nearest")
            h = self.upsample(h)
        return h


class UNet(nn.Module):
    """A timestep-conditioned UNet predicting a tensor of the input's shape (epsilon, x0 or v).

    Args:
        in_channels: 1 (Fashion-MNIST) or 3 (CIFAR-10).
        out_channels: defaults to ``in_channels``.
        base_channels: channels at full resolution; level ``i`` has ``base_channels * channel_mults[i]``.
        channel_mults: one entry per resolution level; ``len - 1`` stride-2 downsamplings.
        num_res_blocks: residual blocks per encoder level (the decoder has one more, for the extra skip).
        attention_levels: level indices (0 = full resolution) that get self-attention after each block;
            the middle block always has one attention layer.
        num_heads: attention heads.
        dropout: dropout rate inside residual blocks.
        norm_groups: GroupNorm groups (capped at, and must divide, each layer's channel count).
        num_classes: ``K`` makes the model class-conditional (module docstring): labels ``0..K-1`` are classes,
            ``K`` the null label. ``None`` (default): unconditional, with no parameter more.

    ``forward(x, t, class_labels=None)``: ``x [B, C, H, W]``, ``t [B]`` integer or float timesteps (a 0-dim ``t`` is
    broadcast), ``class_labels [B]`` integer labels in ``[0, K]`` for a conditional model (a 0-dim one is broadcast),
    ``None`` for an unconditional one.
    Use :meth:`from_preset` for the configurations in :data:`UNET_PRESETS`.
    """

    def __init__(self, in_channels: int = 1, out_channels: Optional[int] = None, base_channels: int = 32,
                 channel_mults: Sequence[int] = (1, 2, 2), num_res_blocks: int = 1,
                 attention_levels: Sequence[int] = (2,), num_heads: int = 1, dropout: float = 0.0,
                 norm_groups: int = 8, num_classes: Optional[int] = None):
        super().__init__()
        if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                        or num_classes < 1):
            raise ValueError(f"num_classes must be a positive integer (or None: unconditional), got {num_classes!r}")
        channel_mults = tuple(int(m) for m in channel_mults)
        attention_levels = tuple(int(level) for level in attention_levels)
        if not channel_mults or min(channel_mults) < 1:
            raise ValueError(f"channel_mults must be a non-empty sequence of positive ints, got {channel_mults}")
        if num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be >= 1, got {num_res_blocks}")
        bad_levels = [level for level in attention_levels if not 0 <= level < len(channel_mults)]
        if bad_levels:
            raise ValueError(f"attention_levels {bad_levels} out of range: levels are 0..{len(channel_mults) - 1}")
        out_channels = in_channels if out_channels is None else out_channels
        self.config = dict(in_channels=in_channels, out_channels=out_channels, base_channels=base_channels,
                           channel_mults=channel_mults, num_res_blocks=num_res_blocks,
                           attention_levels=attention_levels, num_heads=num_heads, dropout=dropout,
                           norm_groups=norm_groups)
        if num_classes is not None:  # an unconditional model's config stays as it was
            self.config["num_classes"] = num_classes
        self.num_classes = num_classes
        self.base_channels = base_channels
        embed_dim = 4 * base_channels

        def block(cin: int, cout: int, attention: bool) -> ResidualAttentionBlock:
            return ResidualAttentionBlock(cin, cout, embed_dim, dropout, norm_groups, attention, num_heads)

        self.time_mlp = nn.Sequential(nn.Linear(base_channels, embed_dim), nn.SiLU(), nn.Linear(embed_dim, embed_dim))
        # One row more than classes: the null label. None keeps an unconditional model's state_dict as it was.
        self.class_embed = nn.Embedding(num_classes + 1, embed_dim) if num_classes is not None else None
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        skip_channels = [base_channels]
        channels = base_channels
        down_levels = []
        for level, mult in enumerate(channel_mults):
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(block(channels, base_channels * mult, level in attention_levels))
                channels = base_channels * mult
                skip_channels.append(channels)
            is_last = level == len(channel_mults) - 1
            down_levels.append(DownLevel(blocks, channels, downsample=not is_last))
            if not is_last:
                skip_channels.append(channels)
        self.down_levels = nn.ModuleList(down_levels)

        self.mid_block1 = block(channels, channels, attention=True)
        self.mid_block2 = block(channels, channels, attention=False)

        up_levels = []
        for level in reversed(range(len(channel_mults))):
            blocks = []
            for _ in range(num_res_blocks + 1):
                out = base_channels * channel_mults[level]
                blocks.append(block(channels + skip_channels.pop(), out, level in attention_levels))
                channels = out
            up_levels.append(UpLevel(blocks, channels, upsample=level > 0))
        self.up_levels = nn.ModuleList(up_levels)

        self.norm_out = nn.GroupNorm(_groups(norm_groups, channels), channels)
        self.conv_out = nn.Conv2d(channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)  # start from a zero prediction (the mean of every target)
        nn.init.zeros_(self.conv_out.bias)

    @classmethod
    def from_preset(cls, name: str, in_channels: int = 1, **overrides) -> "UNet":
        """Build a :data:`UNET_PRESETS` configuration (``"tiny"``, ``"small"``, ``"ddpm_cifar10"``)."""
        if name not in UNET_PRESETS:
            raise ValueError(f"unknown UNet preset {name!r}; expected one of {', '.join(UNET_PRESETS)}")
        return cls(in_channels=in_channels, **{**UNET_PRESETS[name], **overrides})

    def forward(self, x: Tensor, t: Tensor, class_labels: Optional[Tensor] = None) -> Tensor:
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        emb = self.time_mlp(timestep_embedding(t, self.base_channels).to(x.dtype))
        if self.class_embed is not None:
            if class_labels is None:
                raise ValueError("UNet.forward: class_labels is missing: this UNet is class-conditional "
                                 "(num_classes=" + str(self.class_embed.num_embeddings - 1) + "), pass class_labels "
                                 "[B] in [0, num_classes] (num_classes: the null label)")
            if class_labels.dim() == 0:
                class_labels = class_labels.expand(x.shape[0])
            if not torch.jit.is_scripting():
                _check_labels(class_labels, x.shape[0], self.class_embed.num_embeddings - 1)
            emb = emb + self.class_embed(class_labels).to(emb.dtype)
        elif class_labels is not None:
            raise ValueError("UNet.forward: class_labels given to an unconditional UNet: build it with "
                             "UNet(num_classes=K) to condition on classes, or pass class_labels=None")
        h = self.conv_in(x)
        skips: List[Tensor] = [h]
        for down in self.down_levels:
            h = down(h, emb, skips)
        h = self.mid_block2(self.mid_block1(h, emb), emb)
        for up in self.up_levels:
            h = up(h, emb, skips)
        return self.conv_out(F.silu(self.norm_out(h)))


def _check_labels(labels: Tensor, batch: int, num_classes: int) -> None:
    """Labels an embedding can look up. Their range is checked where it costs no host sync (on the CPU, outside
    tracing); on a GPU the embedding's own device assertion catches a label out of range."""
    if labels.dtype not in (torch.int64, torch.int32) or tuple(labels.shape) != (batch,):
        raise ValueError(f"UNet.forward: class_labels must be an int64 tensor [{batch}] (one label per image), got "
                         f"{labels.dtype} {tuple(labels.shape)}")
    if labels.device.type == "cpu" and not torch.compiler.is_compiling() and labels.numel():
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high > num_classes:
            raise ValueError(f"UNet.forward: class_labels must lie in [0, {num_classes}] (classes "
                             f"0..{num_classes - 1}, {num_classes} the null label), got values in [{low}, {high}]; build the UNet with "
                             f"num_classes covering the dataset's labels")


def _groups(norm_groups: int, channels: int) -> int:
    groups = min(norm_groups, channels)
    if channels % groups:
        raise ValueError(f"norm_groups={norm_groups} does not divide {channels} channels")
    return groups
