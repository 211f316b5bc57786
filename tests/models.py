"""Small, deterministic model builders shared by the test suite.

Every ``make_*`` builder takes a ``seed`` and builds its model under a forked RNG, so the weights are
always the same and the global RNG state of the calling test is left untouched. The models are tiny
(a few thousand parameters) but use the real layer types whose parameters the decay rules classify:
convolutions, batch norm, ``nn.TransformerEncoder``, a GPT with a tied ``lm_head``, custom RMSNorm
classes, a learned temperature, timm-style ``no_weight_decay()`` hooks, frozen backbones and wrappers
that insert name prefixes like DDP, FSDP1 and ``torch.compile`` do.

Import with ``from tests.models import make_gpt, ...``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
from torch import nn

__all__ = [
    "CausalSelfAttention",
    "GPTBlock",
    "LlamaRMSNorm",
    "NameWrapper",
    "SmallCNN",
    "SwinBlock",
    "T5LayerNorm",
    "TinyGPT",
    "TinyLlama",
    "TinySwin",
    "TinyViT",
    "ViTBlock",
    "make_cnn",
    "make_frozen_backbone",
    "make_gpt",
    "make_llama",
    "make_swin",
    "make_transformer_encoder",
    "make_vit",
    "seeded",
    "wrap",
]

M = TypeVar("M", bound=nn.Module)


def seeded(seed: int, build: Callable[[], M]) -> M:
    """Run ``build()`` with ``torch.manual_seed(seed)`` inside a forked CPU RNG and return its result."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


# --------------------------------------------------------------------------------------------- CNN
class SmallCNN(nn.Module):
    """Conv2d + BatchNorm2d twice, global pooling and a Linear head. Input ``(B, 3, H, W)``.

    Parameters: ``conv1.{weight,bias}``, ``bn1.{weight,bias}``, ``conv2.weight`` (no bias, as before a
    batch norm), ``bn2.{weight,bias}``, ``head.{weight,bias}``.
    """

    def __init__(self, num_classes: int = 10, width: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.head(x.mean(dim=(2, 3)))


def make_cnn(seed: int = 0, num_classes: int = 10, width: int = 8) -> SmallCNN:
    """A :class:`SmallCNN`, seeded."""
    return seeded(seed, lambda: SmallCNN(num_classes, width))


# ----------------------------------------------------------------------------- TransformerEncoder
def make_transformer_encoder(
    seed: int = 0, d_model: int = 16, nhead: int = 2, num_layers: int = 2
) -> nn.TransformerEncoder:
    """``nn.TransformerEncoder`` of ``nn.TransformerEncoderLayer`` (batch first) with a final LayerNorm.

    Each layer has ``self_attn.in_proj_weight`` / ``in_proj_bias`` (MultiheadAttention's own
    parameters), ``self_attn.out_proj``, ``linear1``, ``linear2``, ``norm1``, ``norm2``; the encoder
    adds ``norm``.
    """

    def build() -> nn.TransformerEncoder:
        layer = nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward=2 * d_model, dropout=0.0, batch_first=True)
        return nn.TransformerEncoder(layer, num_layers, norm=nn.LayerNorm(d_model), enable_nested_tensor=False)

    return seeded(seed, build)


# --------------------------------------------------------------------------------------------- GPT
class CausalSelfAttention(nn.Module):
    """nanoGPT-style attention: fused ``c_attn`` (q, k, v) and ``c_proj`` Linear layers."""

    def __init__(self, d: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, d))


class GPTBlock(nn.Module):
    """Pre-norm block: ``ln_1``, ``attn``, ``ln_2``, ``mlp`` (``c_fc``, ``c_proj``)."""

    def __init__(self, d: int, n_head: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, n_head)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = nn.ModuleDict({"c_fc": nn.Linear(d, 4 * d), "c_proj": nn.Linear(4 * d, d)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp["c_proj"](nn.functional.gelu(self.mlp["c_fc"](self.ln_2(x))))


class TinyGPT(nn.Module):
    """A nanoGPT-shaped language model: ``wte``, ``wpe``, ``h.{i}``, ``ln_f``, ``lm_head``.

    With ``tie=True`` (default) ``lm_head.weight`` *is* ``wte.weight``: the parameter is registered
    first as ``wte.weight`` and appears again as ``lm_head.weight``. Input: token ids ``(B, T)``.
    """

    def __init__(
        self, vocab: int = 32, block_size: int = 8, d: int = 16, n_head: int = 2, n_layer: int = 2, tie: bool = True
    ) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(block_size, d)
        self.h = nn.ModuleList(GPTBlock(d, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        if tie:
            self.lm_head.weight = self.wte.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def make_gpt(seed: int = 0, tie: bool = True, n_layer: int = 2) -> TinyGPT:
    """A :class:`TinyGPT` (vocab 32, context 8, width 16), seeded; ``tie`` ties ``lm_head`` to ``wte``."""
    return seeded(seed, lambda: TinyGPT(n_layer=n_layer, tie=tie))


# --------------------------------------------------------------------------- custom norms, Llama
class LlamaRMSNorm(nn.Module):
    """RMSNorm as written in Hugging Face Llama: NOT a subclass of any torch norm; 1-D ``weight``."""

    def __init__(self, d: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


class T5LayerNorm(LlamaRMSNorm):
    """T5's scale-only layer norm (an RMSNorm under another name); not a torch norm subclass."""


class TinyLlama(nn.Module):
    """Llama-shaped model with custom norms and a learned 0-dim temperature.

    Parameters: ``embed_tokens.weight``; per layer ``layers.{i}.input_layernorm.weight``
    (:class:`LlamaRMSNorm`), ``self_attn.{q,k,v,o}_proj.weight`` (no biases),
    ``post_attention_layernorm.weight``, ``mlp.{gate,up,down}_proj.weight``; ``norm.weight``
    (:class:`LlamaRMSNorm`), ``final_layer_norm.weight`` (:class:`T5LayerNorm`), ``lm_head.weight``
    and ``logit_scale`` (shape ``()``, a CLIP-style learned temperature owned by the model itself).
    """

    def __init__(self, vocab: int = 32, d: int = 16, n_layer: int = 2) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList()
        for _ in range(n_layer):
            layer = nn.Module()
            layer.input_layernorm = LlamaRMSNorm(d)
            layer.self_attn = nn.ModuleDict(
                {k: nn.Linear(d, d, bias=False) for k in ("q_proj", "k_proj", "v_proj", "o_proj")}
            )
            layer.post_attention_layernorm = LlamaRMSNorm(d)
            layer.mlp = nn.ModuleDict(
                {
                    "gate_proj": nn.Linear(d, 2 * d, bias=False),
                    "up_proj": nn.Linear(d, 2 * d, bias=False),
                    "down_proj": nn.Linear(2 * d, d, bias=False),
                }
            )
            self.layers.append(layer)
        self.norm = LlamaRMSNorm(d)
        self.final_layer_norm = T5LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(2.6592))


def make_llama(seed: int = 0, n_layer: int = 2) -> TinyLlama:
    """A :class:`TinyLlama`, seeded."""
    return seeded(seed, lambda: TinyLlama(n_layer=n_layer))


# ----------------------------------------------------------------------------- frozen backbone
def make_frozen_backbone(seed: int = 0, num_classes: int = 5) -> nn.Module:
    """``backbone`` (a :class:`SmallCNN` without its head, all ``requires_grad=False``) + trainable ``head``."""

    def build() -> nn.Module:
        backbone = SmallCNN()
        backbone.head = nn.Identity()
        backbone.requires_grad_(False)
        model = nn.Module()
        model.backbone = backbone
        model.head = nn.Linear(16, num_classes)
        return model

    return seeded(seed, build)


# ------------------------------------------------------------------------------- timm-style hooks
class ViTBlock(nn.Module):
    """timm ViT block: ``norm1``, ``attn.{qkv,proj}``, ``norm2``, ``mlp.{fc1,fc2}``."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.attn = nn.ModuleDict({"qkv": nn.Linear(d, 3 * d), "proj": nn.Linear(d, d)})
        self.norm2 = nn.LayerNorm(d)
        self.mlp = nn.ModuleDict({"fc1": nn.Linear(d, 2 * d), "fc2": nn.Linear(2 * d, d)})


class TinyViT(nn.Module):
    """timm-shaped ViT: ``patch_embed.proj`` (Conv2d), ``cls_token`` ``(1, 1, d)``, ``pos_embed``
    ``(1, n + 1, d)`` (both 3-D, so only the hook keeps them from being decayed), ``blocks``, ``norm``,
    ``head``.

    ``no_weight_decay()`` returns ``{"pos_embed", "cls_token"}`` plus ``extra_no_decay`` (which may name a
    submodule, e.g. ``"head"``).
    """

    def __init__(
        self,
        d: int = 16,
        depth: int = 2,
        num_patches: int = 4,
        num_classes: int = 10,
        extra_no_decay: tuple[str, ...] = (),
    ) -> None:
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, d, 4, stride=4)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.randn(1, num_patches + 1, d) * 0.02)
        self.blocks = nn.Sequential(*(ViTBlock(d) for _ in range(depth)))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, num_classes)
        self.extra_no_decay = tuple(extra_no_decay)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", *self.extra_no_decay}


class SwinBlock(nn.Module):
    """Swin-style block with a 2-D ``attn.relative_position_bias_table`` and
    ``no_weight_decay_keywords() == {"relative_position_bias_table"}`` on the block itself."""

    def __init__(self, d: int = 16, window: int = 2, heads: int = 2) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.attn = nn.Module()
        self.attn.relative_position_bias_table = nn.Parameter(torch.randn((2 * window - 1) ** 2, heads) * 0.02)
        self.attn.qkv = nn.Linear(d, 3 * d)
        self.attn.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d)
        self.mlp = nn.ModuleDict({"fc1": nn.Linear(d, 2 * d), "fc2": nn.Linear(2 * d, d)})

    def no_weight_decay_keywords(self) -> set[str]:
        return {"relative_position_bias_table"}


class TinySwin(nn.Module):
    """``patch_embed`` Conv2d, ``absolute_pos_embed`` ``(1, n, d)`` named by the model's own
    ``no_weight_decay()``, ``layers`` of :class:`SwinBlock` (each with its keyword hook), ``norm``, ``head``."""

    def __init__(self, d: int = 16, depth: int = 2, num_classes: int = 10) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(3, d, 4, stride=4)
        self.absolute_pos_embed = nn.Parameter(torch.zeros(1, 4, d))
        self.layers = nn.ModuleList(SwinBlock(d) for _ in range(depth))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, num_classes)

    def no_weight_decay(self) -> set[str]:
        return {"absolute_pos_embed"}


def make_vit(seed: int = 0, extra_no_decay: tuple[str, ...] = ()) -> TinyViT:
    """A :class:`TinyViT`, seeded."""
    return seeded(seed, lambda: TinyViT(extra_no_decay=extra_no_decay))


def make_swin(seed: int = 0) -> TinySwin:
    """A :class:`TinySwin`, seeded."""
    return seeded(seed, lambda: TinySwin())


# ------------------------------------------------------------------------------------- wrappers
class NameWrapper(nn.Module):
    """Holds ``inner`` under the attribute ``attr``, adding ``"{attr}."`` to every name like a wrapper.

    ``attr="module"`` mimics DDP / DataParallel, ``"_fsdp_wrapped_module"`` FSDP1,
    ``"_checkpoint_wrapped_module"`` activation checkpointing, ``"backbone"`` a plain user wrapper.
    ``extra`` optionally adds a trainable ``extra`` Linear(4, 4) next to it.
    """

    def __init__(self, inner: nn.Module, attr: str = "module", extra: bool = False) -> None:
        super().__init__()
        setattr(self, attr, inner)
        if extra:
            self.extra = nn.Linear(4, 4)


def wrap(inner: nn.Module, *attrs: str) -> nn.Module:
    """Nest ``inner`` in one :class:`NameWrapper` per attribute, innermost first (seeded, no extras)."""
    for attr in attrs:
        inner = NameWrapper(inner, attr)
    return inner
