"""Inference preparation: an eval-only DDColor that computes the same function with less work.

`prepare_for_inference(model, precision)` returns an `InferenceDDColor`: same input (gray RGB, float32,
(B, 3, H, W) in [0, 1]) and same output (ab, float32, (B, 2, H, W)) as `DDColor.forward`.

fp32 uses exact algebra only (the result differs from the eager module by float rounding alone):

- input normalisation folded into the encoder stem (a patchify conv without padding) and into the
  image part of the refine conv: (x - mean) / std is never computed;
- spectral norm folded into plain conv weights (W / sigma computed once);
- eval-mode BatchNorm folded: into the conv before it (pixel-shuffle convs); into the LayerNorm affine
  before it (the encoder-skip BatchNorms); and the BatchNorm that follows conv -> ReLU in every decoder
  block into the *next* linear consumers of that block's output, which are all 1x1 convs (the next
  block's shuffle conv, the color decoder's input projection, the last x4 shuffle conv);
- ConvNeXt layer scale (gamma) folded into the block's second MLP layer;
- color-decoder keys and values (see `_CrossAttention`): the per-token constant (input-projection bias, level
  embedding, block-output BN shift) is dropped from the keys (softmax is shift-invariant per query) and folded
  into the output-projection bias for the values (softmax rows sum to 1), as are the key/value biases; the
  input projection of a level whose width is <= the transformer width is folded into the key/value weights;
  the sine position encoding [pos_y(row) || pos_x(col)] is projected through W_k separably, on H + W
  positions instead of H * W;
- the refine 1x1 conv folded into the color embeddings, and that 2-channel projection moved in front of
  the last pixel shuffle and blur (both linear and per-channel): the (B, 100, H, W) query maps and the
  (B, 256, H, W) pixel embedding are never built. The (B, 16 * 256, H/4, W/4) ReLU output of the last
  shuffle conv is produced and contracted to 2 channels tile by tile, so it never exists whole either;
- activations in channels-last layout (1x1 convs are then plain GEMMs over (tokens, channels)).

Unused work: the encoder's ImageNet head and final norm are not computed (timm's `features_only` model
ends at the last stage; `tests/model/test_inference.py` checks it).

bf16 / fp16: the module's heavy weights are cast to that dtype (no autocast): encoder, pixel decoder,
color-decoder input projections and key/value projections, and the last shuffle conv. LayerNorm statistics
(PyTorch's kernels accumulate them in fp32), the attention softmax (accumulated in fp32 by SDPA), the
100-query transformer stream, the color embeddings and the final projection to ab all stay fp32.
bf16 needs a CPU with AVX512-BF16 / AMX (or a GPU) to be fast; fp16 on a CPU without AMX-FP16 is slower than
fp32 (oneDNN falls back to slow kernels): use it on CUDA.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from ddcolor.model.color_decoder import CrossAttentionLayer
from ddcolor.model.ddcolor import DDColor, check_gray_rgb_shape
from ddcolor.model.layers import SpectralNormConv2d, blur_2x2

__all__ = ["PRECISIONS", "InferenceDDColor", "prepare_for_inference"]

PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Bytes of last-shuffle-conv ReLU output per tile ("auto" tiling). CPU: about the L2 cache, i.e. 256 (fp32) or
# 512 (bf16) tokens x 4096 channels. Measured for that stage on a 2-core Sapphire Rapids at 512 px: fp32 127 ms
# (vs 192 with 4096-token tiles, 245 with one tile), bf16 56 ms (vs 170, 191). CUDA: large tiles, only to
# bound memory.
TILE_BYTES = {"cpu": 4 * 2**20, "cuda": 256 * 2**20}


# ----------------------------------------------------------------------------------------------------------
# folding helpers (all on detached fp32 tensors)


def _sn_conv_params(sn_conv: SpectralNormConv2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight / sigma and bias (zeros when the conv has none) of a spectral-norm conv."""
    weight = sn_conv.normalized_weight().detach().clone()
    bias = sn_conv.bias.detach().clone() if sn_conv.bias is not None else weight.new_zeros(weight.shape[0])
    return weight, bias


def _bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as y = scale * x + shift."""
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    return scale, bn.bias.detach() - bn.running_mean * scale


def _fold_output_affine(weight, bias, scale, shift):
    """affine(conv(x)) -> conv'(x): scale the output rows."""
    return weight * scale.view(-1, *([1] * (weight.ndim - 1))), bias * scale + shift


def _fold_input_affine(weight, bias, scale, shift):
    """conv1x1(scale * x + shift) -> conv1x1'(x): scale the input columns; exact for 1x1 / linear only."""
    if weight.ndim == 4 and weight.shape[-2:] != (1, 1):
        # a k x k conv with zero padding would see `shift` inside the image but 0 at the border: not exact
        raise ValueError(f"an input affine folds exactly into 1x1 convs only, got a {tuple(weight.shape)} weight")
    w2 = weight.flatten(1)  # (out, in) for a 1x1 conv or a linear layer
    return weight * scale.view(1, -1, *([1] * (weight.ndim - 2))), bias + w2 @ shift


def _linear(weight: torch.Tensor, bias: torch.Tensor) -> nn.Linear:
    """A linear layer over channels from a linear or 1x1-conv weight."""
    if weight.ndim == 4 and weight.shape[-2:] != (1, 1):
        raise ValueError(f"only a 1x1 conv is a linear layer over channels, got a {tuple(weight.shape)} weight")
    weight = weight.flatten(1)
    layer = nn.Linear(weight.shape[1], weight.shape[0])
    layer.weight.data.copy_(weight)
    layer.bias.data.copy_(bias)
    return layer


def _conv(weight: torch.Tensor, bias: torch.Tensor | None, padding: int) -> nn.Conv2d:
    out_chs, in_chs, k, _ = weight.shape
    conv = nn.Conv2d(in_chs, out_chs, k, padding=padding, bias=bias is not None)
    conv.weight.data.copy_(weight)
    if bias is not None:
        conv.bias.data.copy_(bias)
    return conv


def _blur(x: torch.Tensor) -> torch.Tensor:
    """Upstream anti-checkerboard blur (`ddcolor.model.layers.blur_2x2`, compilable on channels-last tensors)."""
    return blur_2x2(x)


def _fold_encoder(backbone: nn.Module, mean: torch.Tensor, std: torch.Tensor) -> bool:
    """Fold ConvNeXt layer scale into fc2 and the input normalisation into the stem conv, in place.

    Returns:
        True when the normalisation was folded (the stem is a padding-free conv applied first).
    """
    for block in backbone.modules():
        gamma = getattr(block, "gamma", None)
        fc2 = getattr(getattr(block, "mlp", None), "fc2", None)
        if type(block).__name__ == "ConvNeXtBlock" and isinstance(gamma, torch.Tensor) and fc2 is not None:
            with torch.no_grad():
                fc2.weight.mul_(gamma.view(-1, *([1] * (fc2.weight.ndim - 1))))
                if fc2.bias is not None:
                    fc2.bias.mul_(gamma)
            block.gamma = None
    if type(backbone).__name__ != "FeatureListNet":
        return False
    stem = next(iter(backbone.children()))
    if not (
        isinstance(stem, nn.Conv2d)
        and stem.groups == 1
        and stem.in_channels == 3
        and all(p == 0 for p in stem.padding)
        and stem.bias is not None
    ):
        return False
    # conv((x - m) / s) = conv_{W / s}(x) + (b - sum_{c,k} W[o, c, k] m_c / s_c); exact without padding
    with torch.no_grad():
        inv_std = (1.0 / std).view(1, 3, 1, 1)
        stem.bias.sub_((stem.weight * (mean.view(1, 3, 1, 1) * inv_std)).sum(dim=(1, 2, 3)))
        stem.weight.mul_(inv_std)
    return True


def _sine_table(n: int | torch.Tensor, num_pos_feats: int, device: torch.device, temperature: float = 10000.0):
    """One axis of `sine_position_encoding`: (n, num_pos_feats), sin on even and cos on odd features."""
    embed = torch.arange(1, n + 1, dtype=torch.float32, device=device)
    embed = embed / (embed[-1:] + 1e-6) * (2 * math.pi)
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)
    pos = embed[:, None] / dim_t
    return torch.stack((pos[:, 0::2].sin(), pos[:, 1::2].cos()), dim=2).flatten(1)


# ----------------------------------------------------------------------------------------------------------
# folded modules


class _UpBlock(nn.Module):
    """`UnetBlockWide` with every norm folded: relu(conv3x3(shuffle-blur(relu(conv1x1 x)) || relu(LN'(skip))))."""

    def __init__(self, up_conv: nn.Linear, skip_norm: nn.Module, conv: nn.Conv2d, blur: bool) -> None:
        super().__init__()
        self.up_conv = up_conv  # 1x1 conv as a linear layer over channels-last tokens
        self.skip_norm = skip_norm  # encoder LayerNorm2d with the skip BatchNorm folded into its affine
        self.conv = conv
        self.blur = blur

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        up = F.relu(_conv1x1(self.up_conv, x), inplace=True)
        up = F.pixel_shuffle(up, 2)
        if self.blur:
            up = _blur(up)
        skip = self.skip_norm(skip)
        if up.shape[-2:] != skip.shape[-2:]:  # odd feature sizes only; as upstream
            up = F.interpolate(up, skip.shape[-2:], mode="nearest")
        # relu(up) == up (it is a blurred ReLU output), so only the skip half needs the ReLU
        return F.relu(self.conv(torch.cat([up, F.relu_(skip)], dim=1)), inplace=True)


def _conv1x1(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A 1x1 conv as a GEMM over channels-last tokens; returns the layout of `x` (channels-last or not)."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return layer(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    return F.conv2d(x, layer.weight[:, :, None, None], layer.bias)


class _CrossAttention(nn.Module):
    """`CrossAttentionLayer` on precomputed keys and values; queries, softmax accumulation and output fp32.

    Folds (exact algebra): with src = P f + c (input projection P, bias c: level embedding, BN shift, conv bias),
    keys W_k (src + pos) + b_k and values W_v src + b_v,
    - the key bias W_k c + b_k is the same for every key, and softmax is invariant to a per-query constant:
      dropped;
    - the value bias W_v c + b_v passes through attention unchanged (softmax rows sum to 1): folded into
      the output projection's bias;
    - W_k P and W_v P are precomputed when that is cheaper (P square or wider than tall), so the input
      projection of that level is never run;
    - W_k pos = W_k[:, :C/2] pos_y(row) + W_k[:, C/2:] pos_x(col), computed on h + w positions.
    """

    def __init__(
        self, layer: CrossAttentionLayer, proj: torch.Tensor | None, src_bias: torch.Tensor, hidden_dim: int
    ) -> None:
        super().__init__()
        attn = layer.multihead_attn
        w_q, w_k, w_v = attn.in_proj_weight.detach().chunk(3)
        b_q, _, b_v = attn.in_proj_bias.detach().chunk(3)
        self.num_heads = attn.num_heads
        self.q_proj = _linear(w_q, b_q)
        w_o, b_o = attn.out_proj.weight.detach(), attn.out_proj.bias.detach()
        self.out_proj = _linear(w_o, b_o + w_o @ (w_v @ src_bias + b_v))
        self.k_proj = nn.Linear(w_k.shape[1] if proj is None else proj.shape[1], w_k.shape[0], bias=False)
        self.v_proj = nn.Linear(self.k_proj.in_features, w_v.shape[0], bias=False)
        self.k_proj.weight.data.copy_(w_k if proj is None else w_k @ proj)
        self.v_proj.weight.data.copy_(w_v if proj is None else w_v @ proj)
        half = hidden_dim // 2
        self.register_buffer("k_pos_y", w_k[:, :half].clone())  # fp32: tiny, and the sine tables are fp32
        self.register_buffer("k_pos_x", w_k[:, half:].clone())
        self.norm = layer.norm

    def keys_values(self, src: torch.Tensor, height, width) -> tuple[torch.Tensor, torch.Tensor]:
        """src (B, h*w, Cin) tokens in the heavy dtype -> keys with positions, values (B, heads, h*w, C/heads)."""
        B, N, _ = src.shape
        half = self.k_pos_y.shape[1]
        k = self.k_proj(src)
        C, h = k.shape[-1], self.num_heads
        pos_y = (_sine_table(height, half, src.device) @ self.k_pos_y.t()).to(k.dtype)  # (h, C)
        pos_x = (_sine_table(width, half, src.device) @ self.k_pos_x.t()).to(k.dtype)  # (w, C)
        k = k.view(B, height, width, C)
        if torch.jit.is_tracing():  # in-place updates of a view do not trace well
            k = k + pos_y[:, None, :] + pos_x[None, :, :]
        else:
            k.add_(pos_y[:, None, :]).add_(pos_x[None, :, :])
        v = self.v_proj(src)
        return k.view(B, N, h, C // h).transpose(1, 2), v.view(B, N, h, C // h).transpose(1, 2)

    def forward(self, tgt, query_pos, k, v):
        B, Q, C = tgt.shape
        h = self.num_heads
        q = self.q_proj(tgt + query_pos).view(B, Q, h, C // h).transpose(1, 2).to(k.dtype)
        out = F.scaled_dot_product_attention(q, k, v).float()  # (B, h, Q, C/h), fp32 softmax accumulation
        return self.norm(tgt + self.out_proj(out.transpose(1, 2).reshape(B, Q, C)))


class InferenceDDColor(nn.Module):
    """Eval-only DDColor with the folds listed in the module docstring.

    Takes and returns the same tensors as `DDColor.forward`: gray RGB (B, 3, H, W) float in [0, 1] ->
    ab (B, 2, H, W) float32 in Lab units; H and W multiples of 32.

    Attributes:
        precision: "fp32", "bf16" or "fp16": dtype of the heavy layers.
        tile_tokens: tokens per tile of the last shuffle conv: "auto" (by `TILE_BYTES`), an int, or None
            (one tile; used for ONNX export).
        channels_last: run the convolutional parts in channels-last layout.
    """

    def __init__(
        self,
        model: DDColor,
        precision: str = "fp32",
        *,
        tile_tokens: int | str | None = "auto",
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        if not isinstance(model, DDColor):
            raise TypeError(f"expected a DDColor model, got {type(model).__name__}")
        self.precision = precision
        self.tile_tokens = tile_tokens
        self.channels_last = channels_last
        model = copy.deepcopy(model).float().eval()
        device = model.mean.device
        config = model.config
        mean, std = model.mean.detach().view(3), model.std.detach().view(3)

        # encoder: layer scale and input normalisation folded in
        self.backbone = model.encoder.backbone
        self.normalize_input = not _fold_encoder(self.backbone, mean, std)
        self.register_buffer("mean", model.mean.detach().clone())
        self.register_buffer("std", model.std.detach().clone())
        norms = list(model.encoder.norms)

        # pixel decoder: spectral norm + BN folded; block output BN folded into its 1x1 consumers
        pd = model.pixel_decoder
        blocks, out_affine = [], None  # out_affine: (scale, shift) of the previous block's output BN
        input_proj = []
        for level, (block, skip_level) in enumerate(zip(pd.layers, (2, 1, 0), strict=True)):
            w, b = _sn_conv_params(block.shuf.conv[0])
            if len(block.shuf.conv) > 1:  # [conv, BN]
                w, b = _fold_output_affine(w, b, *_bn_affine(block.shuf.conv[1]))
            if out_affine is not None:
                w, b = _fold_input_affine(w, b, *out_affine)
            skip_norm = norms[skip_level]
            scale, shift = _bn_affine(block.bn)  # BN(LN(x)) = LN with affine (g * scale, beta * scale + shift)
            with torch.no_grad():
                skip_norm.bias.copy_(skip_norm.bias * scale + shift)
                skip_norm.weight.mul_(scale)
            cw, cb = _sn_conv_params(block.conv[0])  # conv3x3 without bias (a BN follows its ReLU)
            conv = _conv(cw, None if block.conv[0].bias is None else cb, padding=block.conv[0].padding)
            blocks.append(_UpBlock(_linear(w, b), skip_norm, conv, blur=not isinstance(block.shuf.blur, nn.Identity)))
            out_affine = _bn_affine(block.conv[2])
            # color decoder input projection of this level, with the block's output BN and level embedding
            proj = model.color_decoder.input_proj[level]
            pw, pb = _fold_input_affine(proj.weight.detach()[:, :, 0, 0], proj.bias.detach(), *out_affine)
            input_proj.append((pw, pb + model.color_decoder.level_embed.weight.detach()[level]))
        self.blocks = nn.ModuleList(blocks)
        self.deep_norm = norms[3]

        # last x4 shuffle conv (no BN), with the last block's output BN folded in
        w, b = _sn_conv_params(pd.last_shuf.conv[0])
        w, b = _fold_input_affine(w, b, *out_affine)
        embed_dim = pd.embed_dim
        self.embed_dim = embed_dim
        self.num_outputs = config.num_output_channels  # python ints: static shapes in an ONNX export
        self.last_scale = math.isqrt(w.shape[0] // embed_dim)
        # reorder the outputs from (e, sub) to (sub, e), sub = sub-pixel: each token's ReLU output is then a
        # contiguous (s * s, E) matrix that one GEMM contracts with the (E, 2) ab embedding
        subs = self.last_scale**2
        w = w.flatten(1).view(embed_dim, subs, -1).transpose(0, 1).reshape(subs * embed_dim, -1)
        b = b.view(embed_dim, subs).t().reshape(-1)
        self.last_conv = _linear(w, b)  # (s * s * E, C)
        self.last_blur = not isinstance(pd.last_shuf.blur, nn.Identity)

        # color decoder: cross-attention layers rewritten, the 100-query stream as is (fp32, cheap)
        cd = model.color_decoder
        self.num_levels = cd.num_feature_levels
        # a level's input projection runs once and feeds 3 layers' keys and values; folding it into them costs
        # 3 * 2 * C * Cin per token instead of C * Cin + 3 * 2 * C * C: cheaper when Cin <= C
        fold_proj = [pw.shape[1] <= pw.shape[0] for pw, _ in input_proj]
        self.input_proj = nn.ModuleList()
        for (pw, _), fold in zip(input_proj, fold_proj, strict=True):
            # no bias: it is folded into the attention (see `_CrossAttention`)
            layer = nn.Identity() if fold else nn.Linear(pw.shape[1], pw.shape[0], bias=False)
            if not fold:
                layer.weight.data.copy_(pw)
            self.input_proj.append(layer)
        self.cross_attn = nn.ModuleList(
            _CrossAttention(
                layer,
                input_proj[i % self.num_levels][0] if fold_proj[i % self.num_levels] else None,
                input_proj[i % self.num_levels][1],
                config.hidden_dim,
            )
            for i, layer in enumerate(cd.transformer_cross_attention_layers)
        )
        self.self_attn = cd.transformer_self_attention_layers
        self.ffn = cd.transformer_ffn_layers
        self.decoder_norm = cd.decoder_norm
        self.color_embed = cd.color_embed
        self.register_buffer("query_feat", cd.query_feat.weight.detach().clone())
        self.register_buffer("query_pos", cd.query_embed.weight.detach().clone())

        # refine 1x1 conv on [query maps || x]: the query part folds into the color embeddings, the image part
        # (with the input normalisation folded in) stays a 3 -> 2 conv on the raw input
        rw, rb = _sn_conv_params(model.refine)
        rw = rw[:, :, 0, 0]  # (2, Q + 3)
        self.register_buffer("ab_from_queries", rw[:, : config.num_queries].clone())  # (2, Q)
        xw = rw[:, config.num_queries :]  # applied to the raw input: W (x - m) / s + b = (W / s) x + b - W m / s
        self.image_conv = _linear(xw / std, rb - (xw * mean / std).sum(dim=1))

        # heavy layers to the low-precision dtype
        dtype = PRECISIONS[precision]
        heavy = [self.backbone, *norms, self.blocks, self.input_proj, self.last_conv]
        heavy += [m for layer in self.cross_attn for m in (layer.k_proj, layer.v_proj)]
        for module in heavy:
            module.to(dtype)
        self.to(device)
        self.eval()
        self.requires_grad_(False)

    @property
    def dtype(self) -> torch.dtype:
        return PRECISIONS[self.precision]

    def _last_stage(self, x: torch.Tensor, ab_embed: torch.Tensor) -> torch.Tensor:
        """relu(last_conv(x)) contracted with ab_embed per sub-pixel, then shuffled and blurred.

        x: (B, C, h, w) last block output; ab_embed: (B, O, E) fp32. Returns (B, O, s*h, s*w) fp32.
        """
        B, _, h, w = x.shape
        s, n_out, E = self.last_scale, self.num_outputs, self.embed_dim
        tokens = x.permute(0, 2, 3, 1).reshape(B, h * w, -1)  # free view when channels-last
        n = h * w
        tile = self.tile_tokens
        if tile == "auto":
            row_bytes = self.last_conv.out_features * self.last_conv.weight.element_size()
            tile = max(1, TILE_BYTES.get(x.device.type, TILE_BYTES["cuda"]) // row_bytes)
        if tile is None or tile >= n:
            r = F.relu(self.last_conv(tokens)).float()  # (B, n, s * s * E)
            out = torch.bmm(ab_embed, r.view(B, n * s * s, E).transpose(1, 2))  # (B, O, n * s * s)
        else:
            per_image = []
            for b in range(B):
                tiles = []
                for start in range(0, n, tile):
                    r = F.relu_(self.last_conv(tokens[b, start : start + tile])).float()
                    tiles.append(torch.mm(ab_embed[b], r.view(-1, E).t()))  # (O, t * s * s)
                per_image.append(torch.cat(tiles, dim=1))
            out = torch.stack(per_image)  # (B, O, n * s * s)
        out = out.reshape(B, n_out, h, w, s, s).permute(0, 1, 2, 4, 3, 5).reshape(B, n_out, h * s, w * s)
        return _blur(out) if self.last_blur else out

    def forward(self, gray_rgb: torch.Tensor) -> torch.Tensor:
        """gray RGB (B, 3, H, W) in [0, 1] -> ab (B, 2, H, W) float32; see `DDColor.forward`."""
        check_gray_rgb_shape(gray_rgb.shape, check_size=not torch.jit.is_tracing())
        with torch.no_grad():
            return self._forward(gray_rgb.float())

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.dtype
        image = x
        if self.normalize_input:
            x = (x - self.mean) / self.std
        x = x.to(dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        features = self.backbone(x)  # strides 4, 8, 16, 32
        y = self.deep_norm(features[-1])
        multi_scale = []
        for block, skip in zip(self.blocks, features[-2::-1], strict=True):
            y = block(y, skip)
            multi_scale.append(y)

        # color decoder: keys/values per level, then the 100-query transformer in fp32
        B = x.shape[0]
        kv_levels = []
        for level, feature in enumerate(multi_scale):
            _, _, fh, fw = feature.shape
            src = self.input_proj[level](feature.permute(0, 2, 3, 1).reshape(B, fh * fw, -1))
            kv_levels.append((src, fh, fw))
        query_pos = self.query_pos.unsqueeze(0).expand(B, -1, -1)
        output = self.query_feat.unsqueeze(0).expand(B, -1, -1)
        for i, cross in enumerate(self.cross_attn):
            src, fh, fw = kv_levels[i % self.num_levels]
            k, v = cross.keys_values(src, fh, fw)
            output = cross(output, query_pos, k, v)
            output = self.self_attn[i](output, query_pos)
            output = self.ffn[i](output)
        color_embed = self.color_embed(self.decoder_norm(output))  # (B, Q, E) fp32
        ab_embed = torch.matmul(self.ab_from_queries, color_embed)  # (B, 2, E)

        ab = self._last_stage(y, ab_embed)  # (B, 2, H, W)
        # + the image part of the refine conv, a 3 -> 2 1x1 conv, as one batched GEMM (faster than conv2d)
        n_out, (H, W) = self.num_outputs, ab.shape[-2:]
        weight = self.image_conv.weight.unsqueeze(0).expand(B, -1, -1)
        ab = torch.baddbmm(ab.reshape(B, n_out, H * W), weight, image.reshape(B, 3, H * W))
        return (ab + self.image_conv.bias.view(1, n_out, 1)).view(B, n_out, H, W)


def prepare_for_inference(
    model: DDColor,
    precision: str = "fp32",
    *,
    tile_tokens: int | str | None = "auto",
    channels_last: bool = True,
) -> InferenceDDColor:
    """Return an eval-only copy of `model` that computes the same ab faster; `model` is not modified.

    Args:
        model: a `DDColor` (any mode; the copy is put in eval mode, on the model's device).
        precision: "fp32" (same function, exact algebra; ab within ~1e-6 of the eager module),
            "bf16" or "fp16" (heavy layers in that dtype; ab within ~1% of its range).
        tile_tokens: tokens per tile of the last shuffle conv: "auto", an int, or None for one tile.
        channels_last: channels-last activations (faster on CPU with oneDNN).

    Returns:
        An `InferenceDDColor` in eval mode without gradients: float32 gray RGB in, float32 ab out.
    """
    return InferenceDDColor(model, precision=precision, tile_tokens=tile_tokens, channels_last=channels_last)
