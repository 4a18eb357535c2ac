"""PyTorch towers whose parameter names are those of open_clip checkpoints.

An open_clip state dict loads into these modules as it is (``load_state_dict(strict=True)``),
so open_clip, timm and torchvision are never imported. Two layouts:

- OpenAI-style ViT (``visual.conv1``, ``visual.transformer.resblocks.N``, ``token_embedding``,
  ``transformer.resblocks.N``, ``text_projection``): :class:`OpenAIVisionTower` and
  :class:`OpenAITextTower`, as in OpenAI's CLIP and open_clip's ``VisionTransformer`` /
  ``TextTransformer``.
- timm ViT image tower (``visual.trunk.*``, ``visual.head.*``) as in BiomedCLIP:
  :class:`TimmImageTower`. Its Hugging Face text tower (``text.transformer.*``) is a
  transformers model wrapped by :class:`HFTextTower`.

Attention is written out with plain tensor operations, which export to ONNX on every opset.

The image towers return the image embedding and the patch tokens of the same pass, in the
joint space: every token but the class token through the steps that turn the pooled token into
the embedding. For the OpenAI layout that is ``ln_post`` and ``proj`` (open_clip's
``VisionTransformer(output_tokens=True)`` returns the tokens after ``ln_post`` but before
``proj``, which would leave them outside the text embeddings' space); for the timm layout the
trunk's final ``norm`` and open_clip's ``head`` (linear, or the MLP applied token by token).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Literal

import torch
from torch import nn

VisionPool = Literal["tok", "avg"]
TextPool = Literal["argmax", "eos", "first", "last"]
HFPooler = Literal["cls_pooler", "cls_last_hidden_state_pooler", "mean_pooler"]


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation OpenAI's CLIP weights were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def activation(quick_gelu: bool) -> nn.Module:
    return QuickGELU() if quick_gelu else nn.GELU()


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, mask: torch.Tensor | None
) -> torch.Tensor:
    """Multi-head scaled dot-product attention on [N, L, W] tensors."""
    n, length, width = q.shape
    head_dim = width // heads

    def split(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(n, length, heads, head_dim).transpose(1, 2)

    scores = split(q) @ split(k).transpose(-2, -1) * (1.0 / math.sqrt(head_dim))
    if mask is not None:
        scores = scores + mask
    out = scores.softmax(dim=-1) @ split(v)
    return out.transpose(1, 2).reshape(n, length, width)


class SelfAttention(nn.Module):
    """``nn.MultiheadAttention``'s parameters (``in_proj_weight``, ``out_proj``), batch first."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = nn.functional.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        return self.out_proj(_attend(q, k, v, self.heads, mask))  # type: ignore[no-any-return]


class ResidualAttentionBlock(nn.Module):
    """OpenAI CLIP's pre-norm transformer block (``ln_1``, ``attn``, ``ln_2``, ``mlp``)."""

    def __init__(self, width: int, heads: int, mlp_width: int, quick_gelu: bool) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(
                [
                    ("c_fc", nn.Linear(width, mlp_width)),
                    ("gelu", activation(quick_gelu)),
                    ("c_proj", nn.Linear(mlp_width, width)),
                ]
            )
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))  # type: ignore[no-any-return]


class Transformer(nn.Module):
    def __init__(
        self, width: int, layers: int, heads: int, mlp_width: int, quick_gelu: bool
    ) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, mlp_width, quick_gelu) for _ in range(layers)
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, mask)
        return x


class OpenAIVisionTower(nn.Module):
    """open_clip's ``VisionTransformer`` (OpenAI layout): ``visual.*`` of the checkpoint."""

    def __init__(
        self,
        *,
        image_size: int,
        patch_size: int,
        width: int,
        layers: int,
        heads: int,
        mlp_width: int,
        output_dim: int,
        quick_gelu: bool,
        pool: VisionPool = "tok",
        ln_pre: bool = True,
        final_ln_after_pool: bool = False,
    ) -> None:
        super().__init__()
        grid = image_size // patch_size
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(width))
        self.positional_embedding = nn.Parameter(torch.empty(grid * grid + 1, width))
        self.ln_pre: nn.Module = nn.LayerNorm(width) if ln_pre else nn.Identity()
        self.transformer = Transformer(width, layers, heads, mlp_width, quick_gelu)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.empty(width, output_dim))
        self.pool = pool
        self.final_ln_after_pool = final_ln_after_pool

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The image embedding [N, D] and the patch tokens [N, P, D] in the joint space."""
        x = self.conv1(pixel_values).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding
        x = self.transformer(self.ln_pre(x))
        if not self.final_ln_after_pool:
            x = self.ln_post(x)
        pooled = x[:, 0] if self.pool == "tok" else x[:, 1:].mean(dim=1)
        tokens = x[:, 1:]
        if self.final_ln_after_pool:
            # ln_post normalises the pooled feature only; each token gets it the same way.
            pooled, tokens = self.ln_post(pooled), self.ln_post(tokens)
        return torch.matmul(pooled, self.proj), torch.matmul(tokens, self.proj)


class OpenAITextTower(nn.Module):
    """open_clip's ``TextTransformer`` (OpenAI layout): the checkpoint's top-level text keys."""

    causal_mask: torch.Tensor | None

    def __init__(
        self,
        *,
        context_length: int,
        vocab_size: int,
        width: int,
        layers: int,
        heads: int,
        mlp_width: int,
        output_dim: int,
        quick_gelu: bool,
        pool: TextPool = "argmax",
        eos_id: int | None = None,
        causal: bool = True,
    ) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.transformer = Transformer(width, layers, heads, mlp_width, quick_gelu)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, output_dim))
        self.pool = pool
        self.eos_id = eos_id
        mask = torch.full((context_length, context_length), float("-inf")).triu(1)
        self.register_buffer("causal_mask", mask if causal else None, persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        x = self.token_embedding(input_ids) + self.positional_embedding[:length]
        mask = self.causal_mask[:length, :length] if self.causal_mask is not None else None
        x = self.ln_final(self.transformer(x, mask))
        return torch.matmul(_text_pool(x, input_ids, self.pool, self.eos_id), self.text_projection)


def _text_pool(
    x: torch.Tensor, ids: torch.Tensor, pool: TextPool, eos_id: int | None
) -> torch.Tensor:
    if pool == "first":
        return x[:, 0]
    if pool == "last":
        return x[:, -1]
    rows = torch.arange(x.shape[0])
    if pool == "argmax":
        # The end-of-text token has the highest id of CLIP's vocabulary.
        return x[rows, ids.argmax(dim=-1)]
    return x[rows, ids.eq(0 if eos_id is None else eos_id).int().argmax(dim=-1)]


class TimmAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.proj(_attend(q, k, v, self.heads, None))  # type: ignore[no-any-return]


class TimmMlp(nn.Module):
    def __init__(self, width: int, hidden: int, out: int | None = None, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, out or width, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))  # type: ignore[no-any-return]


class TimmBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_width: int, eps: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.attn = TimmAttention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = TimmMlp(width, mlp_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))  # type: ignore[no-any-return]


class PatchEmbed(nn.Module):
    def __init__(self, width: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)


class TimmViT(nn.Module):
    """timm's ``VisionTransformer`` with a class token (``vit_*_patchN_S``), no classifier."""

    def __init__(
        self,
        *,
        image_size: int,
        patch_size: int,
        width: int,
        depth: int,
        heads: int,
        mlp_width: int,
        pool: VisionPool,
        eps: float = 1e-6,  # timm's ViT LayerNorm epsilon
    ) -> None:
        super().__init__()
        grid = image_size // patch_size
        self.patch_embed = PatchEmbed(width, patch_size)
        self.cls_token = nn.Parameter(torch.empty(1, 1, width))
        self.pos_embed = nn.Parameter(torch.empty(1, grid * grid + 1, width))
        self.blocks = nn.ModuleList(TimmBlock(width, heads, mlp_width, eps) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=eps)
        self.pool = pool

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Every token after the final norm [N, 1 + P, W], the class token first."""
        x = self.patch_embed.proj(pixel_values).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)  # type: ignore[no-any-return]

    def pool_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled feature of ``forward``'s tokens (class token or mean of the patches)."""
        pooled: torch.Tensor = x[:, 0] if self.pool == "tok" else x[:, 1:].mean(dim=1)
        return pooled


class TimmImageTower(nn.Module):
    """open_clip's ``TimmModel``: ``visual.trunk`` (timm ViT) and ``visual.head`` (projection)."""

    def __init__(self, trunk: TimmViT, head: nn.Sequential) -> None:
        super().__init__()
        self.trunk = trunk
        self.head = head

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The image embedding [N, D] and the patch tokens [N, P, D] in the joint space."""
        tokens = self.trunk(pixel_values)
        return self.head(self.trunk.pool_tokens(tokens)), self.head(tokens[:, 1:])


def timm_head(kind: str, width: int, output_dim: int, bias: bool) -> nn.Sequential:
    """open_clip's ``timm_proj``: ``linear`` (``head.proj``) or ``mlp`` (``head.mlp``)."""
    if kind == "linear":
        return nn.Sequential(OrderedDict([("proj", nn.Linear(width, output_dim, bias=bias))]))
    if kind == "mlp":
        mlp = TimmMlp(width, 2 * output_dim, output_dim, bias=bias)
        return nn.Sequential(OrderedDict([("mlp", mlp)]))
    return nn.Sequential()


class HFTextTower(nn.Module):
    """open_clip's ``HFTextEncoder``: a transformers model, a pooler and ``text.proj``."""

    def __init__(self, transformer: Any, pooler: HFPooler, proj: nn.Module) -> None:
        super().__init__()
        self.transformer = transformer
        self.pooler = pooler
        self.proj = proj

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.transformer(input_ids=input_ids, attention_mask=attention_mask)
        if self.pooler == "cls_pooler" and getattr(out, "pooler_output", None) is not None:
            pooled = out.pooler_output
        elif self.pooler == "mean_pooler":
            mask = attention_mask.unsqueeze(-1).to(out.last_hidden_state.dtype)
            pooled = (out.last_hidden_state * mask).sum(dim=1) / mask.sum(dim=1)
        else:
            pooled = out.last_hidden_state[:, 0]
        return self.proj(pooled)  # type: ignore[no-any-return]


def hf_projection(kind: str | None, width: int, output_dim: int) -> nn.Module:
    """open_clip's ``hf_proj_type``: ``linear``, ``mlp`` (Linear-GELU-Linear) or none."""
    if kind == "linear":
        return nn.Linear(width, output_dim, bias=False)
    if kind == "mlp":
        hidden = (width + output_dim) // 2
        return nn.Sequential(
            nn.Linear(width, hidden, bias=False),
            nn.GELU(),
            nn.Linear(hidden, output_dim, bias=False),
        )
    return nn.Identity()
