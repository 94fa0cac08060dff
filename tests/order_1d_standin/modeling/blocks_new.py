"""A stand-in for ``modeling/blocks_new.py`` of wangbei1/order_1-d, written for this test suite.

It has the interface ``bench compare --prototype`` uses (``TiTokEncoder(config)``,
``TiTokDecoder(config)``, the config fields they read, their parameter names and shapes, so the
same parameter count), so the comparison is tested without downloading the authors' code. The
computation follows the same outline (a loop over one small transformer per token) but is not
theirs: never quote timings of it.
"""

import torch
from torch import nn


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, 4 * width))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(4 * width, width))

    def forward(self, x):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


def _stack(width, heads, depth):
    return nn.Sequential(*[ResidualAttentionBlock(width, heads) for _ in range(depth)])


class TiTokEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        vq = config.model.vq_model
        self.grid = config.dataset.preprocessing.crop_size // vq.vit_enc_patch_size
        self.token_size, self.num_latent_tokens = vq.token_size, vq.num_latent_tokens
        heads = {"large": 4}[vq.vit_enc_model_size]
        self.patch_embed = nn.Conv2d(3, vq.embedding_width, vq.vit_enc_patch_size, stride=vq.vit_enc_patch_size)
        self.class_embedding = nn.Parameter(torch.randn(1, 1, vq.embedding_width))
        self.positional_embedding = nn.Parameter(torch.randn(1, self.grid**2 + 1, vq.embedding_width))
        self.ln_pre, self.ln_post = nn.LayerNorm(vq.width), nn.LayerNorm(vq.width)
        self.transformers_Pixel = _stack(vq.embedding_width, heads, vq.layers_x)
        self.reduce_ffn = nn.Linear(vq.embedding_width, vq.width)
        self.transformers_tokens = nn.ModuleList(
            [_stack(vq.width, heads, vq.layers_token) for _ in range(vq.num_latent_tokens)])
        self.conv_out = nn.Conv2d(vq.width, vq.token_size, 1)

    def forward(self, pixel_values, latent_tokens):
        x = self.patch_embed(pixel_values).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_embedding.expand(x.shape[0], -1, -1), x], 1) + self.positional_embedding
        context = self.reduce_ffn(self.transformers_Pixel(x))
        tokens = []
        for i, expert in enumerate(self.transformers_tokens):
            token = expert(self.ln_pre(torch.cat([context, latent_tokens[:, i : i + 1]], 1)))[:, -1:]
            tokens.append(token)
            context = torch.cat([context, token], 1)
        tokens = self.ln_post(torch.cat(tokens, 1)).transpose(1, 2).unsqueeze(-1)  # [B, width, L, 1]
        return self.conv_out(tokens).reshape(-1, self.token_size, 1, self.num_latent_tokens)


class TiTokDecoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        vq = config.model.vq_model
        self.grid = config.dataset.preprocessing.crop_size // vq.vit_dec_patch_size
        depth, heads = {"small": (8, 8), "base": (12, 12), "large": (30, 16)}[vq.vit_dec_model_size]
        self.decoder_embed = nn.Linear(vq.token_size, vq.width)
        self.class_embedding = nn.Parameter(torch.randn(1, vq.width))
        self.positional_embedding = nn.Parameter(torch.randn(self.grid**2 + 1, vq.width))
        self.mask_token = nn.Parameter(torch.randn(1, 1, vq.width))
        self.latent_token_positional_embedding = nn.Parameter(torch.randn(vq.num_latent_tokens, vq.width))
        self.ln_pre, self.ln_post = nn.LayerNorm(vq.width), nn.LayerNorm(vq.width)
        self.transformer = nn.ModuleList([ResidualAttentionBlock(vq.width, heads) for _ in range(depth)])
        self.ffn = nn.Sequential(nn.Conv2d(vq.width, 2 * vq.width, 1), nn.Tanh(), nn.Conv2d(2 * vq.width, 1024, 1))

    def forward(self, z_quantized):
        b, c, h, w = z_quantized.shape
        x = self.decoder_embed(z_quantized.reshape(b, c * h, w).transpose(1, 2))
        x = x + self.latent_token_positional_embedding
        grid = torch.cat([self.class_embedding, self.mask_token[0].expand(self.grid**2, -1)]) + self.positional_embedding
        x = self.ln_pre(torch.cat([grid.expand(b, -1, -1), x], 1))
        for block in self.transformer:
            x = block(x)
        x = self.ln_post(x[:, 1 : 1 + self.grid**2])
        return self.ffn(x.transpose(1, 2).reshape(b, -1, self.grid, self.grid))
