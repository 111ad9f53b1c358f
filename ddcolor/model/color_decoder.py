"""Multi-scale color decoder: learnable color queries attend to 1/16, 1/8, 1/4 pixel-decoder features.

Mask2Former-style transformer decoder without masks (Cheng et al., CVPR 2022), as DDColor uses it:
9 post-norm layers (cross-attention -> self-attention -> FFN), cycling through the three scales; the final
query embeddings are projected onto the full-resolution pixel embedding to give one map per query.
Tensors are batch-first, (B, N, C), throughout.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MultiScaleColorDecoder", "sine_position_encoding"]


def sine_position_encoding(
    batch: int, height: int, width: int, num_pos_feats: int, *, device: torch.device, temperature: float = 10000.0
) -> torch.Tensor:
    """Normalised 2-D sine positional encoding (DETR's `PositionEmbeddingSine(normalize=True)`).

    Returns:
        (B, H*W, 2 * num_pos_feats) float32: concatenated (pos_y, pos_x) per token, row-major.
    """
    eps, scale = 1e-6, 2 * math.pi
    y_embed = torch.arange(1, height + 1, dtype=torch.float32, device=device)
    x_embed = torch.arange(1, width + 1, dtype=torch.float32, device=device)
    y_embed = y_embed / (y_embed[-1:] + eps) * scale  # (H,)
    x_embed = x_embed / (x_embed[-1:] + eps) * scale  # (W,)
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)
    pos_y = y_embed[:, None] / dim_t  # (H, F)
    pos_x = x_embed[:, None] / dim_t  # (W, F)
    # interleave sin on even features and cos on odd ones: (H, F/2, 2) -> (H, F)
    pos_y = torch.stack((pos_y[:, 0::2].sin(), pos_y[:, 1::2].cos()), dim=2).flatten(1)
    pos_x = torch.stack((pos_x[:, 0::2].sin(), pos_x[:, 1::2].cos()), dim=2).flatten(1)
    pos = torch.cat(
        (pos_y[:, None, :].expand(height, width, -1), pos_x[None, :, :].expand(height, width, -1)), dim=2
    )  # (H, W, 2F)
    return pos.reshape(1, height * width, 2 * num_pos_feats).expand(batch, -1, -1)


class MultiheadAttention(nn.Module):
    """Batch-first multi-head attention on `scaled_dot_product_attention`.

    Parameter names (`in_proj_weight`, `in_proj_bias`, `out_proj`) match `torch.nn.MultiheadAttention` so
    upstream checkpoints load unchanged.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """(B, Nq, C), (B, Nk, C), (B, Nk, C) -> (B, Nq, C)."""
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        q, k, v = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)
        B, Nq, C = q.shape
        h = self.num_heads
        q = q.view(B, Nq, h, C // h).transpose(1, 2)  # (B, h, Nq, C/h)
        k = k.view(B, -1, h, C // h).transpose(1, 2)  # (B, h, Nk, C/h)
        v = v.view(B, -1, h, C // h).transpose(1, 2)  # (B, h, Nk, C/h)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, h, Nq, C/h)
        return self.out_proj(out.transpose(1, 2).reshape(B, Nq, C))


class CrossAttentionLayer(nn.Module):
    """Queries attend to image tokens; positions are added to queries and keys, never to values. Post-norm."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.multihead_attn = MultiheadAttention(dim, num_heads)
        self.norm = nn.LayerNorm(dim)

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, pos: torch.Tensor, query_pos: torch.Tensor):
        """tgt (B, Q, C), memory (B, N, C), pos (B, N, C), query_pos (B, Q, C) -> (B, Q, C)."""
        attended = self.multihead_attn(query=tgt + query_pos, key=memory + pos, value=memory)
        return self.norm(tgt + attended)


class SelfAttentionLayer(nn.Module):
    """Queries attend to each other, with query positions on q and k. Post-norm."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.self_attn = MultiheadAttention(dim, num_heads)
        self.norm = nn.LayerNorm(dim)

    def forward(self, tgt: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
        """tgt (B, Q, C), query_pos (B, Q, C) -> (B, Q, C)."""
        q = k = tgt + query_pos
        return self.norm(tgt + self.self_attn(q, k, value=tgt))


class FFNLayer(nn.Module):
    """Linear -> ReLU -> Linear with residual, post-norm."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(dim, hidden_dim)
        self.linear2 = nn.Linear(hidden_dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, tgt: torch.Tensor) -> torch.Tensor:
        return self.norm(tgt + self.linear2(F.relu(self.linear1(tgt))))


class MLP(nn.Module):
    """`num_layers` Linear layers with ReLU between them (none after the last)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(dims))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class MultiScaleColorDecoder(nn.Module):
    """Query-based color decoder.

    Args:
        in_channels: channels of the multi-scale features, coarse to fine (strides 16, 8, 4).
        embed_dim: channels of the full-resolution pixel embedding the queries are projected onto.
        hidden_dim: transformer width.
        num_queries: number of color queries (100 in every official release).
        nheads: attention heads.
        dim_feedforward: FFN hidden width.
        dec_layers: number of decoder layers; layer i attends to scale i % len(in_channels).
    """

    def __init__(
        self,
        in_channels: list[int],
        embed_dim: int,
        *,
        hidden_dim: int = 256,
        num_queries: int = 100,
        nheads: int = 8,
        dim_feedforward: int = 2048,
        dec_layers: int = 9,
    ) -> None:
        super().__init__()
        if hidden_dim % 2:
            raise ValueError(f"hidden_dim must be even for the 2-D sine encoding, got {hidden_dim}")
        self.num_layers = dec_layers
        self.num_feature_levels = len(in_channels)
        self.transformer_self_attention_layers = nn.ModuleList(
            SelfAttentionLayer(hidden_dim, nheads) for _ in range(dec_layers)
        )
        self.transformer_cross_attention_layers = nn.ModuleList(
            CrossAttentionLayer(hidden_dim, nheads) for _ in range(dec_layers)
        )
        self.transformer_ffn_layers = nn.ModuleList(FFNLayer(hidden_dim, dim_feedforward) for _ in range(dec_layers))
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.query_feat = nn.Embedding(num_queries, hidden_dim)  # learnable query content
        self.query_embed = nn.Embedding(num_queries, hidden_dim)  # learnable query positions
        self.level_embed = nn.Embedding(self.num_feature_levels, hidden_dim)
        self.input_proj = nn.ModuleList(nn.Conv2d(c, hidden_dim, kernel_size=1) for c in in_channels)
        for proj in self.input_proj:
            nn.init.kaiming_uniform_(proj.weight, a=1)  # Mask2Former's c2_xavier_fill
            nn.init.zeros_(proj.bias)
        self.color_embed = MLP(hidden_dim, hidden_dim, embed_dim, num_layers=3)

    def query_embeddings(self, multi_scale: list[torch.Tensor]) -> torch.Tensor:
        """Run the transformer decoder.

        Args:
            multi_scale: features at strides 16, 8, 4, each (B, in_channels[i], h_i, w_i).

        Returns:
            (B, num_queries, embed_dim) color embeddings, to be projected onto the pixel embedding.
        """
        B = multi_scale[0].shape[0]
        hidden_dim = self.query_feat.weight.shape[1]
        src, pos = [], []
        for i, feature in enumerate(multi_scale):
            _, _, h, w = feature.shape
            pos.append(sine_position_encoding(B, h, w, hidden_dim // 2, device=feature.device).to(feature.dtype))
            tokens = self.input_proj[i](feature).flatten(2).transpose(1, 2)  # (B, h*w, hidden)
            src.append(tokens + self.level_embed.weight[i])
        query_pos = self.query_embed.weight.unsqueeze(0).expand(B, -1, -1)  # (B, Q, hidden)
        output = self.query_feat.weight.unsqueeze(0).expand(B, -1, -1)  # (B, Q, hidden)
        for i in range(self.num_layers):
            level = i % self.num_feature_levels  # round robin: 1/16, 1/8, 1/4, 1/16, ...
            # attention: cross-attention first
            output = self.transformer_cross_attention_layers[i](output, src[level], pos[level], query_pos)
            output = self.transformer_self_attention_layers[i](output, query_pos)
            output = self.transformer_ffn_layers[i](output)
        return self.color_embed(self.decoder_norm(output))  # (B, Q, embed_dim)

    def forward(self, multi_scale: list[torch.Tensor], pixel_embedding: torch.Tensor) -> torch.Tensor:
        """Predict one map per color query.

        Args:
            multi_scale: features at strides 16, 8, 4, each (B, in_channels[i], h_i, w_i).
            pixel_embedding: (B, embed_dim, H, W) full-resolution embedding.

        Returns:
            (B, num_queries, H, W) query maps (unbounded).
        """
        return torch.einsum("bqc,bchw->bqhw", self.query_embeddings(multi_scale), pixel_embedding)
