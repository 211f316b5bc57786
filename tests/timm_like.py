"""Tiny stand-ins for timm's ViT, ConvNeXt and Swin with timm's parameter names and grouping hooks.

timm cannot be installed beside this torch (it needs torchvision), so these models reproduce the part of
timm's contract that layer-wise lr decay reads: the module tree and parameter names of
``timm.models.VisionTransformer``, ``ConvNeXt`` and ``SwinTransformer`` (same attribute names, same
registration order, same layer types, tiny sizes), their ``no_weight_decay()`` and their
``group_matcher(coarse=False)`` dicts, copied from huggingface/pytorch-image-models:

- ``timm/models/vision_transformer.py`` ``VisionTransformer.group_matcher`` / ``no_weight_decay``;
- ``timm/models/convnext.py`` ``ConvNeXt.group_matcher`` (commit 03fa149147b1, no ``no_weight_decay``);
- ``timm/models/swin_transformer.py`` ``SwinTransformer.group_matcher`` / ``no_weight_decay`` (commit
  00001f91d0b9, patch merging at the end of a stage).

They have no ``forward``: nothing here trains them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["ConvNeXt", "SwinTransformer", "VisionTransformer"]


class LayerNorm2d(nn.LayerNorm):
    """timm's channels-first LayerNorm (a ``nn.LayerNorm`` subclass)."""


class Mlp(nn.Module):
    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, d)


class LayerScale(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(1e-5 * torch.ones(d))


# --------------------------------------------------------------------------------------------- ViT
class Attention(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)


class Block(nn.Module):
    def __init__(self, d: int, init_values: float | None) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.attn = Attention(d)
        self.ls1 = LayerScale(d) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(d)
        self.mlp = Mlp(d, 2 * d)
        self.ls2 = LayerScale(d) if init_values else nn.Identity()


class PatchEmbed(nn.Module):
    def __init__(self, d: int, patch: int = 4, norm: bool = False) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, d, patch, stride=patch)
        self.norm = nn.LayerNorm(d) if norm else nn.Identity()


class VisionTransformer(nn.Module):
    """``timm.models.VisionTransformer`` with a class token, optional register tokens and layer scale."""

    def __init__(
        self, depth: int = 4, d: int = 8, num_classes: int = 3, reg_tokens: int = 0, init_values: float | None = None
    ) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, d)) if reg_tokens else None
        self.pos_embed = nn.Parameter(torch.randn(1, 17, d) * 0.02)
        self.blocks = nn.Sequential(*(Block(d, init_values) for _ in range(depth)))
        self.norm = nn.LayerNorm(d)
        self.fc_norm = nn.Identity()
        self.head = nn.Linear(d, num_classes)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "dist_token"}

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(
            stem=r"^cls_token|pos_embed|patch_embed",  # stem and embed
            blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))],
        )


# ----------------------------------------------------------------------------------------- ConvNeXt
class ConvNeXtBlock(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(d, d, 7, padding=3, groups=d)
        self.norm = nn.LayerNorm(d)
        self.mlp = Mlp(d, 4 * d)
        self.gamma = nn.Parameter(1e-6 * torch.ones(d))
        self.shortcut = nn.Identity()


class ConvNeXtStage(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, depth: int, stride: int) -> None:
        super().__init__()
        if in_chs != out_chs or stride > 1:
            self.downsample = nn.Sequential(LayerNorm2d(in_chs), nn.Conv2d(in_chs, out_chs, 2, stride=2))
        else:
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(*(ConvNeXtBlock(out_chs) for _ in range(depth)))


class NormMlpClassifierHead(nn.Module):
    def __init__(self, d: int, num_classes: int) -> None:
        super().__init__()
        self.norm = LayerNorm2d(d)
        self.flatten = nn.Flatten(1)
        self.pre_logits = nn.Identity()
        self.fc = nn.Linear(d, num_classes)


class ConvNeXt(nn.Module):
    """``timm.models.ConvNeXt`` with the default patch stem and ``head_norm_first=False``."""

    def __init__(self, depths: tuple[int, ...] = (2, 2, 3, 2), dims: tuple[int, ...] = (4, 6, 8, 10)) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, dims[0], 4, stride=4), LayerNorm2d(dims[0]))
        prev = dims[0]
        stages = []
        for i, (depth, d) in enumerate(zip(depths, dims, strict=True)):
            stages.append(ConvNeXtStage(prev, d, depth, stride=2 if i > 0 else 1))
            prev = d
        self.stages = nn.Sequential(*stages)
        self.norm_pre = nn.Identity()
        self.head = NormMlpClassifierHead(prev, 3)

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(
            stem=r"^stem",
            blocks=r"^stages\.(\d+)"
            if coarse
            else [
                (r"^stages\.(\d+)\.downsample", (0,)),  # blocks
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^norm_pre", (99999,)),
            ],
        )


# --------------------------------------------------------------------------------------------- Swin
class WindowAttention(nn.Module):
    def __init__(self, d: int, heads: int = 2, window: int = 2) -> None:
        super().__init__()
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        self.register_buffer("relative_position_index", torch.zeros(window**2, window**2, dtype=torch.long))
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)


class SwinTransformerBlock(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.attn = WindowAttention(d)
        self.norm2 = nn.LayerNorm(d)
        self.mlp = Mlp(d, 2 * d)


class PatchMerging(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * d)
        self.reduction = nn.Linear(4 * d, 2 * d, bias=False)


class BasicLayer(nn.Module):
    def __init__(self, d: int, depth: int, downsample: bool) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(SwinTransformerBlock(d) for _ in range(depth)))
        self.downsample = PatchMerging(d) if downsample else None


class SwinTransformer(nn.Module):
    """``timm.models.SwinTransformer`` (patch merging closing each stage but the last), ``ape=True``."""

    def __init__(self, depths: tuple[int, ...] = (2, 2, 4, 2), d: int = 4) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(d, norm=True)
        self.absolute_pos_embed = nn.Parameter(torch.zeros(1, 16, d))
        layers = []
        for i, depth in enumerate(depths):
            layers.append(BasicLayer(d * 2**i, depth, downsample=i < len(depths) - 1))
        self.layers = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(d * 2 ** (len(depths) - 1))
        self.head = nn.Linear(d * 2 ** (len(depths) - 1), 3)

    def no_weight_decay(self) -> set[str]:
        nwd = {"absolute_pos_embed"}
        for n, _ in self.named_parameters():
            if "relative_position_bias_table" in n:
                nwd.add(n)
        return nwd

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(
            stem=r"^absolute_pos_embed|patch_embed",  # stem and embed
            blocks=r"^layers\.(\d+)"
            if coarse
            else [
                (r"^layers\.(\d+).downsample", (0,)),
                (r"^layers\.(\d+)\.\w+\.(\d+)", None),
                (r"^norm", (99999,)),
            ],
        )
