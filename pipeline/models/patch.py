"""The patch tokenizer: a grid of categorical codes computed at the grid's own resolution.

Every grid position covers one f x f cell of the image (f = ``model.downsample``). The encoder
cuts the image into its cells (pixel-unshuffle: [B, C, H, W] -> [B, C*f*f, h, w]) and gives the
code head each cell's pixels *beside* learned features of the cell and its neighbours (residual
3x3 blocks at h x w, output layer zero at initialisation). The decoder embeds the code through its
codebook [K, d] and maps it back to the likelihood's parameters for the cell (pixel-shuffle)
along two paths added together: a linear per-cell map (the patch path) and a residual body of
3x3 blocks that reads the neighbouring codes (its output layer zero at initialisation).

Why this shape: with ``model.code_init: kmeans`` the code head starts as the K-means quantizer of
the cells (nearest-centre logits on the pixel part of the features) and the codebook's first
C*f*f entries as the centres, with the patch path reading them back as pixels: at step 0 the
model *is* the classical vector quantizer at the same rate, every code in use, and training
starts from there. All convolutions run at h x w, so a step costs a fraction of the residual
encoder/decoder (models/resnet.py) that works at full resolution.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pipeline.models.resnet import ResBlock, ResNetDecoder, ResNetEncoder, grid_shape


def _body(fan_in: int, width: int, fan_out: int, blocks: int) -> nn.Sequential:
    """1x1 in, residual 3x3 blocks at the grid's resolution, relu, 1x1 out (zero at initialisation)."""
    gain = 1.0 / blocks**2
    body = nn.Sequential(nn.Conv2d(fan_in, width, 1), *[ResBlock(width, width, gain) for _ in range(blocks)],
                         nn.ReLU(), nn.Conv2d(width, fan_out, 1))
    nn.init.zeros_(body[-1].weight)
    nn.init.zeros_(body[-1].bias)
    return body


class CellFeatures(nn.Module):
    """[B, C, H, W] -> [B, C*f*f + learned, h, w]: each cell's pixels, then learned context features."""

    def __init__(self, channels: int, downsample: int, width: int, learned: int, blocks: int) -> None:
        super().__init__()
        self.cell_size = channels * downsample * downsample
        self.cells = nn.PixelUnshuffle(downsample)
        self.context = _body(self.cell_size, width, learned, blocks)

    def forward(self, x: Tensor) -> Tensor:
        cells = self.cells(x)
        return torch.cat([cells, self.context(cells)], dim=1)


class PatchEncoder(ResNetEncoder):
    """[B, C, H, W] -> logits over K per grid position, [B, h * w * K] (the latent's layout). The code
    head and its data-dependent initialisations (`init_codes`) are the residual encoder's."""

    def __init__(self, image_shape: tuple[int, int, int], width: int, categories: int, *, downsample: int = 4,
                 blocks: int = 2, learned: int = 64) -> None:
        nn.Module.__init__(self)
        self.grid = grid_shape(image_shape, downsample)
        self.features = CellFeatures(image_shape[0], downsample, width, learned, blocks)
        self.to_logits = nn.Linear(self.features.cell_size + learned, categories)

    @property
    def cell_size(self) -> int:
        return self.features.cell_size


class PatchDecoder(ResNetDecoder):
    """Code [B, h * w * K] -> codebook [K, d] -> patch path + context body -> pixel-shuffle ->
    [B, out_channels, H, W]. ``readout`` is the likelihood's map from pixels to its location
    parameter (slope, intercept) and the initial value of its scale parameter, if it has one
    (`Likelihood.readout`): the patch path starts as "the codebook entry is the cell's pixels"."""

    def __init__(self, grid: tuple[int, int], width: int, categories: int, out_channels: int, *, channels: int,
                 downsample: int = 4, blocks: int = 2, codebook_dim: int = 64,
                 readout: tuple[float, float, float | None] = (1.0, 0.0, None)) -> None:
        nn.Module.__init__(self)
        self.grid, self.categories = tuple(grid), categories
        self.codebook = nn.Parameter(torch.randn(categories, codebook_dim))
        self.cell_size = channels * downsample * downsample
        out_cells = out_channels * downsample * downsample
        self.patch = nn.Conv2d(codebook_dim, out_cells, 1)
        self.body = _body(codebook_dim, width, out_cells, blocks)
        self.shuffle = nn.PixelShuffle(downsample)
        self.readout = readout

    def _decode(self, vectors: Tensor) -> Tensor:
        return self.shuffle(self.patch(vectors) + self.body(vectors))

    def forward(self, z: Tensor) -> Tensor:
        return self._decode(self.embed(z))

    def decode_indices(self, indices: Tensor) -> Tensor:
        vectors = nn.functional.embedding(indices.long(), self.codebook)
        return self._decode(vectors.permute(0, 3, 1, 2).contiguous())

    @torch.no_grad()
    def init_codebook(self, centres: Tensor) -> None:
        """Codebook rows = the K centres' cell pixels [K, C*f*f] (then zeros), and the patch path set
        to read them back: the location channels of each cell are slope * pixel + intercept, the
        scale channels (if any) a constant. Out channels are [location C*f*f, scale C*f*f] in
        pixel-shuffle order, matching the likelihood's [mean channels, scale channels] split."""
        cells = self.cell_size
        if self.codebook.shape[1] < cells:
            raise ValueError(f"model.code_init: kmeans with arch patch needs model.codebook_dim >= C*f*f = {cells} "
                             f"(the codebook starts as the K-means centres of the cells), got {self.codebook.shape[1]}")
        slope, intercept, scale = self.readout
        self.codebook.zero_()
        self.codebook[:, :cells] = centres
        self.patch.weight.zero_()
        self.patch.bias.zero_()
        self.patch.weight[:cells, :cells, 0, 0] = slope * torch.eye(cells)
        self.patch.bias[:cells] = intercept
        if self.patch.out_channels > cells and scale is not None:
            self.patch.bias[cells:2 * cells] = scale  # any further channels (a likelihood's features) stay 0
