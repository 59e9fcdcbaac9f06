"""A small random conv net: a model with no closed form, for equivalence tests."""
import torch


class TinyConvNet(torch.nn.Module):
    """A random conv net whose output depends on x and on t (a stand-in for a transformer)."""

    def __init__(self, channels=2, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
        with torch.no_grad():
            for p in self.conv.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, x, t):
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1, 1, 1, 1) / 1000
        return self.conv(x) * (1 + t) + torch.sin(3 * t) * x
