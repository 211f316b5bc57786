"""Reference models of the benchmarks: a deep MLP with LayerNorm (100 parameter tensors) and a small
GPT-style transformer (197 parameter tensors), at four sizes.

``tiny`` is for the smoke test, ``small`` runs the whole benchmark in about a minute on 2 CPU cores,
``medium`` puts the weights past a CPU's caches (about 100 MB: time is then memory traffic, not dispatch),
``large`` is meant for a GPU. The number of parameter tensors is the same at every size: the per-tensor
overheads this benchmark is about depend on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["SIZES", "DeepMLP", "ManyBlocks", "ModelSpec", "OneLargeTensor", "SmallGPT", "build", "build_large"]


@dataclass(frozen=True)
class ModelSpec:
    width: int
    batch: int
    seq: int = 0
    vocab: int = 0


#: size -> model -> spec.
SIZES: dict[str, dict[str, ModelSpec]] = {
    "tiny": {"mlp": ModelSpec(width=16, batch=4), "gpt": ModelSpec(width=16, batch=2, seq=8, vocab=32)},
    "small": {"mlp": ModelSpec(width=128, batch=64), "gpt": ModelSpec(width=64, batch=4, seq=16, vocab=256)},
    "medium": {"mlp": ModelSpec(width=1024, batch=64), "gpt": ModelSpec(width=384, batch=4, seq=64, vocab=2048)},
    "large": {"mlp": ModelSpec(width=2048, batch=512), "gpt": ModelSpec(width=512, batch=16, seq=256, vocab=8192)},
}

MLP_BLOCKS = 24  # 2 (input Linear) + 24 * 4 (Linear + LayerNorm) + 2 (head) = 100 tensors
GPT_LAYERS = 16  # 2 (embeddings) + 16 * 12 + 2 (ln_f) + 1 (lm_head) = 197 tensors


class DeepMLP(nn.Module):
    """``inp`` Linear, ``blocks.{i}.{fc,norm}`` residual Linear + LayerNorm + GELU blocks, ``head`` Linear."""

    def __init__(self, width: int, d_in: int = 32, n_classes: int = 10, blocks: int = MLP_BLOCKS) -> None:
        super().__init__()
        self.inp = nn.Linear(d_in, width)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"fc": nn.Linear(width, width), "norm": nn.LayerNorm(width)}) for _ in range(blocks)
        )
        self.head = nn.Linear(width, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.inp(x)
        for block in self.blocks:
            x = x + nn.functional.gelu(block["norm"](block["fc"](x)))
        return self.head(x)


class _Block(nn.Module):
    def __init__(self, d: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.ln_1 = nn.LayerNorm(d)
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)
        self.ln_2 = nn.LayerNorm(d)
        self.c_fc = nn.Linear(d, 4 * d)
        self.c_out = nn.Linear(4 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.c_out(nn.functional.gelu(self.c_fc(self.ln_2(x))))


class SmallGPT(nn.Module):
    """nanoGPT-shaped: ``wte``, ``wpe``, ``h.{i}`` pre-norm blocks, ``ln_f``, untied ``lm_head``."""

    def __init__(self, width: int, seq: int, vocab: int, layers: int = GPT_LAYERS, n_head: int = 4) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, width)
        self.wpe = nn.Embedding(seq, width)
        self.h = nn.ModuleList(_Block(width, n_head) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def build(name: str, size: str, device: torch.device, seed: int = 0) -> tuple[nn.Module, tuple[Tensor, Tensor]]:
    """The model ``name`` (``"mlp"`` or ``"gpt"``) at ``size`` on ``device``, and one fixed (input, target) batch."""
    spec = SIZES[size][name]
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name == "mlp":
            model: nn.Module = DeepMLP(spec.width)
            x = torch.randn(spec.batch, 32, generator=gen)
            y = torch.randint(0, 10, (spec.batch,), generator=gen)
        elif name == "gpt":
            model = SmallGPT(spec.width, spec.seq, spec.vocab)
            x = torch.randint(0, spec.vocab, (spec.batch, spec.seq), generator=gen)
            y = torch.randint(0, spec.vocab, (spec.batch, spec.seq), generator=gen)
        else:
            raise ValueError(f"unknown model {name!r}")
    return model.to(device), (x.to(device), y.to(device))


def loss_fn(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    out = model(x)
    return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


class ManyBlocks(nn.Module):
    """``n_tensors`` small tensors for the scaling rows: blocks of ``fc`` Linear(8, 8) and ``norm`` LayerNorm(8),
    each block naming its ``norm`` in ``no_weight_decay()`` (a submodule hook, as timm models have)."""

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.norm = nn.LayerNorm(8)

        def no_weight_decay(self) -> set[str]:
            return {"norm"}

        def forward(self, x: Tensor) -> Tensor:
            return self.norm(self.fc(x))

    def __init__(self, n_tensors: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(ManyBlocks.Block() for _ in range(max(1, n_tensors // 4)))

    def forward(self, x: Tensor) -> Tensor:
        return torch.stack([b(x) for b in self.blocks]).sum(0)


class OneLargeTensor(nn.Module):
    """One ``numel``-element weight (an embedding table of width 1024), the case where a whole-tensor temporary
    is a copy of most of a model."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.table = nn.Embedding(max(1, numel // 1024), 1024)

    def forward(self, idx: Tensor) -> Tensor:
        return self.table(idx)


def build_large(numel: int, device: torch.device, seed: int = 0) -> tuple[nn.Module, tuple[Tensor, Tensor]]:
    """`OneLargeTensor` and a fixed batch of 8 rows (targets: classes among the 1024 columns)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = OneLargeTensor(numel)
    x = torch.randint(0, model.table.num_embeddings, (8,), generator=gen)
    y = torch.randint(0, 1024, (8,), generator=gen)
    return model.to(device), (x.to(device), y.to(device))
