"""A stand-in for ``modeling/quantizer.py`` of wangbei1/order_1-d (see blocks_new.py here): an
l2-normalised nearest-code quantiser with their constructor, parameter and output."""

import torch
from torch import nn
from torch.nn import functional as F


class VectorQuantizer(nn.Module):
    def __init__(self, codebook_size=1024, token_size=256, commitment_cost=0.25, use_l2_norm=False):
        super().__init__()
        self.commitment_cost, self.use_l2_norm = commitment_cost, use_l2_norm
        self.embedding = nn.Embedding(codebook_size, token_size)

    def forward(self, z):
        z = z.float().permute(0, 2, 3, 1)  # [B, H, W, C]
        codebook = F.normalize(self.embedding.weight, dim=-1) if self.use_l2_norm else self.embedding.weight
        z = F.normalize(z, dim=-1) if self.use_l2_norm else z
        codes = codebook[torch.argmax(z @ codebook.T, dim=-1)]
        loss = self.commitment_cost * ((codes.detach() - z) ** 2).mean() + ((codes - z.detach()) ** 2).mean()
        return (z + (codes - z).detach()).permute(0, 3, 1, 2), dict(quantizer_loss=loss)
