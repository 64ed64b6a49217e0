"""Axial self-attention blocks of the multi-scale refinement module (MSRM) of VQIR.

Two transformer blocks that attend along the axes of a feature map (B, C, H, W) instead of over
all H*W positions. Each splits its C channels in two halves, one per axis:

* ``IntraAxialBlock`` -- attention *inside* rows and columns. The first half treats every row
  as a sequence of W pixel tokens (attention along W), the second half every column as a
  sequence of H pixel tokens (attention along H). Heads split the C/2 channels of a token.
* ``InterAxialBlock`` -- attention *between* rows and between columns. The first half treats
  each whole row as one token (H tokens whose feature is all W positions times C/2 channels),
  the second half each whole column (W tokens of H positions times C/2 channels). Head g owns
  channel group g of the half at every position, so its scores are scaled by
  1/sqrt(C/2/heads * W) for rows and 1/sqrt(C/2/heads * H) for columns.

Both blocks are pre-norm: ``x + fuse_out(axial attention(conv_input(LayerNorm(x))))``, then
``x + Mlp(LayerNorm(x))``, then a depth-wise 3x3 positional conv with its own skip (``PEG``).
Parameter names, shapes and order are those of the reference (``Intra_SA`` / ``Inter_SA``) so
its checkpoints load strictly.

Layout: inside a block the feature is kept as tokens (B, H, W, C) with channels last; a
(B, C, H, W) tensor in ``torch.channels_last`` memory format is exactly that, so a stack of blocks
passes features on without copies. The 1x1 convolutions are applied as matrix products on the
token layout (their weights are the convs' own). Attention runs through
``torch.nn.functional.scaled_dot_product_attention``; the only copies are the ones the axes
force: the column half of ``IntraAxialBlock`` is transposed once, ``InterAxialBlock`` gathers
each head's row/column into one contiguous vector, and the two halves are concatenated before
``fuse_out``. On CPU the token-wise residual MLP runs over chunks of ``FEED_FORWARD_CHUNK``
tokens, so that its 4C-wide intermediate stays in cache.

A plain formulation (explicit softmax, NCHW layout, the reference's token ordering) is kept as a
private reference for the tests: set ``_explicit_attention = True`` on a block.
"""
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ['Mlp', 'PEG', 'IntraAxialBlock', 'InterAxialBlock']

# Tokens per chunk of the feed-forward step on CPU (its 4C-wide intermediate is then a few MB).
FEED_FORWARD_CHUNK = 1024


class Mlp(nn.Module):
    """Token-wise feed-forward network: Linear(C, 4C) - GELU (exact, erf) - Linear(4C, C). (..., C) -> (..., C)."""

    def __init__(self, dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class PEG(nn.Module):
    """Conditional positional encoding (Chu et al., CPVT): x + depth-wise 3x3 conv(x). (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, dim):
        super().__init__()
        self.PEG = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)

    def forward(self, x):
        return self.PEG(x) + x


def _linear_1x1(tokens, conv):
    """Apply a 1x1 nn.Conv2d to channels-last tokens (..., C_in) -> (..., C_out)."""
    return F.linear(tokens, conv.weight.flatten(1), conv.bias)


def _explicit_multi_head_attention(q, k, v, num_heads, scale):
    """Plain softmax attention. q, k, v: (N, L, D), heads split D in num_heads consecutive chunks -> (N, L, D)."""
    n, length, dim = q.shape
    q, k, v = (t.reshape(n, length, num_heads, dim // num_heads).transpose(1, 2) for t in (q, k, v))
    weights = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * scale, dim=-1)
    return torch.matmul(weights, v).transpose(1, 2).reshape(n, length, dim)


class _AxialBlock(nn.Module):
    """Shared skeleton of the two axial blocks; subclasses define the modules and the attention."""

    def __init__(self, dim, num_heads):
        super().__init__()
        name = type(self).__name__
        if dim % 2 != 0:
            raise ValueError(f'{name}: dim must be even (half the channels per axis), got {dim}')
        if num_heads < 1 or (dim // 2) % num_heads != 0:
            raise ValueError(f'{name}: num_heads={num_heads} must divide dim/2={dim // 2}')
        self.dim = dim
        self.num_heads = num_heads
        self._explicit_attention = False

    def forward(self, x):
        """x: (B, C, H, W) -> (B, C, H, W), returned in channels_last memory format."""
        if x.dim() != 4 or x.shape[1] != self.dim:
            raise ValueError(f'{type(self).__name__}: expected input (B, {self.dim}, H, W), got {tuple(x.shape)}')
        tokens = x.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)  # (B, H, W, C), a view
        if self._explicit_attention:
            mixed = self._attention_explicit(self.attention_norm(tokens))
        else:
            mixed = self._attention(self.attention_norm(tokens))
        return self.PEG(self._residual_feed_forward(tokens, mixed).permute(0, 3, 1, 2))

    def _residual_feed_forward(self, tokens, mixed):
        """y = tokens + mixed; y + ffn(ffn_norm(y)). tokens, mixed: (B, H, W, C) -> (B, H, W, C), contiguous.

        Every step is token-wise, so on CPU it runs over chunks of tokens: the (tokens, 4C)
        intermediate of the MLP then stays in cache instead of making several trips to memory.
        """
        if tokens.device.type != 'cpu' or tokens.shape[:3].numel() <= FEED_FORWARD_CHUNK:
            y = tokens + mixed
            return y + self.ffn(self.ffn_norm(y))
        chunks = []
        for t, m in zip(tokens.reshape(-1, self.dim).split(FEED_FORWARD_CHUNK),
                        mixed.reshape(-1, self.dim).split(FEED_FORWARD_CHUNK)):
            y = t + m
            chunks.append(y + self.ffn(self.ffn_norm(y)))
        return torch.cat(chunks).view(tokens.shape)

    def _fuse(self, first_half, second_half):
        """Concatenate the halves, each (B, H, W, heads, head_dim), and apply fuse_out -> (B, H, W, C)."""
        return _linear_1x1(torch.cat((first_half, second_half), dim=3).flatten(3), self.fuse_out)


class IntraAxialBlock(_AxialBlock):
    """Attention along each row (first C/2 channels) and along each column (last C/2 channels).

    Tokens are pixels; heads split the C/2 channels of a token (head size C/2/num_heads), scores
    are scaled by 1/sqrt(head size). (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, dim, num_heads):
        super().__init__(dim, num_heads)
        half = dim // 2
        self.attention_norm = nn.LayerNorm(dim)
        self.conv_input = nn.Conv2d(dim, dim, kernel_size=1)
        self.qkv_local_h = nn.Linear(half, 3 * half)  # row attention
        self.qkv_local_v = nn.Linear(half, 3 * half)  # column attention
        self.fuse_out = nn.Conv2d(dim, dim, kernel_size=1)
        self.ffn_norm = nn.LayerNorm(dim)
        self.ffn = Mlp(dim)
        self.PEG = PEG(dim)

    def _attend_within_sequences(self, qkv):
        """qkv: (B, S, L, 3*C/2), attention over the L tokens of each of the B*S sequences.

        Returns (B, S, L, heads, head_dim), a view of the attention output.
        """
        b, s, length, three_half = qkv.shape
        half = three_half // 3
        head_dim = half // self.num_heads
        # (B*S, heads, L, head_dim) strided views: no copy, SDPA reads strides
        q, k, v = (qkv[..., i * half:(i + 1) * half].reshape(b * s, length, self.num_heads, head_dim).transpose(1, 2)
                   for i in range(3))
        out = F.scaled_dot_product_attention(q, k, v, scale=head_dim**-0.5)
        return out.transpose(1, 2).view(b, s, length, self.num_heads, head_dim)

    def _attention(self, tokens):
        """tokens: (B, H, W, C) -> (B, H, W, C)."""
        half = self.dim // 2
        y = _linear_1x1(tokens, self.conv_input)
        rows = self._attend_within_sequences(self.qkv_local_h(y[..., :half]))  # (B, H, W, heads, head_dim)
        # columns need (B, W, H) order: transpose the input half once, the output goes back as a view
        cols = self._attend_within_sequences(self.qkv_local_v(y[..., half:].transpose(1, 2)))  # (B, W, H, ...)
        return self._fuse(rows, cols.transpose(1, 2))

    def _attention_explicit(self, tokens):
        """Plain reference: NCHW, explicit softmax. tokens: (B, H, W, C) -> (B, H, W, C)."""
        b, h, w, c = tokens.shape
        half = c // 2
        scale = (half // self.num_heads)**-0.5
        y = self.conv_input(tokens.permute(0, 3, 1, 2))
        y_rows, y_cols = y[:, :half], y[:, half:]
        rows = y_rows.permute(0, 2, 3, 1).reshape(b * h, w, half)  # sequences along W
        cols = y_cols.permute(0, 3, 2, 1).reshape(b * w, h, half)  # sequences along H
        rows = _explicit_multi_head_attention(*self.qkv_local_h(rows).chunk(3, dim=-1), self.num_heads, scale)
        cols = _explicit_multi_head_attention(*self.qkv_local_v(cols).chunk(3, dim=-1), self.num_heads, scale)
        rows = rows.reshape(b, h, w, half).permute(0, 3, 1, 2)
        cols = cols.reshape(b, w, h, half).permute(0, 3, 2, 1)
        return self.fuse_out(torch.cat((rows, cols), dim=1)).permute(0, 2, 3, 1)


class InterAxialBlock(_AxialBlock):
    """Attention between whole rows (first C/2 channels) and between whole columns (last C/2 channels).

    A row token holds all W positions of C/2 channels; head g holds channel group g
    (C/2/num_heads channels) at every position, so the scores of rows are scaled by
    1/sqrt(C/2/num_heads * W) and those of columns by 1/sqrt(C/2/num_heads * H).
    (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, dim, num_heads):
        super().__init__(dim, num_heads)
        half = dim // 2
        self.attention_norm = nn.LayerNorm(dim)
        self.conv_input = nn.Conv2d(dim, dim, kernel_size=1)
        self.conv_h = nn.Conv2d(half, 3 * half, kernel_size=1)  # row tokens
        self.conv_v = nn.Conv2d(half, 3 * half, kernel_size=1)  # column tokens
        self.ffn_norm = nn.LayerNorm(dim)
        self.ffn = Mlp(dim)
        self.fuse_out = nn.Conv2d(dim, dim, kernel_size=1)
        self.PEG = PEG(dim)

    def _attend_between(self, qkv, token_dim):
        """qkv: (B, H, W, 3*C/2); tokens are the slices along token_dim (1: rows, 2: columns).

        Returns (B, H, W, heads, head_dim), a view of the attention output.
        """
        b, h, w, three_half = qkv.shape
        heads = self.num_heads
        head_dim = three_half // 3 // heads
        other_dim = 3 - token_dim
        num_tokens, length = qkv.shape[token_dim], qkv.shape[other_dim]
        # one gather into (3, B, heads, tokens, positions * head_dim); the order of a token's
        # features (position-major here, channel-major in the paper) does not change dot products
        qkv = qkv.view(b, h, w, 3, heads, head_dim).permute(3, 0, 4, token_dim, other_dim, 5)
        q, k, v = qkv.reshape(3, b, heads, num_tokens, length * head_dim).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, scale=(length * head_dim)**-0.5)
        out = out.view(b, heads, num_tokens, length, head_dim)
        return out.permute(0, 2, 3, 1, 4) if token_dim == 1 else out.permute(0, 3, 2, 1, 4)

    def _attention(self, tokens):
        """tokens: (B, H, W, C) -> (B, H, W, C)."""
        half = self.dim // 2
        y = _linear_1x1(tokens, self.conv_input)
        rows = self._attend_between(_linear_1x1(y[..., :half], self.conv_h), token_dim=1)
        cols = self._attend_between(_linear_1x1(y[..., half:], self.conv_v), token_dim=2)
        return self._fuse(rows, cols)

    def _attention_explicit(self, tokens):
        """Plain reference: NCHW, explicit softmax, channel-major token features. (B, H, W, C) -> (B, H, W, C)."""
        b, h, w, c = tokens.shape
        half = c // 2
        head_dim = half // self.num_heads
        y = self.conv_input(tokens.permute(0, 3, 1, 2))
        q_r, k_r, v_r = self.conv_h(y[:, :half]).chunk(3, dim=1)  # (B, C/2, H, W) each
        q_c, k_c, v_c = self.conv_v(y[:, half:]).chunk(3, dim=1)
        rows = [t.permute(0, 2, 1, 3).reshape(b, h, half * w) for t in (q_r, k_r, v_r)]  # row r: (C/2, W) flat
        cols = [t.permute(0, 3, 1, 2).reshape(b, w, half * h) for t in (q_c, k_c, v_c)]  # column: (C/2, H) flat
        rows = _explicit_multi_head_attention(*rows, self.num_heads, (head_dim * w)**-0.5)
        cols = _explicit_multi_head_attention(*cols, self.num_heads, (head_dim * h)**-0.5)
        rows = rows.reshape(b, h, half, w).permute(0, 2, 1, 3)
        cols = cols.reshape(b, w, half, h).permute(0, 2, 3, 1)
        return self.fuse_out(torch.cat((rows, cols), dim=1)).permute(0, 2, 3, 1)
