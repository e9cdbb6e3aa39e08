"""Recurrent networks that treat an image as a sequence of rows (the seed's RNN-GAN).

The generator runs a GRU or LSTM (``NetConfig.cell``) for one step per image row: its initial state
comes from z (and the label), its input at every step is z joined with a one-hot of the row index
(so no step has to count rows in its state), and each step's output is projected to one row of
pixels. The discriminator reads the rows in order and judges the image from the mean of its outputs
over all rows joined with its final output: every row has a short gradient path to the verdict.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from dist_gan.config import NetConfig
from dist_gan.models.base import ConditionalInput, Discriminator, DiscriminatorHead
from dist_gan.models.layers import add_spectral_norm

CELLS = {"gru": nn.GRU, "lstm": nn.LSTM}
LAYERS = 2


class RNNGenerator(nn.Module):
    row_index: torch.Tensor  # a buffer

    def __init__(self, cfg: NetConfig, z_dim: int, resolution: int, channels: int,
                 num_classes: int = 0):
        super().__init__()
        self.z_dim, self.cell = z_dim, cfg.cell
        self.rows, self.channels, self.row_width = resolution, channels, resolution
        hidden = cfg.width * 4
        self.condition = ConditionalInput(z_dim, num_classes)
        self.initial_state = nn.Linear(self.condition.out_dim, hidden * LAYERS)
        self.rnn = CELLS[cfg.cell](self.condition.out_dim + resolution, hidden, LAYERS, batch_first=True)
        self.register_buffer("row_index", torch.eye(resolution), persistent=False)
        self.to_row = nn.Linear(hidden, channels * resolution)
        if cfg.spectral_norm:
            add_spectral_norm(self)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        code = self.condition(z, labels)
        n = code.shape[0]
        h0 = torch.tanh(self.initial_state(code)).view(n, LAYERS, -1).transpose(0, 1).contiguous()
        state = (h0, torch.zeros_like(h0)) if self.cell == "lstm" else h0
        steps = torch.cat([code.unsqueeze(1).expand(n, self.rows, code.shape[1]),
                           self.row_index.to(code.dtype).expand(n, self.rows, self.rows)], 2)
        out, _ = self.rnn(steps, state)  # (n, rows, hidden): one output per row
        rows = torch.tanh(self.to_row(out))  # (n, rows, channels * width)
        return rows.view(n, self.rows, self.channels, self.row_width).permute(0, 2, 1, 3)


class RowReader(nn.Module):
    """Images (N, C, H, W) -> (N, 2 * hidden): the recurrent network's outputs over the H rows,
    averaged, joined with its last output."""

    def __init__(self, cell: str, channels: int, resolution: int, hidden: int):
        super().__init__()
        self.rnn = CELLS[cell](channels * resolution, hidden, LAYERS, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        rows = x.permute(0, 2, 1, 3).reshape(n, h, c * w)
        out, _ = self.rnn(rows)
        return torch.cat([out.mean(1), out[:, -1]], 1)


class RNNDiscriminator(Discriminator):
    def __init__(self, cfg: NetConfig, z_dim: int, resolution: int, channels: int,
                 num_classes: int = 0):
        super().__init__()
        hidden = cfg.width * 4
        self.body = RowReader(cfg.cell, channels, resolution, hidden)
        self.head = DiscriminatorHead(2 * hidden, num_classes, cfg.mbstd)
        if cfg.spectral_norm:
            add_spectral_norm(self)
