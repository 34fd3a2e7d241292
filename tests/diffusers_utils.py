"""Test helpers: tiny diffusers models with random weights, and NHWC/NCHW glue."""
import math

import numpy as np
import torch


def randomize_(model: torch.nn.Module, seed: int = 0, scale: float = 0.5) -> torch.nn.Module:
    """Perturb every parameter (diffusers zero-inits conv_out and some biases,
    which would hide mapping mistakes): weights get N(0, scale²/fan_in) added,
    1-d params (norm scales, biases) N(0, 0.1²)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                fan_in = int(np.prod(p.shape[1:]))
                p.add_(torch.randn(p.shape, generator=gen) * (scale / math.sqrt(fan_in)))
            else:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


def nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2)))


def nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().transpose(0, 2, 3, 1)


def max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
