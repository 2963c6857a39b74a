"""RMSNorm (Zhang & Sennrich 2019), computed in fp32 whatever the activation dtype."""
import torch
from torch import nn

from engmoe.model.compiled import cuda_compiled


@cuda_compiled
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * weight.float()).to(x.dtype)


@cuda_compiled
def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = x + residual`` and ``rms_norm(h)`` in one compiled kernel (forward and backward): the residual add
    of a pre-norm block feeds the next norm, so fused the add costs no pass of its own, and in the backward the
    sum of ``h``'s two gradients (the residual path and the norm's) happens inside the norm's backward kernel."""
    h = x + residual
    return h, rms_norm.eager(h, weight, eps)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, device: torch.device | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x + residual, self(x + residual))``, fused on GPU (:func:`add_rms_norm`)."""
        return add_rms_norm(x, residual, self.weight, self.eps)
