"""A tiny character-level GPT whose token embedding is tied to the output head (``lm_head.weight is wte.weight``).

The tied tensor has two names with two different verdicts under the minGPT convention
(``DecayRules(decay_embeddings=False)``): as ``wte.weight`` it is an embedding (no decay), as
``lm_head.weight`` the weight of a Linear (decay). The plan holds it once, under its first name, and
says which rule won; ``plan.param_groups`` puts it in exactly one group (the coverage assert that broke
nanoGPT #268 cannot fail). Position embeddings, LayerNorms and biases are not decayed either.

Usage::

    python examples/gpt_tied.py            # prints the plan, trains 200 steps, samples some text
    python examples/gpt_tied.py --fast     # 3 steps
"""

from __future__ import annotations

import argparse
import logging
import warnings
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from lightning_decay import DecayGroupsMixin, DecayRules

TEXT = (
    "Weight decay shrinks every weight a little at each step, w <- (1 - lr * wd) * w, while the gradient "
    "pulls the weights that matter back. Biases and normalization gains are left alone: a bias adds no "
    "curvature, and a weight followed by a normalization layer only sets the scale of its own update. "
    "Tied embeddings are one tensor with two names, and it must be decayed once or not at all. "
) * 4


class CharDataset(Dataset):
    def __init__(self, text: str, block_size: int) -> None:
        self.chars = sorted(set(text))
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.data = torch.tensor([self.stoi[c] for c in text], dtype=torch.long)
        self.block_size = block_size

    def __len__(self) -> int:
        return len(self.data) - self.block_size - 1

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = self.data[i : i + self.block_size + 1]
        return chunk[:-1], chunk[1:]


class Block(nn.Module):
    def __init__(self, d: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.ln_1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln_2(x))


class TinyGPT(DecayGroupsMixin, LightningModule):
    # minGPT's convention: embeddings are not decayed. The tied wte/lm_head tensor then gets two
    # conflicting verdicts; neither is an explicit user rule, so "no decay" wins (as in minGPT).
    # DecayRules(include=["lm_head.weight"]) would make it decay instead (an explicit rule wins).
    decay_rules = DecayRules(decay_embeddings=False)

    def __init__(self, vocab: int, block_size: int = 32, d: int = 64, n_layer: int = 2, n_head: int = 4) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(block_size, d)
        self.blocks = nn.ModuleList(Block(d, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying
        for emb in (self.wte, self.wpe):
            nn.init.normal_(emb.weight, std=0.02)  # GPT-2 init; N(0, 1) would make the tied logits huge
        self.optimizer = torch.optim.AdamW
        self.optimizer_kwargs = {"lr": 3e-3, "betas": (0.9, 0.95), "weight_decay": 0.1}

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x).flatten(0, 1), y.flatten())
        self.log("train/loss", loss, prog_bar=True)
        return loss

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, n: int, block_size: int) -> torch.Tensor:
        self.eval()
        for _ in range(n):
            logits = self(idx[:, -block_size:])[:, -1]
            idx = torch.cat([idx, logits.argmax(-1, keepdim=True)], dim=1)
        return idx


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description="Tiny char-level GPT with tied embeddings and decay groups.")
    p.add_argument("--max-steps", type=int, default=200)
    p.add_argument("--fast", action="store_true", help="3 steps, for the smoke test")
    args = p.parse_args(argv)
    log = logging.getLogger("lightning.pytorch")
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*(does not have many workers|LeafSpec).*")
            return run(args)
    finally:
        log.setLevel(level)


def run(args: argparse.Namespace) -> dict[str, Any]:
    seed_everything(0, verbose=False)

    block_size = 32
    data = CharDataset(TEXT, block_size)
    model = TinyGPT(len(data.chars), block_size)
    assert model.lm_head.weight is model.wte.weight

    plan = model.decay_plan()
    print(plan)  # the tied tensor appears once: "wte.weight (= lm_head.weight)"
    print(plan.explain("lm_head.weight"))

    trainer = Trainer(
        max_steps=3 if args.fast else args.max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    trainer.fit(model, DataLoader(data, batch_size=32, shuffle=True))
    groups = {g["name"]: g for g in trainer.optimizers[0].param_groups}
    for name, g in groups.items():
        print(f"optimizer group {name!r}: {len(g['params'])} tensors, weight_decay={g['weight_decay']}")

    prompt = torch.tensor([[data.stoi[c] for c in "Weight decay "]])
    sample = "".join(data.chars[i] for i in model.generate(prompt, 60, block_size)[0].tolist())
    print(f"loss {float(trainer.callback_metrics['train/loss']):.3f}; sample: {sample!r}")
    return {"plan": plan, "groups": groups, "trainer": trainer}


if __name__ == "__main__":
    main()
