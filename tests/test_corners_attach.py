"""Corners of attachments and callbacks (issue 18, items 7-9; issue 22, items 8 and 10), through the public API.

- ``remove()`` on a superseded ``Attachment`` must not detach the live one;
- ``WeightNormMonitor(log_histograms=True)`` warns once where no logger takes histograms, and writes them to a
  ``WandbLogger`` too (read back from the offline run's own ``.wandb`` file);
- ``BaseFinetuning`` with an optimizer whose default ``weight_decay`` is not 0 is refused before the first step;
- the messages of a double L2 term where one side is L2-SP do not claim it pulls toward zero;
- ``Attachment`` and the callbacks have reprs that say what they are.

Outcomes are read on the weights: with zero data gradients, SGD leaves a weight alone and AdamW's update is
exactly its decoupled decay, so the factor a step applies is the decay alone, compared with torch's own AdamW.
"""

from __future__ import annotations

import csv
import json
import struct
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.fabric.loggers import CSVLogger as FabricCSVLogger
from lightning.pytorch.callbacks import BaseFinetuning
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_decay
from lightning_decay import Attachment, WeightDecay, WeightNormMonitor, WeightPenalty, attach, decay_param_groups
from tests.extras import require

LR, LAM = 0.1, 0.05


def make_net(seed: int = 0) -> nn.Sequential:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def zero_grad_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """One step whose data gradients are all zero (``0 * output``): only the decay moves the weights."""
    optimizer.zero_grad()
    (0.0 * model(torch.randn(3, 4)).sum()).backward()
    optimizer.step()


def weights(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def adamw_reference(start: dict[str, Tensor], name: str, steps: int, lr: float = LR, lam: float = LAM) -> Tensor:
    """torch's AdamW on a copy of ``start[name]`` with zero gradients: ``steps`` decoupled decays."""
    p = nn.Parameter(start[name].clone())
    opt = torch.optim.AdamW([p], lr=lr, weight_decay=lam, foreach=False)
    for _ in range(steps):
        p.grad = torch.zeros_like(p)
        opt.step()
    return p.detach()


# ------------------------------------------------------------------ 18.7: remove() of a superseded Attachment
def test_remove_of_a_superseded_attachment_leaves_the_live_one() -> None:
    """``a1 = d.attach(m, o1); a2 = d.attach(m, o2); a1.remove()``: ``o2`` still decays (AdamW's factor), and
    ``a1.remove()`` says it does nothing. ``a2.remove()`` then takes the decay off: ``o2`` steps plain SGD."""
    model = make_net()
    o1 = torch.optim.SGD(decay_param_groups(model, weight_decay=0.0), lr=LR)
    o2 = torch.optim.SGD(decay_param_groups(model, weight_decay=0.0), lr=LR)
    decay = WeightDecay(LAM)
    a1 = decay.attach(model, o1)
    a2 = decay.attach(model, o2)
    with pytest.warns(UserWarning, match=r"remove\(\) does nothing: WeightDecay was attached again"):
        a1.remove()
    start = weights(model)
    zero_grad_step(model, o2)
    after = weights(model)
    assert torch.equal(after["0.weight"], adamw_reference(start, "0.weight", 1))
    assert not torch.equal(after["0.weight"], start["0.weight"])
    assert torch.equal(after["0.bias"], start["0.bias"])  # not decayed: the rules' no_decay group

    zero_grad_step(model, o1)  # the superseded binding was replaced by the second attach: o1 decays nothing
    assert torch.equal(weights(model)["0.weight"], after["0.weight"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a1.remove()  # once said is enough: a second call is silent
    a2.remove()
    zero_grad_step(model, o2)
    assert torch.equal(weights(model)["0.weight"], after["0.weight"]), "removed: o2 no longer decays"
    assert a2.steps == [1]


def test_remove_of_a_superseded_monitor_attachment_leaves_the_live_one(tmp_path: Path) -> None:
    """The monitor's attachments: the second supersedes the first (its hooks log nothing more), and the
    first's ``remove()`` leaves the second logging, one row per step of ``o2``."""
    model = make_net()
    o1 = torch.optim.SGD(model.parameters(), lr=LR)
    o2 = torch.optim.SGD(model.parameters(), lr=LR)
    logger = FabricCSVLogger(tmp_path, name="csv")
    monitor = WeightNormMonitor(logging_interval=1)
    m1 = monitor.attach(model, o1, logger)
    m2 = monitor.attach(model, o2, logger)
    with pytest.warns(UserWarning, match=r"remove\(\) does nothing"):
        m1.remove()
    zero_grad_step(model, o1)  # superseded: not logged
    for _ in range(3):
        zero_grad_step(model, o2)
    m2.remove()
    zero_grad_step(model, o2)  # removed: not logged
    logger.finalize("success")
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = [row for row in csv.DictReader(f) if row.get("weight_norm/0.weight")]
    assert [int(r["step"]) for r in rows] == [0, 1, 2]
    norm = torch.linalg.vector_norm(model[0].weight.detach()).item()  # SGD, zero gradients: never moved
    assert float(rows[-1]["weight_norm/0.weight"]) == pytest.approx(norm, rel=1e-6)


# --------------------------------------------------------------------------- 22.8: reprs of what is attached
def test_attachment_repr_names_the_callback_and_its_steps() -> None:
    model = make_net()
    optimizer = torch.optim.SGD(decay_param_groups(model, weight_decay=0.0), lr=LR)
    attachment = WeightDecay(0.05).attach(model, optimizer)
    for _ in range(10):
        zero_grad_step(model, optimizer)
    assert repr(attachment) == "Attachment(WeightDecay(0.05), steps=[10])"
    again = attach(attachment.regularizer, model, optimizer)
    assert repr(attachment) == "Attachment(WeightDecay(0.05), steps=[0], superseded)"
    again.remove()
    assert repr(again) == "Attachment(WeightDecay(0.05), steps=[0], removed)"


@pytest.mark.parametrize(
    "callback",
    [
        WeightDecay(0.05),
        WeightDecay(weight_decay=None, mode="lr_ratio"),
        WeightPenalty(l1=1e-3, l2=0.1, l1_mode="proximal"),
        WeightNormMonitor(log_histograms=True, norm_type=1.0),
    ],
    ids=repr,
)
def test_callback_repr_rebuilds_the_same_callback(callback: Any) -> None:
    """The repr is the call that built it: evaluated, it builds a callback with the same repr and state key."""
    rebuilt = eval(repr(callback), vars(lightning_decay))
    assert type(rebuilt) is type(callback)
    assert repr(rebuilt) == repr(callback)
    assert rebuilt.state_key == callback.state_key


# ------------------------------------------------------------- 18.8: log_histograms without a histogram logger
class Lit(pl.LightningModule):
    def __init__(self, make_optimizer: Any = None, zero_loss: bool = False) -> None:
        super().__init__()
        self.net = make_net()
        self.make_optimizer = make_optimizer or (lambda m: torch.optim.SGD(m.parameters(), lr=LR))
        self.zero_loss = zero_loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        return 0.0 * loss if self.zero_loss else loss

    def configure_optimizers(self) -> Any:
        return self.make_optimizer(self.net)


def loader() -> DataLoader[Any]:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(16, 4, generator=g), torch.randn(16, 2, generator=g)), batch_size=4)


def fit(module: pl.LightningModule, callbacks: list[Any], **kw: Any) -> pl.Trainer:
    kw.setdefault("logger", False)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=callbacks,
        **kw,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer.fit(module, loader())
    return trainer


def histogram_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if "no logger that takes histograms" in str(w.message)]


def test_log_histograms_without_a_histogram_logger_warns_once(tmp_path: Path) -> None:
    """A ``CSVLogger`` alone takes no histograms: one warning at setup, however many steps log; with a
    ``TensorBoardLogger`` beside it, none."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fit(
            Lit(),
            [WeightNormMonitor(log_histograms=True)],
            logger=CSVLogger(tmp_path),
            max_steps=4,
            log_every_n_steps=1,
        )
    [message] = histogram_warnings(record)
    assert "CSVLogger" in message and "log_histograms=False" in message

    loggers = [CSVLogger(tmp_path, name="csv"), TensorBoardLogger(tmp_path, name="tb")]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fit(Lit(), [WeightNormMonitor(log_histograms=True)], logger=loggers, max_steps=2, log_every_n_steps=1)
    assert histogram_warnings(record) == []


def test_log_histograms_attached_without_a_histogram_logger_warns(tmp_path: Path) -> None:
    model = make_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    with pytest.warns(UserWarning, match=r"no logger that takes histograms \(loggers: CSVLogger\)"):
        WeightNormMonitor(log_histograms=True).attach(model, optimizer, FabricCSVLogger(tmp_path)).remove()


# ----------------------------------------------------------------------- 22.10: histograms to Weights & Biases
def read_wandb_records(path: Path) -> Iterator[Any]:
    """The records of a ``.wandb`` file: W&B's transaction log, LevelDB's log format (32 KiB blocks of
    checksummed chunks, a 7-byte header each: crc32, length, type) after a 7-byte ``:W&B`` header, each
    record a ``wandb_internal_pb2.Record``. wandb 0.31 has no Python reader of its own any more."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    block, pos, pending = 32768, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:  # zero padding at the end
            break
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # FULL / FIRST start a record
        if kind in (1, 4):  # FULL / LAST end it
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def history_row(record: Any) -> dict[str, Any]:
    """A history record as the dict logged: items are flattened to key paths (``[tag, "bins"]``)."""
    row: dict[str, Any] = {}
    for item in record.history.item:
        *parents, leaf = [item.key] if item.key else list(item.nested_key)
        node = row
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = json.loads(item.value_json)
    return row


def test_histograms_go_to_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``log_histograms=True`` with a ``WandbLogger`` (offline): a ``wandb.Histogram`` per parameter, read back
    from the run's ``.wandb`` file, equal to NumPy's 64-bin histogram of the final weights (the last logging
    step is the last step), at the ``trainer/global_step`` of the scalars."""
    require(("wandb",), "W&B histograms")
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    import wandb

    module = Lit()
    logger = WandbLogger(offline=True, save_dir=str(tmp_path), project="histograms")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        fit(module, [WeightNormMonitor(log_histograms=True)], logger=logger, max_steps=4, log_every_n_steps=2)
    assert histogram_warnings(record) == []
    logger.experiment.finish()
    wandb.teardown()  # stops the W&B service, which writes the offline run file asynchronously
    [run_file] = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")

    rows = [history_row(rec) for rec in read_wandb_records(run_file) if rec.WhichOneof("record_type") == "history"]
    histograms = [r for r in rows if any(k.startswith("weight_hist/") for k in r)]
    scalars = [r for r in rows if "weight_norm/net.0.weight" in r]
    assert [r["trainer/global_step"] for r in histograms] == [1, 3]
    assert [r["trainer/global_step"] for r in scalars] == [1, 3]
    last = histograms[-1]
    assert {k for k in last if k.startswith("weight_hist/")} == {
        f"weight_hist/{n}" for n, _ in module.named_parameters()
    }
    for name, param in module.named_parameters():
        got = last[f"weight_hist/{name}"]
        assert got["_type"] == "histogram"
        counts, edges = np.histogram(param.detach().reshape(-1).float().numpy(), bins=64)
        assert got["values"] == counts.tolist()
        np.testing.assert_allclose(got["bins"], edges, rtol=1e-6)


# ------------------------------------------------------------- 18.9: BaseFinetuning and a default weight_decay
class UnfreezeFirstLayer(BaseFinetuning):
    """Lightning's own helper: ``net.0`` frozen, unfrozen at epoch 1 as one group without ``weight_decay``."""

    def freeze_before_training(self, pl_module: pl.LightningModule) -> None:
        self.freeze(pl_module.net[0])

    def finetune_function(self, pl_module: pl.LightningModule, epoch: int, optimizer: Any) -> None:
        if epoch == 1:
            self.unfreeze_and_add_param_group(pl_module.net[0], optimizer, lr=LR)


class FirstStep(pl.Callback):
    """Records whether any optimizer step ran (the refusal must come before the first)."""

    def __init__(self) -> None:
        self.stepped = False

    def on_before_optimizer_step(self, *args: Any) -> None:
        self.stepped = True


@pytest.mark.parametrize(
    ("regularizer", "what"),
    [
        (WeightDecay(0.1), "Double weight decay"),
        (WeightPenalty(l2=0.1), "Double weight decay"),
        (WeightPenalty(l2=0.1, reference="initial"), "Double L2 regularization"),
    ],
    ids=repr,
)
def test_base_finetuning_with_a_default_weight_decay_is_refused_before_the_first_step(
    regularizer: Any, what: str
) -> None:
    """AdamW built on ``weight_decay=0`` groups keeps its default 0.01, which the group ``BaseFinetuning`` adds at
    the unfreeze epoch would get: refused when training starts, not after an epoch, with the weights untouched."""
    module = Lit(lambda m: torch.optim.AdamW(decay_param_groups(m, weight_decay=0.0), lr=LR))
    start = weights(module)
    first = FirstStep()
    with pytest.raises(MisconfigurationException, match=rf"(?s)^{what} ahead: UnfreezeFirstLayer.*weight_decay=0\.01"):
        fit(module, [UnfreezeFirstLayer(), regularizer, first], max_epochs=3)
    assert not first.stepped
    after = weights(module)
    assert all(torch.equal(after[n], start[n]) for n in start)


def test_base_finetuning_with_a_zero_default_decays_the_unfrozen_layer_once() -> None:
    """The fix the message gives, ``AdamW(groups, weight_decay=0.0)``: trains through the unfreeze, and the
    unfrozen ``net.0.weight`` is decayed once per step after it (torch's AdamW on the same tensor)."""
    module = Lit(lambda m: torch.optim.AdamW(decay_param_groups(m, weight_decay=0.0), lr=LR, weight_decay=0.0))
    module.zero_loss = True
    start = weights(module)
    trainer = fit(module, [UnfreezeFirstLayer(), WeightDecay(LAM)], max_epochs=2)
    steps_after_unfreeze = trainer.global_step // 2  # 4 batches per epoch, unfrozen for the second epoch
    after = weights(module)
    want = adamw_reference(start, "net.0.weight", steps_after_unfreeze)
    torch.testing.assert_close(after["net.0.weight"], want, rtol=1e-6, atol=0.0)
    assert torch.equal(after["net.0.bias"], start["net.0.bias"])


# ---------------------------------------------------------------------- 18.9: the wording where one is L2-SP
def test_double_l2_with_l2sp_does_not_say_toward_zero() -> None:
    """L2-SP pulls toward its reference: the refusals say so, for the optimizer's own decay and for a second
    attached regularizer alike (both still refused: two L2 terms on one weight)."""
    model = make_net()
    decayed = torch.optim.SGD(decay_param_groups(model, weight_decay=0.01), lr=LR)
    with pytest.raises(MisconfigurationException) as err:
        WeightPenalty(l2=0.1, reference="initial").attach(model, decayed)
    message = str(err.value)
    assert message.startswith("Double L2 regularization: SGD's 'decay' has weight_decay=0.01 (toward zero)")
    assert "WeightPenalty also pulls toward its reference weights (L2-SP)" in message

    plain = torch.optim.SGD(decay_param_groups(model, weight_decay=0.0), lr=LR)
    first = WeightDecay(LAM).attach(model, plain)
    with pytest.raises(MisconfigurationException) as err:
        WeightPenalty(l2=0.1, reference="initial").attach(model, plain)
    message = str(err.value)
    assert "both pull the same parameters toward zero" not in message
    assert "WeightPenalty pulls the same parameters toward its reference weights (L2-SP)" in message
    assert "WeightDecay pulls toward zero" in message
    first.remove()


def test_attachment_is_the_public_type() -> None:
    model = make_net()
    optimizer = torch.optim.SGD(decay_param_groups(model, weight_decay=0.0), lr=LR)
    with WeightPenalty(l1=1e-3).attach(model, optimizer) as attachment:
        assert isinstance(attachment, Attachment) and attachment.attached
    assert not attachment.attached
