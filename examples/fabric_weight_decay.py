"""Lightning Fabric: ``WeightDecay`` attached to the optimizer is torch's ``AdamW`` on the decay groups, bitwise.

Fabric has no ``on_before_optimizer_step``: ``WeightDecay(wd).attach(model, optimizer)`` runs the callback's
own per-step code from the optimizer's step hooks instead. Two runs on scikit-learn's digits, same
initialization and batches, offline on CPU:

- ``attached``: ``Adam`` over the decay / no-decay groups with ``weight_decay=0``, plus ``WeightDecay(wd)``
  attached (decoupled decay of the ``"decay"`` weights);
- ``adamw``: torch's ``AdamW`` over the same groups, ``weight_decay=wd`` on the ``"decay"`` group.

Both run the same floating-point operations in the same order, so the weights are equal bit for bit after
every step; the script checks that and prints the result with the final accuracies and weight norms.

Usage::

    python examples/fabric_weight_decay.py            # well under a minute on CPU
    python examples/fabric_weight_decay.py --fast     # 3 steps, for the smoke test
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

import torch
from lightning.fabric import Fabric
from sklearn.datasets import load_digits
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_decay import WeightDecay, decay_param_groups


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.LayerNorm(128), nn.ReLU(), nn.Linear(128, 10))


def train(run: str, args: argparse.Namespace, data: TensorDataset) -> tuple[nn.Module, list[dict[str, Tensor]]]:
    fabric = Fabric(accelerator="cpu", devices=1, precision="32-true")
    fabric.seed_everything(args.seed, verbose=False)  # same weights and batches for both runs
    model = make_model()
    if run == "attached":
        optimizer = torch.optim.Adam(decay_param_groups(model, weight_decay=0.0), lr=args.lr, foreach=False)
    else:
        optimizer = torch.optim.AdamW(
            decay_param_groups(model, weight_decay=args.weight_decay), lr=args.lr, foreach=False
        )
    model, optimizer = fabric.setup(model, optimizer)
    if run == "attached":
        WeightDecay(args.weight_decay).attach(model, optimizer)  # after fabric.setup
    loader = fabric.setup_dataloaders(DataLoader(data, batch_size=64, shuffle=True))
    history = []
    steps = 0
    for _ in range(args.epochs):
        for x, y in loader:
            optimizer.zero_grad()
            fabric.backward(nn.functional.cross_entropy(model(x), y))
            optimizer.step()
            history.append({n: p.detach().clone() for n, p in model.module.named_parameters()})
            steps += 1
            if args.fast and steps == 3:
                return model.module, history
    return model.module, history


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fast", action="store_true", help="3 steps, for the smoke test")
    args = p.parse_args(argv)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    x, y = load_digits(return_X_y=True)
    data = TensorDataset(torch.as_tensor(x / 16.0, dtype=torch.float32), torch.as_tensor(y))
    models, histories = {}, {}
    for run in ("attached", "adamw"):
        models[run], histories[run] = train(run, args, data)
    steps = len(histories["adamw"])
    bitwise = len(histories["attached"]) == steps and all(
        torch.equal(a[name], b[name])
        for a, b in zip(histories["attached"], histories["adamw"], strict=True)
        for name in b
    )
    print(f"{steps} optimizer steps; Adam + WeightDecay.attach == AdamW on the decay groups, bitwise: {bitwise}")
    for run, model in models.items():
        with torch.no_grad():
            acc = (model(data.tensors[0]).argmax(-1) == data.tensors[1]).float().mean().item()
        norm = torch.linalg.vector_norm(torch.cat([p.detach().reshape(-1) for p in model.parameters()])).item()
        print(f"  {run:<9} train accuracy {acc:.3f}   |w| {norm:.4f}")
    return {"bitwise": bitwise, "steps": steps, "histories": histories}


if __name__ == "__main__":
    main()
