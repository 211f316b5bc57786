"""The package under the standalone ``pytorch_lightning`` namespace: Trainer, loggers, exceptions and CLI.

``import pytorch_lightning as pl`` gives classes distinct from ``lightning.pytorch``'s. Each test here uses
only ``pytorch_lightning`` classes (module, Trainer, loggers, callbacks) around the package's callbacks and
checks the results against references that do not involve Lightning at all: torch's ``AdamW`` on the
decay groups in a plain loop, norms recomputed from the weights, TensorBoard event files read back.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from tests.extras import require

require(("pytorch_lightning", "jsonargparse"), "the pytorch_lightning namespace")

import lightning.pytorch.utilities.exceptions as lightning_exceptions  # noqa: E402
import pytorch_lightning as pl  # noqa: E402
from pytorch_lightning.loggers import TensorBoardLogger  # noqa: E402
from pytorch_lightning.utilities.exceptions import MisconfigurationException  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from lightning_decay import DecayLightningCLI, DecayRules, WeightDecay, WeightNormMonitor, decay_param_groups  # noqa: E402

LAM, LR, STEPS = 0.1, 0.01, 4


def test_the_namespace_under_test_is_the_same_release_as_lightning() -> None:
    # The two packages are built from one source tree per release; the suite runs this file on the
    # `pytorch-lightning` of the same version, or it would test another Lightning than the rest of the suite.
    import lightning

    assert pl.__version__ == lightning.__version__, "install pytorch-lightning==<lightning's version>"


def make_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.LayerNorm(12), nn.ReLU(), nn.Linear(12, 1))


def loader() -> DataLoader:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(STEPS * 8, 6, generator=g), torch.randn(STEPS * 8, 1, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=8)


class Regressor(pl.LightningModule):
    """A ``pytorch_lightning`` module built with ``optimizer(module)``."""

    def __init__(self, optimizer: Any = None) -> None:
        super().__init__()
        self.net = make_net()
        self.optimizer_fn = optimizer

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> Any:
        return self.optimizer_fn(self)


class CLIRegressor(pl.LightningModule):
    """No ``configure_optimizers``: the CLI's automatic ``--optimizer`` provides it."""

    def __init__(self) -> None:
        super().__init__()
        self.net = make_net()

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)


class Data(pl.LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        return loader()


class Snapshots(pl.Callback):
    def __init__(self) -> None:
        self.after: list[dict[str, Tensor]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.after.append({n: p.detach().clone() for n, p in pl_module.net.named_parameters()})


def adamw_loop() -> list[dict[str, Tensor]]:
    """The reference, without Lightning: torch's AdamW on the decay / no-decay groups."""
    net = make_net()
    opt = torch.optim.AdamW(decay_param_groups(net, weight_decay=LAM), lr=LR, foreach=False)
    out = []
    for x, y in loader():
        opt.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()
        opt.step()
        out.append({n: p.detach().clone() for n, p in net.named_parameters()})
    return out


def trainer(tmp_path: Path, callbacks: list[Any], **kwargs: Any) -> pl.Trainer:
    options: dict[str, Any] = {
        "max_epochs": 1,
        "accelerator": "cpu",
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "default_root_dir": tmp_path,
    }
    return pl.Trainer(callbacks=callbacks, **{**options, **kwargs})


def test_fit_with_weight_decay_is_bitwise_adamw_and_monitor_writes_histograms(tmp_path: Path) -> None:
    snapshots = Snapshots()
    logger = TensorBoardLogger(tmp_path, name="tb")
    monitor = WeightNormMonitor(log_histograms=True)
    adam = lambda m: torch.optim.Adam(decay_param_groups(m, weight_decay=0.0), lr=LR, foreach=False)  # noqa: E731
    model = Regressor(adam)
    fit = trainer(tmp_path, [WeightDecay(LAM), monitor, snapshots], logger=logger, log_every_n_steps=2)
    fit.fit(model, loader())

    # Adam + WeightDecay under pytorch_lightning's Trainer is torch's AdamW on the decay groups, bitwise.
    want = adamw_loop()
    assert len(snapshots.after) == len(want) == STEPS
    for step, (got, ref) in enumerate(zip(snapshots.after, want, strict=True)):
        for name in ref:
            assert torch.equal(got[name], ref[name]), f"step {step}: {name}"

    # pytorch_lightning's TensorBoardLogger gets the scalars and, through its own class, the histograms.
    acc = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    names = [n for n, _ in model.named_parameters()]
    assert set(acc.Tags()["histograms"]) == {f"weight_hist/{n}" for n in names}
    plan = DecayRules().classify(model)
    for step in (1, 3):  # log_every_n_steps=2: labels 1 and 3, the weights after steps 2 and 4
        after = snapshots.after[step]
        for name in names:
            weights = after[name.removeprefix("net.")]
            [hist] = [e for e in acc.Histograms(f"weight_hist/{name}") if e.step == step]
            assert hist.histogram_value.num == weights.numel()
            assert hist.histogram_value.sum == pytest.approx(weights.sum().item(), rel=1e-4, abs=1e-5)
            [scalar] = [e for e in acc.Scalars(f"weight_norm/{name}") if e.step == step]
            assert scalar.value == pytest.approx(torch.linalg.vector_norm(weights.double()).item(), rel=1e-6)
        decay = torch.cat([after[n.removeprefix("net.")].reshape(-1) for n in plan.decay_names]).double()
        [total] = [e for e in acc.Scalars("weight_norm/decay_total") if e.step == step]
        assert total.value == pytest.approx(torch.linalg.vector_norm(decay).item(), rel=1e-6)


def test_errors_are_catchable_as_either_namespaces_misconfiguration(tmp_path: Path) -> None:
    adamw_everywhere = lambda m: torch.optim.AdamW(m.parameters(), lr=LR, weight_decay=0.01)  # noqa: E731
    with pytest.raises(MisconfigurationException, match="Double weight decay") as err:
        trainer(tmp_path, [WeightDecay(LAM)]).fit(Regressor(adamw_everywhere), loader())
    assert isinstance(err.value, lightning_exceptions.MisconfigurationException)

    with pytest.raises(MisconfigurationException, match="no logger"):
        trainer(tmp_path, [WeightNormMonitor()]).fit(Regressor(adamw_everywhere), loader())


def test_decay_cli_runs_a_pytorch_lightning_module_with_callbacks_from_the_command_line(tmp_path: Path) -> None:
    args = [
        "fit",
        "--optimizer=Adam",
        f"--optimizer.lr={LR}",
        "--optimizer.foreach=false",
        "--trainer.callbacks+=lightning_decay.WeightDecay",
        f"--trainer.callbacks.weight_decay={LAM}",
        "--trainer.max_epochs=1",
        "--trainer.logger=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    cli = DecayLightningCLI(CLIRegressor, Data, args=args, save_config_callback=None)
    assert isinstance(cli.trainer, pl.Trainer) and isinstance(cli, pl.cli.LightningCLI)
    assert any(isinstance(cb, WeightDecay) for cb in cli.trainer.callbacks)
    groups = cli.trainer.optimizers[0].param_groups
    assert {g["name"]: g["weight_decay"] for g in groups} == {"decay": 0.0, "no_decay": 0.0}
    # Adam over the CLI's decay groups + WeightDecay from the command line = AdamW on the decay groups.
    final = adamw_loop()[-1]
    for name, param in cli.model.net.named_parameters():
        assert torch.equal(param.detach(), final[name]), name


def test_importing_the_package_leaves_lightning_logging_alone() -> None:
    """The two namespaces share the logger of their rank-zero messages; importing ``pytorch_lightning`` (as
    the package does to know its classes) must not move ``lightning.pytorch`` users' messages away."""
    code = (
        "import lightning.pytorch, lightning_utilities.core.rank_zero as r; before = r.log.name; "
        "import lightning_decay, pytorch_lightning; print(before, r.log.name)"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    before, after = out.split()
    assert before == after == "lightning.pytorch.utilities.rank_zero"


def test_every_lightning_class_the_package_checks_or_raises_comes_from_compat() -> None:
    """A new ``from lightning.pytorch... import MisconfigurationException`` (or Callback, TensorBoardLogger)
    in a module would bring back a difference between the namespaces: they go through ``_compat``."""
    src = Path(__file__).resolve().parents[1] / "src" / "lightning_decay"
    pattern = re.compile(
        r"^from lightning\.pytorch\S* import .*\b(MisconfigurationException|Callback|TensorBoardLogger)\b"
    )
    offenders = [
        f"{f.name}:{i}"
        for f in sorted(src.glob("*.py"))
        if f.name != "_compat.py"
        for i, line in enumerate(f.read_text().splitlines(), 1)
        if pattern.match(line)
    ]
    assert not offenders, offenders
