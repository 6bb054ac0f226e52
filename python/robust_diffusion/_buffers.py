"""A module whose buffers keep their dtype: running state that a model-wide ``.half()`` must not round."""

from torch import nn


class DtypeKeepingModule(nn.Module):
    """Device moves (``.to(device)``, ``.cuda()``) apply to the buffers; dtype casts (``.half()``,
    ``.to(torch.bfloat16)``, ``.double()``) do not, so state kept in float32 or float64 (the adaptive scale, the
    influence sums) stays representable whatever the model around it is cast to."""

    def _apply(self, fn, recurse=True):
        before = dict(self._buffers)
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if old is not None and new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        return self
