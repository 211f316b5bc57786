"""``WeightNormMonitor`` in real ``Trainer.fit`` runs, checked against norms recomputed independently."""

from __future__ import annotations

import csv
import gc
import math
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import grad_norm
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_decay import DecayRules
from lightning_decay._binding import Binding, bound_to, every_param, never
from lightning_decay._monitor_layout import layout_signature
from lightning_decay.monitor import WeightNormMonitor

INF = math.inf


# ----------------------------------------------------------------------------- models and helpers
class Net(pl.LightningModule):
    def __init__(self, lr: float = 0.05, weight_decay: float = 0.01, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 1))
        self.lr, self.weight_decay = lr, weight_decay
        self.grad_norms: dict[int, dict[str, float]] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x.to(self.dtype)).float(), y)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Lightning's own utility, in the module's hook: after the callback's hook, before clipping.
        step = self.trainer.fit_loop.epoch_loop._batches_that_stepped
        self.grad_norms[step] = {k: float(v) for k, v in grad_norm(self, norm_type=2).items()}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        groups = DecayRules().classify(self).param_groups(weight_decay=self.weight_decay)
        return torch.optim.SGD(groups, lr=self.lr, momentum=0.9)


def _loader(n: int = 64, batch_size: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True).sin()), batch_size=batch_size)


def _fit(tmp_path: Path, model: pl.LightningModule, callbacks: list[Callback], **kwargs: Any) -> pl.Trainer:
    kwargs.setdefault("logger", CSVLogger(tmp_path, name="csv"))
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        callbacks=callbacks,
        **kwargs,
    )
    trainer.fit(model, _loader())
    return trainer


def _read_csv(logger: CSVLogger) -> dict[int, dict[str, float]]:
    rows: dict[int, dict[str, float]] = {}
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        for row in csv.DictReader(f):
            step = int(row.pop("step"))
            rows.setdefault(step, {}).update({k: float(v) for k, v in row.items() if v != ""})
    return rows


def _read_tb(logger: TensorBoardLogger) -> EventAccumulator:
    acc = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return acc


def _tb_scalars(acc: EventAccumulator, prefix: str) -> dict[int, dict[str, float]]:
    rows: dict[int, dict[str, float]] = {}
    for tag in acc.Tags()["scalars"]:
        if tag.startswith(prefix):
            for event in acc.Scalars(tag):
                rows.setdefault(event.step, {})[tag] = event.value
    return rows


def _norm(t: torch.Tensor, p: float = 2) -> float:
    return torch.linalg.vector_norm(t.detach().double(), p).item()


def _expected_weight_norms(state: dict[str, torch.Tensor], model: nn.Module, p: float = 2) -> dict[str, float]:
    plan = DecayRules().classify(model)
    want = {f"weight_norm/{name}": _norm(state[name], p) for name in (d.name for d in plan)}
    for key, names in (
        ("total", [d.name for d in plan]),
        ("decay_total", plan.decay_names),
        ("no_decay_total", plan.no_decay_names),
    ):
        want[f"weight_norm/{key}"] = _norm(torch.cat([state[n].reshape(-1) for n in names]), p)
    return want


def _assert_close(got: dict[str, float], want: dict[str, float], rtol: float = 1e-5) -> None:
    assert set(want) <= set(got), sorted(set(want) - set(got))
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=rtol, abs=1e-7), key


class Snapshots(Callback):
    """Weights before (batch start) and after (batch end) each batch, keyed by the monitor's step label."""

    def __init__(self) -> None:
        self.before: dict[int, dict[str, torch.Tensor]] = {}
        self.after: dict[int, dict[str, torch.Tensor]] = {}

    def _state(self, pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in pl_module.named_parameters()}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.before[trainer.fit_loop.epoch_loop._batches_that_stepped] = self._state(pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.after[trainer.fit_loop.epoch_loop._batches_that_stepped] = self._state(pl_module)


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("norm_type", [2, 1, "inf"])
def test_tensorboard_values_match_checkpoints_of_the_same_step(tmp_path: Path, norm_type: Any) -> None:
    p = INF if norm_type == "inf" else float(norm_type)
    model = Net()
    logger = TensorBoardLogger(tmp_path, name="tb")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}", every_n_train_steps=3, save_top_k=-1)
    trainer = _fit(
        tmp_path, model, [WeightNormMonitor(norm_type=norm_type), ckpt], logger=logger, max_steps=9, log_every_n_steps=3
    )
    logged = _tb_scalars(_read_tb(logger), "weight_norm/")
    # Label s holds the weights after the step that makes global_step s + 1.
    assert sorted(logged) == [2, 5, 8]
    assert trainer.global_step == 9
    for step, values in logged.items():
        state = torch.load(tmp_path / "ckpt" / f"step={step + 1}.ckpt", weights_only=False)["state_dict"]
        want = _expected_weight_norms(state, model, p)
        assert set(values) == set(want)
        _assert_close(values, want)


def test_csv_and_tensorboard_together_with_logging_interval(tmp_path: Path) -> None:
    model = Net()
    loggers = [CSVLogger(tmp_path, name="csv"), TensorBoardLogger(tmp_path, name="tb")]
    trainer = _fit(
        tmp_path, model, [WeightNormMonitor(logging_interval=4)], logger=loggers, max_steps=8, log_every_n_steps=50
    )
    from_csv = {
        s: {k: v for k, v in row.items() if k.startswith("weight_norm/")} for s, row in _read_csv(loggers[0]).items()
    }
    from_csv = {s: row for s, row in from_csv.items() if row}
    from_tb = _tb_scalars(_read_tb(loggers[1]), "weight_norm/")
    assert sorted(from_csv) == sorted(from_tb) == [3, 7]  # every 4 optimizer steps, not every 50
    for step in (3, 7):
        _assert_close(from_tb[step], from_csv[step])
    # The last label holds the final weights.
    _assert_close(from_csv[7], _expected_weight_norms(dict(model.named_parameters()), model))
    assert trainer.global_step == 8
    # Nothing went to the progress bar or to callback_metrics.
    assert not any(k.startswith("weight_norm") for k in trainer.callback_metrics)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_grad_norms_equal_lightning_grad_norm_before_clipping(tmp_path: Path, accumulate: int) -> None:
    model = Net()
    logger = CSVLogger(tmp_path, name="csv")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}", every_n_train_steps=2, save_top_k=-1)
    trainer = _fit(
        tmp_path,
        model,
        [WeightNormMonitor(log_grad_norm=True), ckpt],
        logger=logger,
        max_steps=6,
        log_every_n_steps=2,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=1e-3,
    )
    rows = _read_csv(logger)
    logged_steps = sorted(s for s, row in rows.items() if "grad_norm/total" in row)
    assert logged_steps == [1, 3, 5]
    assert trainer.global_step == 6
    for step in logged_steps:
        ref = model.grad_norms[step]
        got = rows[step]
        want = {k.replace("grad_2.0_norm/", "grad_norm/"): v for k, v in ref.items() if "/" in k}
        want["grad_norm/total"] = ref["grad_2.0_norm_total"]
        # Clipping to 1e-3 happens after the hooks: the logged norms are well above it.
        assert want["grad_norm/total"] > 1e-2
        _assert_close(got, want, rtol=1e-4)  # Lightning's grad_norm rounds through float32
        # Weight norms of the same label still match the checkpoint of global_step = label + 1.
        state = torch.load(tmp_path / "ckpt" / f"step={step + 1}.ckpt", weights_only=False)["state_dict"]
        _assert_close(got, _expected_weight_norms(state, model))


def test_update_ratio_and_angular_update_against_snapshots(tmp_path: Path) -> None:
    model = Net(lr=0.1, weight_decay=0.1)
    snaps = Snapshots()
    logger = CSVLogger(tmp_path, name="csv")
    monitor = WeightNormMonitor(log_update_ratio=True, log_angular_update=True)
    _fit(tmp_path, model, [snaps, monitor], logger=logger, max_steps=6, log_every_n_steps=3)
    rows = _read_csv(logger)
    logged = sorted(s for s, row in rows.items() if any(k.startswith("update_ratio/") for k in row))
    assert logged == [2, 5]
    for step in logged:
        for name, before in snaps.before[step].items():
            a, b = before.double().reshape(-1), snaps.after[step][name].double().reshape(-1)
            ratio = (b - a).norm() / a.norm()
            cos = torch.nn.functional.cosine_similarity(a, b, dim=0).clamp(-1, 1)
            assert ratio > 0
            assert rows[step][f"update_ratio/{name}"] == pytest.approx(ratio.item(), rel=1e-6)
            # The monitor derives the angle from ||a||, ||b|| and ||b - a||, where b - a is rounded to
            # float32 (exact when no entry changes by more than 2x): cos is off by at most
            # eps * ||b - a||^2 / (2 ||a|| ||b||), hence the angle by the square root of twice that.
            cos_error = torch.finfo(torch.float32).eps * (b - a).square().sum() / (2 * a.norm() * b.norm())
            tol = math.sqrt(2 * cos_error.item())
            assert rows[step][f"angular_update/{name}"] == pytest.approx(torch.arccos(cos).item(), rel=1e-6, abs=tol)


class TwoLayers(pl.LightningModule):
    """``a`` then ``b``; the optimizer steps only the layer named by ``which`` (set before each rebuild)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 1)
        self.which = "a"
        self.grads: dict[int, dict[str, float]] = {}  # step -> norms of the gradients the optimizer steps

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.b(torch.tanh(self.a(x))), y)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        stepped = {id(p) for g in optimizer.param_groups for p in g["params"]}
        step = self.trainer.fit_loop.epoch_loop._batches_that_stepped
        self.grads[step] = {n: _norm(p.grad) for n, p in self.named_parameters() if id(p) in stepped}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(getattr(self, self.which).parameters(), lr=0.1, momentum=0.9)


class RebuildEachEpoch(Callback):
    """Lightning's documented way to change optimizers mid-fit, each epoch: ``a``, ``b``, ``a``, ``a``."""

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: TwoLayers) -> None:
        if trainer.current_epoch > 0:
            pl_module.which = "ab"[trainer.current_epoch % 2] if trainer.current_epoch < 3 else "a"
            trainer.strategy.setup_optimizers(trainer)


def test_optimizers_rebuilt_mid_fit_are_followed(tmp_path: Path) -> None:
    """Grad norms and update ratios are those of the parameters the *current* optimizer steps, recomputed
    from the gradients it sees and from snapshots of the weights around each step."""
    model, snaps = TwoLayers(), Snapshots()
    logger = CSVLogger(tmp_path, name="csv")
    monitor = WeightNormMonitor(log_grad_norm=True, log_update_ratio=True)
    _fit(tmp_path, model, [RebuildEachEpoch(), snaps, monitor], logger=logger, max_epochs=4, log_every_n_steps=3)
    rows = _read_csv(logger)
    steps_per_epoch = 8
    logged = sorted(s for s, row in rows.items() if "grad_norm/total" in row)
    assert logged == list(range(2, 4 * steps_per_epoch, 3))
    for step in logged:
        layer = "abaa"[step // steps_per_epoch]
        want = model.grads[step]
        assert set(want) == {f"{layer}.weight", f"{layer}.bias"}
        row = rows[step]
        assert {k for k in row if k.startswith("grad_norm/")} == {f"grad_norm/{n}" for n in want} | {"grad_norm/total"}
        assert {k for k in row if k.startswith("update_ratio/")} == {f"update_ratio/{n}" for n in want}
        for name, norm in want.items():
            assert row[f"grad_norm/{name}"] == pytest.approx(norm, rel=1e-6)
            before, after = snaps.before[step][name].double(), snaps.after[step][name].double()
            ratio = ((after - before).norm() / before.norm()).item()
            assert ratio > 0
            assert row[f"update_ratio/{name}"] == pytest.approx(ratio, rel=1e-6)
        assert row["grad_norm/total"] == pytest.approx(math.hypot(*want.values()), rel=1e-6)


def test_an_optimizer_allocated_where_a_freed_one_was_is_not_taken_for_it() -> None:
    """CPython hands a freed object's address to the next object of its size: an ``id()``-keyed layout would
    take the new binding (other parameters, same group sizes) for the old one and measure the wrong tensors."""
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)

    def bind(binding: Binding, module: nn.Module) -> Binding:
        binding.bind(module, [torch.optim.SGD(module.parameters(), lr=0.1)], None, DecayRules(), step_hooks=False)
        return binding

    def make() -> Binding:
        return Binding("WeightNormMonitor", [], selects=every_param, decays=never, hooks=False)

    old = bind(make(), a)
    old_id, signature = id(old), layout_signature(old)
    del old
    gc.collect()  # the bound binding sits in reference cycles: freed here
    assert signature[0]() is None  # held weakly: a layout never keeps a dead binding alive, nor matches it
    candidates = [make() for _ in range(20000)]  # one of them may take the freed address
    new = next((c for c in candidates if id(c) == old_id), candidates[0])
    bind(new, b)
    assert signature != layout_signature(new)  # whether or not at the same address
    assert layout_signature(new) == layout_signature(new)


def test_a_param_group_added_changes_the_layout_signature() -> None:
    """The binding's one signature check: ``BaseFinetuning`` adding a group bumps the version the layout keys."""
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    opt = torch.optim.SGD(a.parameters(), lr=0.1)
    module = nn.Sequential(a, b)
    binding = Binding("WeightNormMonitor", [], selects=every_param, decays=never, hooks=False)
    binding.bind(module, [opt], None, DecayRules(), step_hooks=False)
    before = layout_signature(binding)
    binding.refresh()
    assert layout_signature(binding) == before  # nothing changed: no rebuild
    opt.add_param_group({"params": list(b.parameters())})
    binding.refresh()
    assert layout_signature(binding) != before
    assert {id(p) for _, bk in binding.all_buckets() for p in bk.params} == {id(p) for p in module.parameters()}


class BindingSeen(Callback):
    """Records, before each step (after the monitor's hook), the monitor bindings on the optimizer and its step
    hooks (count)."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, int, int]] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, opt: torch.optim.Optimizer) -> None:
        monitors = [b for b in bound_to(opt) if b.owner == "WeightNormMonitor"]
        self.seen.append((len(monitors), len(opt._optimizer_step_pre_hooks), len(opt._optimizer_step_post_hooks)))


def test_under_a_trainer_the_monitor_is_bound_without_step_hooks_and_unbound_at_teardown(tmp_path: Path) -> None:
    """The engine's bucket index serves the monitor under a Trainer too: one binding on the optimizer being
    stepped (a rebuilt one followed), no step hook of its own on it (Lightning's hooks drive it: no per-step
    call), and none left once the fit ends."""
    model, seen = TwoLayers(), BindingSeen()
    callbacks = [RebuildEachEpoch(), WeightNormMonitor(log_grad_norm=True), seen]
    trainer = _fit(tmp_path, model, callbacks, max_epochs=2)
    assert len(seen.seen) == 16 and set(seen.seen) == {(1, 0, 0)}, seen.seen
    assert [b for b in bound_to(trainer.optimizers[0]) if b.owner == "WeightNormMonitor"] == []


def test_sparsity_counts_exact_zeros(tmp_path: Path) -> None:
    model = Net(weight_decay=0.0)
    with torch.no_grad():
        model.net[0].weight[::2] = 0.0
        model.net[3].bias.zero_()
    mask = (model.net[0].weight != 0).float()
    # Keep the zeros exact: zero their gradient (SGD without decay leaves them at 0).
    model.net[0].weight.register_hook(lambda g: g * mask)
    logger = CSVLogger(tmp_path, name="csv")
    _fit(tmp_path, model, [WeightNormMonitor(log_sparsity=True)], logger=logger, max_steps=4, log_every_n_steps=4)
    row = _read_csv(logger)[3]
    for name, param in model.named_parameters():
        assert row[f"sparsity/{name}"] == pytest.approx((param == 0).double().mean().item(), abs=1e-12)
    assert row["sparsity/net.0.weight"] == pytest.approx(0.5)


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_bf16_norms_accumulate_in_fp32(tmp_path: Path, precision: str) -> None:
    model = Net()
    logger = CSVLogger(tmp_path, name="csv")
    trainer = _fit(
        tmp_path,
        model,
        [WeightNormMonitor(log_grad_norm=True)],
        logger=logger,
        max_steps=4,
        log_every_n_steps=4,
        precision=precision,
    )
    assert trainer.global_step == 4
    dtypes = {p.dtype for p in model.parameters()}
    assert dtypes == ({torch.bfloat16} if precision == "bf16-true" else {torch.float32})
    row = _read_csv(logger)[3]
    # Reference: upcast to float32 first, then reduce.
    want = {
        f"weight_norm/{n}": torch.linalg.vector_norm(p.detach().float()).item() for n, p in model.named_parameters()
    }
    _assert_close(row, want, rtol=1e-5)
    grads = model.grad_norms[3]
    assert row["grad_norm/total"] == pytest.approx(grads["grad_2.0_norm_total"], rel=1e-2)


class Tied(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.emb.weight
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)
        self.unused = nn.Parameter(torch.ones(3))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, _ = batch
        idx = (x.abs() * 3).long().clamp(0, 9)[:, 0]
        return nn.functional.cross_entropy(self.head(self.frozen(self.emb(idx))), idx)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)


@pytest.mark.parametrize("include_frozen", [False, True])
def test_tied_weights_once_and_frozen_params(tmp_path: Path, include_frozen: bool) -> None:
    model = Tied()
    logger = CSVLogger(tmp_path, name="csv")
    _fit(
        tmp_path,
        model,
        [WeightNormMonitor(include_frozen=include_frozen, log_grad_norm=True)],
        logger=logger,
        max_steps=2,
        log_every_n_steps=2,
    )
    row = _read_csv(logger)[1]
    weights = {k for k in row if k.startswith("weight_norm/") and not k.endswith("total")}
    expected = {"weight_norm/emb.weight", "weight_norm/unused"}
    if include_frozen:
        expected |= {"weight_norm/frozen.weight", "weight_norm/frozen.bias"}
    assert weights == expected
    assert row["weight_norm/emb.weight"] == pytest.approx(_norm(model.emb.weight), rel=1e-6)
    # Grad norms: the tied weight once, no frozen or unused (gradient-less) parameter.
    assert {k for k in row if k.startswith("grad_norm/")} == {"grad_norm/emb.weight", "grad_norm/total"}
    params = [model.emb.weight, model.unused]
    if include_frozen:
        params += [model.frozen.weight, model.frozen.bias]
    total = _norm(torch.cat([p.detach().reshape(-1) for p in params]))
    assert row["weight_norm/total"] == pytest.approx(total, rel=1e-6)


class PoisonAtStep(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.unused[1] = float("nan")


def test_nan_weight_is_logged_and_warned_once(tmp_path: Path) -> None:
    model = Tied()
    logger = CSVLogger(tmp_path, name="csv")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = _fit(
            tmp_path, model, [PoisonAtStep(1), WeightNormMonitor()], logger=logger, max_steps=8, log_every_n_steps=2
        )
    assert trainer.global_step == 8  # training went on
    rows = _read_csv(logger)
    assert math.isfinite(rows[1]["weight_norm/unused"]) is False
    assert all(math.isnan(rows[s]["weight_norm/unused"]) for s in (1, 3, 5, 7))
    assert math.isnan(rows[7]["weight_norm/total"]) and math.isfinite(rows[7]["weight_norm/emb.weight"])
    messages = [str(w.message) for w in caught if "WeightNormMonitor" in str(w.message)]
    assert len(messages) == 1 and "'unused'" in messages[0]


def test_module_and_block_granularity(tmp_path: Path) -> None:
    model = Net()
    logger = CSVLogger(tmp_path, name="csv")
    blocks = {"first": r"^net\.0\.", "norm_and_head": r"^net\.(1|3)\.weight$"}
    monitors = [
        WeightNormMonitor(granularity="module", log_sparsity=True, log_update_ratio=True),
        WeightNormMonitor(blocks=blocks, group_separator="."),
    ]
    _fit(tmp_path, model, monitors, logger=logger, max_steps=4, log_every_n_steps=4)
    row = _read_csv(logger)[3]
    params = dict(model.named_parameters())

    def norm_of(names: list[str]) -> float:
        return _norm(torch.cat([params[n].detach().reshape(-1) for n in names]))

    modules = {
        "net.0": ["net.0.weight", "net.0.bias"],
        "net.1": ["net.1.weight", "net.1.bias"],
        "net.3": ["net.3.weight", "net.3.bias"],
    }
    assert {k for k in row if k.startswith("weight_norm/") and not k.endswith("total")} == {
        f"weight_norm/{m}" for m in modules
    }
    for module, names in modules.items():
        assert row[f"weight_norm/{module}"] == pytest.approx(norm_of(names), rel=1e-6)
        assert row[f"sparsity/{module}"] == 0.0
        assert row[f"update_ratio/{module}"] > 0
    # Blocks: first match wins, unmatched parameters (net.1.bias, net.3.bias) only in the totals.
    assert {k for k in row if k.startswith("weight_norm.")} == {
        "weight_norm.first",
        "weight_norm.norm_and_head",
        "weight_norm.total",
        "weight_norm.decay_total",
        "weight_norm.no_decay_total",
    }
    assert row["weight_norm.first"] == pytest.approx(norm_of(modules["net.0"]), rel=1e-6)
    assert row["weight_norm.norm_and_head"] == pytest.approx(norm_of(["net.1.weight", "net.3.weight"]), rel=1e-6)
    assert row["weight_norm.total"] == pytest.approx(row["weight_norm/total"], rel=1e-12)


class TwoOptimizers(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.gen = nn.Linear(4, 4)
        self.disc = nn.Linear(4, 1)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        opt_g, opt_d = self.optimizers()
        loss_d = nn.functional.mse_loss(self.disc(self.gen(x).detach()), y)
        opt_d.zero_grad()
        self.manual_backward(loss_d)
        opt_d.step()
        loss_g = self.disc(self.gen(x)).mean()
        opt_g.zero_grad()
        self.manual_backward(loss_g)
        opt_g.step()

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [torch.optim.SGD(self.gen.parameters(), lr=0.1), torch.optim.SGD(self.disc.parameters(), lr=0.1)]


def test_manual_optimization_with_two_optimizers(tmp_path: Path) -> None:
    model = TwoOptimizers()
    snaps = Snapshots()
    logger = CSVLogger(tmp_path, name="csv")
    monitor = WeightNormMonitor(log_grad_norm=True, log_update_ratio=True)
    trainer = _fit(tmp_path, model, [snaps, monitor], logger=logger, max_steps=8, log_every_n_steps=2)
    assert trainer.global_step == 8  # two optimizer steps per batch, four batches
    rows = _read_csv(logger)
    logged = sorted(s for s, row in rows.items() if "weight_norm/total" in row)
    assert logged == [1, 3]  # labels count batches
    for step in logged:
        for name, before in snaps.before[step].items():
            after = snaps.after[step][name]
            assert rows[step][f"weight_norm/{name}"] == pytest.approx(_norm(after), rel=1e-6)
            ratio = _norm(after - before) / _norm(before)
            assert rows[step][f"update_ratio/{name}"] == pytest.approx(ratio, rel=1e-6)
            assert f"grad_norm/{name}" in rows[step]


def test_histograms_go_to_tensorboard_only_when_asked(tmp_path: Path) -> None:
    model = Net()
    loggers = [TensorBoardLogger(tmp_path, name="tb"), CSVLogger(tmp_path, name="csv")]
    _fit(tmp_path, model, [WeightNormMonitor(log_histograms=True)], logger=loggers, max_steps=4, log_every_n_steps=4)
    acc = _read_tb(loggers[0])
    assert set(acc.Tags()["histograms"]) == {f"weight_hist/{n}" for n, _ in model.named_parameters()}
    for name, param in model.named_parameters():
        [event] = acc.Histograms(f"weight_hist/{name}")
        assert event.step == 3
        assert event.histogram_value.num == param.numel()
        assert event.histogram_value.sum == pytest.approx(param.detach().sum().item(), rel=1e-4, abs=1e-5)
    # Off by default.
    logger = TensorBoardLogger(tmp_path, name="tb_default")
    _fit(tmp_path, Net(), [WeightNormMonitor()], logger=logger, max_steps=2, log_every_n_steps=2)
    assert _read_tb(logger).Tags()["histograms"] == []


class CountCalls(Callback):
    """Counts ``torch._foreach_norm`` calls and host copies per batch, read after the monitor's hooks."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, monitor: WeightNormMonitor) -> None:
        self.norm_calls = 0
        self.host_copies = 0
        self.per_batch: dict[int, tuple[int, int]] = {}
        real_norm, real_tolist, real_item = torch._foreach_norm, torch.Tensor.tolist, torch.Tensor.item

        def norm(*args: Any, **kwargs: Any) -> Any:
            self.norm_calls += 1
            return real_norm(*args, **kwargs)

        def tolist(t: torch.Tensor) -> Any:
            self.host_copies += 1
            return real_tolist(t)

        def item(t: torch.Tensor) -> Any:
            self.host_copies += 1
            return real_item(t)

        monkeypatch.setattr(torch, "_foreach_norm", norm)
        # Count host copies only inside the monitor's hooks (Lightning itself may copy elsewhere).
        for hook in ("on_before_optimizer_step", "on_train_batch_end"):
            original = getattr(monitor, hook)

            def wrapped(*args: Any, _original: Any = original, **kwargs: Any) -> Any:
                with monkeypatch.context() as m:
                    m.setattr(torch.Tensor, "tolist", tolist)
                    m.setattr(torch.Tensor, "item", item)
                    return _original(*args, **kwargs)

            monkeypatch.setattr(monitor, hook, wrapped)

    def on_train_batch_start(self, *args: Any) -> None:
        self.norm_calls = self.host_copies = 0

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.per_batch[trainer.fit_loop.epoch_loop._batches_that_stepped] = (self.norm_calls, self.host_copies)


class MixedDtypes(Net):
    def __init__(self) -> None:
        super().__init__()
        self.extra = nn.Linear(4, 1).double()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x) + self.extra(x.double()).float(), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01, foreach=False)


def test_one_foreach_norm_per_group_and_one_host_copy_per_logging_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monitor = WeightNormMonitor()
    counter = CountCalls(monkeypatch, monitor)
    _fit(tmp_path, MixedDtypes(), [monitor, counter], max_steps=8, log_every_n_steps=4)
    # float32 and float64 parameters: two groups, one ``_foreach_norm`` each, one ``.tolist()``.
    assert counter.per_batch == {s: ((2, 1) if s in (3, 7) else (0, 0)) for s in range(8)}

    monitor = WeightNormMonitor(log_grad_norm=True, log_update_ratio=True, log_sparsity=True)
    counter = CountCalls(monkeypatch, monitor)
    _fit(tmp_path, MixedDtypes(), [monitor, counter], max_steps=4, log_every_n_steps=4)
    # Per group: weights, grads, sparsity, and |w_before|, |w_after|, |Δw|; still one host copy.
    assert counter.per_batch == {0: (0, 0), 1: (0, 0), 2: (0, 0), 3: (12, 1)}


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"norm_type": 3}, ValueError, "norm_type"),
        ({"norm_type": "l2"}, ValueError, "norm_type"),
        ({"granularity": "layer"}, ValueError, "granularity"),
        ({"blocks": {"a": "("}}, ValueError, "blocks"),
        ({"blocks": {"total": "a"}}, ValueError, "reserved"),
        ({"blocks": {}}, ValueError, "blocks"),
        ({"blocks": {"a": "x"}, "granularity": "module"}, ValueError, "blocks"),
        ({"logging_interval": 0}, ValueError, "logging_interval"),
        ({"logging_interval": 2.5}, ValueError, "logging_interval"),
        ({"logging_interval": True}, ValueError, "logging_interval"),
        ({"log_grad_norm": 1}, TypeError, "log_grad_norm"),
        ({"rules": "default"}, TypeError, "rules"),
        ({"group_separator": ""}, ValueError, "group_separator"),
    ],
)
def test_bad_arguments_raise_at_construction(kwargs: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        WeightNormMonitor(**kwargs)


def test_no_logger_is_a_misconfiguration(tmp_path: Path) -> None:
    with pytest.raises(MisconfigurationException, match="no logger"):
        _fit(tmp_path, Net(), [WeightNormMonitor()], logger=False, max_steps=1)


def test_logging_step_uses_the_layout_lists_and_float32_kernels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Plain parameters: the (device, dtype) split and metric keys are made once, not per logging step
    (no ``local_tensor`` per parameter); float32 weights get float32 kernels (float64 ones their own), the
    angle's too (its formula needs no float64 sums); the update is subtracted into the snapshot."""
    from lightning_decay import norms as K

    calls: dict[str, list[Any]] = {"local_tensor": [], "kernel_dtypes": [], "sub": []}
    real_local, real_norm, real_sub = K.local_tensor, torch._foreach_norm, torch._foreach_sub

    def local_tensor(t: torch.Tensor) -> torch.Tensor:
        calls["local_tensor"].append(t)
        return real_local(t)

    def norm(tensors: list[torch.Tensor], *args: Any, **kwargs: Any) -> Any:
        calls["kernel_dtypes"].append((tensors[0].dtype, kwargs.get("dtype")))
        return real_norm(tensors, *args, **kwargs)

    def sub(*args: Any, **kwargs: Any) -> Any:
        calls["sub"].append(args)
        return real_sub(*args, **kwargs)

    class Spy(Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
            if trainer.global_step >= 4:  # the layout was built at the first logging step (step 1)
                monkeypatch.setattr(K, "local_tensor", local_tensor)
                monkeypatch.setattr(torch, "_foreach_norm", norm)
                monkeypatch.setattr(torch, "_foreach_sub", sub)

    for angle in (False, True):
        for values in calls.values():
            values.clear()
        monitor = WeightNormMonitor(log_update_ratio=True, log_angular_update=angle)
        logger = CSVLogger(tmp_path, name=f"csv{angle}")
        _fit(tmp_path, MixedDtypes(), [Spy(), monitor], logger=logger, max_steps=6, log_every_n_steps=2)
        monkeypatch.undo()
        assert calls["local_tensor"] == [] and calls["sub"] == []
        weights = [(torch.float32, None), (torch.float64, None)]  # step 5: weight norms, one kernel per group
        snapshot = [(torch.float32, None), (torch.float64, None)]
        assert sorted(calls["kernel_dtypes"], key=str) == sorted(weights + snapshot * 3, key=str)
        row = _read_csv(logger)[5]
        assert row["update_ratio/net.0.weight"] > 0 and ("angular_update/net.0.weight" in row) == angle


class ZeroWeights(pl.LightningModule):
    """A LayerNorm bias at zero (its init), a parameter that stays zero, a weight proximal L1 sets to zero."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(4, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 1))
        self.dead = nn.Parameter(torch.zeros(3))  # gets a zero gradient every step: stays zero

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y) + 0.0 * self.dead.sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _update_metrics_by_definition(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """The documented definitions, per tensor in float64: ratio 0 / 1 and angle 0 where a norm is zero."""
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    na, nb, nd = a.norm().item(), b.norm().item(), (b - a).norm().item()
    ratio = nd / na if na > 0 else (1.0 if nd > 0 else 0.0)
    angle = 0.0 if na == 0 or nb == 0 else math.acos(max(-1.0, min(1.0, (a @ b).item() / (na * nb))))
    return ratio, angle


def test_update_ratio_and_angle_of_zero_tensors_are_defined_not_inf_or_nan(tmp_path: Path) -> None:
    from lightning_decay import WeightPenalty

    snaps = Snapshots()
    logger = CSVLogger(tmp_path, name="csv")
    monitor = WeightNormMonitor(log_update_ratio=True, log_angular_update=True)
    # A threshold of lr * l1 = 100 zeroes the last layer's weight at every step.
    prox = WeightPenalty(l1=1e3, l1_mode="proximal", rules=DecayRules(exclude=["net.0.*"]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(tmp_path, ZeroWeights(), [snaps, prox, monitor], logger=logger, max_steps=3, log_every_n_steps=1)
    assert not [w for w in caught if "WeightNormMonitor" in str(w.message)]  # no non-finite report
    rows = _read_csv(logger)
    assert sorted(s for s, row in rows.items() if "update_ratio/dead" in row) == [0, 1, 2]
    for step in (0, 1, 2):
        for name, before in snaps.before[step].items():
            ratio, angle = _update_metrics_by_definition(before, snaps.after[step][name])
            got_ratio, got_angle = rows[step][f"update_ratio/{name}"], rows[step][f"angular_update/{name}"]
            assert math.isfinite(got_ratio) and math.isfinite(got_angle), (step, name)
            assert got_ratio == pytest.approx(ratio, rel=1e-6), (step, name)
            assert got_angle == pytest.approx(angle, rel=1e-5, abs=1e-4), (step, name)
    # The zero cases themselves, exactly: they are definitions, not roundings.
    assert not snaps.before[0]["net.1.bias"].any() and snaps.after[0]["net.1.bias"].any()
    assert (rows[0]["update_ratio/net.1.bias"], rows[0]["angular_update/net.1.bias"]) == (1.0, 0.0)  # leaves zero
    assert (rows[0]["update_ratio/dead"], rows[0]["angular_update/dead"]) == (0.0, 0.0)  # stays zero
    assert snaps.before[0]["net.3.weight"].any() and not snaps.after[0]["net.3.weight"].any()
    assert rows[0]["angular_update/net.3.weight"] == 0.0  # pruned to zero: no direction after
    assert rows[0]["update_ratio/net.3.weight"] == pytest.approx(1.0, rel=1e-6)  # Δw = -w_before
    assert (rows[1]["update_ratio/net.3.weight"], rows[1]["angular_update/net.3.weight"]) == (0.0, 0.0)
