"""``WeightPenalty``: L1 / L2 / L2-SP through the gradient, checked against independent references.

References: autograd of the explicit penalty added to the loss, torch's own ``SGD(weight_decay=...)``
on the decay groups, and the proximal (soft-threshold) formula applied to a plain SGD step.

The small helpers at the top (``Lit``, ``fit``, ``Snapshots``...) are shared with the other
regularizer test files, which import them from here.
"""

from __future__ import annotations

import csv
import math
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_decay import DecayRules, WeightPenalty, decay_param_groups

# ------------------------------------------------------------------------------ shared helpers
N_SAMPLES, BATCH = 32, 8  # 4 optimizer steps per epoch


def make_net(seed: int = 0, hidden_layers: int = 1, width: int = 8) -> nn.Sequential:
    """Linear -> LayerNorm -> Tanh -> (Linear -> Tanh) * (hidden_layers - 1) -> Linear: weights, biases, a norm."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers: list[nn.Module] = [nn.Linear(4, width), nn.LayerNorm(width), nn.Tanh()]
        for _ in range(hidden_layers - 1):
            layers += [nn.Linear(width, width), nn.Tanh()]
        layers.append(nn.Linear(width, 2))
        net = nn.Sequential(*layers)
        with torch.no_grad():  # make the LayerNorm parameters non-trivial so that touching them shows
            net[1].weight.uniform_(0.5, 1.5)
            net[1].bias.uniform_(-0.5, 0.5)
    return net


def dataset(n: int = N_SAMPLES, seed: int = 1) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = torch.randn(n, 2, generator=g)
    return TensorDataset(x, y)


def loader(n: int = N_SAMPLES, batch_size: int = BATCH, seed: int = 1) -> DataLoader:
    return DataLoader(dataset(n, seed), batch_size=batch_size, shuffle=False)


OptimizerFn = Callable[["Lit"], Any]


class Lit(pl.LightningModule):
    """A tiny regression module; ``extra_loss(self)`` is added to the loss (the explicit-penalty reference)."""

    def __init__(
        self,
        optimizer: OptimizerFn,
        extra_loss: Callable[[Lit], Tensor] | None = None,
        seed: int = 0,
        hidden_layers: int = 1,
    ) -> None:
        super().__init__()
        self.net = make_net(seed, hidden_layers)
        self.optimizer_fn = optimizer
        self.extra_loss = extra_loss

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x).float(), y.float())
        if self.extra_loss is not None:
            loss = loss + self.extra_loss(self)
        return loss

    def configure_optimizers(self) -> Any:
        return self.optimizer_fn(self)


def make_trainer(callbacks: Sequence[Callback] = (), max_epochs: int = 1, **kwargs: Any) -> pl.Trainer:
    options: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": max_epochs,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "num_sanity_val_steps": 0,
    }
    options.update(kwargs)
    return pl.Trainer(callbacks=list(callbacks), **options)


def fit(
    module: pl.LightningModule,
    callbacks: Sequence[Callback] = (),
    max_epochs: int = 1,
    data: DataLoader | None = None,
    **kwargs: Any,
) -> pl.Trainer:
    trainer = make_trainer(callbacks, max_epochs=max_epochs, **kwargs)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer.fit(module, data if data is not None else loader())
    return trainer


def weights(module: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


class Snapshots(Callback):
    """Records every parameter after each training batch (after the optimizer step and its hooks)."""

    def __init__(self) -> None:
        self.after: list[dict[str, Tensor]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.after.append(weights(pl_module))


def assert_runs_equal(
    a: list[dict[str, Tensor]], b: list[dict[str, Tensor]], exact: bool = True, rtol: float = 1e-5, atol: float = 1e-7
) -> None:
    """Compare two runs step by step.

    ``exact=True`` only where both runs execute the same operations in the same order: per-parameter
    updates (foreach=False optimizers, the elementwise kernels) do not depend on how parameters are grouped,
    but a reduction over several parameters does (Lightning's gradient clipping sums the optimizer's
    parameters in their group order), so such runs must share their parameter order or use a tolerance.
    """
    assert len(a) == len(b) and len(a) > 0
    for step, (wa, wb) in enumerate(zip(a, b, strict=True)):
        assert wa.keys() == wb.keys()
        for name in wa:
            if exact:
                assert torch.equal(wa[name], wb[name]), f"step {step}: {name} differs"
            else:
                torch.testing.assert_close(wa[name], wb[name], rtol=rtol, atol=atol, msg=f"step {step}: {name}")


def decayed(module: nn.Module) -> list[nn.Parameter]:
    """The parameters the default rules decay, classified independently of the callbacks."""
    return DecayRules().classify(module).decay_params


def sgd(lr: float = 0.1, momentum: float = 0.0, **kw: Any) -> OptimizerFn:
    return lambda m: torch.optim.SGD(m.parameters(), lr=lr, momentum=momentum, foreach=False, **kw)


def adam(lr: float = 0.01) -> OptimizerFn:
    return lambda m: torch.optim.Adam(m.parameters(), lr=lr, foreach=False)


def explicit_penalty(
    l1: float = 0.0, l2: float = 0.0, refs: dict[str, Tensor] | None = None, l2_head: float | None = None
):
    """``module -> l1 * sum|w| + l2 / 2 * sum (w - ref)^2`` over the decayed parameters, for autograd."""

    def penalty(module: nn.Module) -> Tensor:
        total = torch.zeros(())
        for d in DecayRules().classify(module).decay:
            w = d.param
            if l1:
                total = total + l1 * w.abs().sum()
            if refs is not None and d.name in refs:
                total = total + l2 / 2 * (w - refs[d.name]).pow(2).sum()
            else:
                c = l2 if l2_head is None else l2_head
                if c:
                    total = total + c / 2 * w.pow(2).sum()
        return total

    return penalty


def run(module: pl.LightningModule, callbacks: Sequence[Callback] = (), **kwargs: Any) -> list[dict[str, Tensor]]:
    snaps = Snapshots()
    fit(module, [*callbacks, snaps], **kwargs)
    return snaps.after


# ------------------------------------------------------------------------ equivalence to loss terms
@pytest.mark.parametrize(
    ("optimizer", "l1", "l2"),
    [
        (adam(), 0.0, 0.05),
        (adam(), 0.02, 0.0),
        (sgd(momentum=0.9), 0.01, 0.1),
    ],
    ids=["adam-l2", "adam-l1", "sgd-momentum-elastic"],
)
def test_penalty_equals_explicit_loss_term(optimizer: OptimizerFn, l1: float, l2: float) -> None:
    got = run(Lit(optimizer), [WeightPenalty(l1=l1, l2=l2)])
    want = run(Lit(optimizer, extra_loss=explicit_penalty(l1, l2)))
    plain = run(Lit(optimizer))
    assert_runs_equal(got, want, exact=False, rtol=1e-5, atol=1e-6)
    # The penalty changed the decayed weights and left biases and the LayerNorm alone at step 0.
    names_decayed = {"net.0.weight", "net.3.weight"}
    assert {d.name for d in DecayRules().classify(Lit(optimizer)).decay} == names_decayed
    for name in names_decayed:
        assert not torch.allclose(got[-1][name], plain[-1][name], rtol=1e-6, atol=1e-7)
    for name in ("net.0.bias", "net.1.weight", "net.1.bias", "net.3.bias"):
        torch.testing.assert_close(got[0][name], plain[0][name], rtol=0, atol=0)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_l2_penalty_is_bitwise_torch_sgd_weight_decay(momentum: float) -> None:
    lam = 0.05
    got = run(Lit(sgd(momentum=momentum)), [WeightPenalty(l2=lam)], max_epochs=2)

    def reference(m: Lit) -> torch.optim.Optimizer:
        return torch.optim.SGD(decay_param_groups(m, weight_decay=lam), lr=0.1, momentum=momentum, foreach=False)

    want = run(Lit(reference), max_epochs=2)
    assert_runs_equal(got, want, exact=True)


def test_l1_subgradient_adds_sign_to_gradient() -> None:
    """g_after_callback == g_loss + l1 * sign(w) on decayed parameters, untouched elsewhere."""
    l1 = 0.03

    class GradProbe(Callback):
        def __init__(self) -> None:
            self.grads: list[dict[str, Tensor]] = []

        def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
            self.grads.append({n: p.grad.clone() for n, p in pl_module.named_parameters()})

    class WeightsBefore(Callback):
        def __init__(self) -> None:
            self.before: list[dict[str, Tensor]] = []

        def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
            self.before.append(weights(pl_module))

    plain_probe, probe, wb = GradProbe(), GradProbe(), WeightsBefore()
    fit(Lit(sgd()), [plain_probe, WeightPenalty(l1=l1), probe, wb])  # first probe sees grads before the penalty
    decayed_names = {d.name for d in DecayRules().classify(Lit(sgd())).decay}
    for step, (g0, g1, w) in enumerate(zip(plain_probe.grads, probe.grads, wb.before, strict=True)):
        for name in g0:
            expected = g0[name] + l1 * torch.sign(w[name]) if name in decayed_names else g0[name]
            torch.testing.assert_close(g1[name], expected, rtol=0, atol=1e-7, msg=f"step {step}: {name}")


def test_l1_proximal_soft_thresholds_plain_sgd_step_and_makes_exact_zeros() -> None:
    lr, l1 = 0.1, 0.2

    class Probe(Callback):
        """Weights and gradients right before the SGD step (after the penalty's own hook)."""

        def __init__(self) -> None:
            self.before: list[tuple[dict[str, Tensor], dict[str, Tensor]]] = []

        def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
            named = dict(pl_module.named_parameters())
            self.before.append(
                ({n: p.detach().clone() for n, p in named.items()}, {n: p.grad.clone() for n, p in named.items()})
            )

    probe, snaps = Probe(), Snapshots()
    fit(Lit(sgd(lr=lr)), [WeightPenalty(l1=l1, l1_mode="proximal"), probe, snaps], max_epochs=2)
    decayed_names = {d.name for d in DecayRules().classify(Lit(sgd())).decay}
    assert len(probe.before) == len(snaps.after) == 8
    for step, ((w, g), after) in enumerate(zip(probe.before, snaps.after, strict=True)):
        for name in w:
            w_sgd = w[name] - lr * g[name]  # the gradient is the plain loss gradient: no L1 term added
            if name in decayed_names:
                expected = torch.sign(w_sgd) * torch.clamp(w_sgd.abs() - lr * l1, min=0.0)
            else:
                expected = w_sgd
            torch.testing.assert_close(after[name], expected, rtol=0, atol=1e-7, msg=f"step {step}: {name}")
    final = snaps.after[-1]
    assert any((final[n] == 0).any() for n in decayed_names), "the proximal step gives exact zeros"
    assert not any((final[n] == 0).any() for n in final if n not in decayed_names)


def test_l1_subgradient_never_makes_exact_zeros_where_proximal_does() -> None:
    got_sub = run(Lit(sgd()), [WeightPenalty(l1=0.2)], max_epochs=2)[-1]
    got_prox = run(Lit(sgd()), [WeightPenalty(l1=0.2, l1_mode="proximal")], max_epochs=2)[-1]
    zeros = lambda ws: sum(int((ws[n] == 0).sum()) for n in ("net.0.weight", "net.3.weight"))  # noqa: E731
    assert zeros(got_prox) > 0
    assert zeros(got_sub) == 0


class BucketProbe(Callback):
    """A regularizer's bucket chunks (at the first batch) and its penalty values (at the end of fit)."""

    def __init__(self, callback: WeightPenalty) -> None:
        self.callback = callback
        self.chunks: list[list[tuple[int, int]]] = []
        self.values: dict[str, float] = {}

    def on_train_batch_start(self, *args: Any) -> None:
        if not self.chunks:
            self.chunks = [b.chunks for _, b in self.callback._binding.all_buckets()]

    def on_train_end(self, *args: Any) -> None:
        self.values = self.callback.penalty_values()


@pytest.mark.parametrize(
    "kwargs",
    [{"l1": 0.05, "l1_mode": "proximal"}, {"l1": 0.01, "l2": 0.05}, {"l2": 0.5, "reference": "initial"}],
    ids=["proximal", "l1+l2", "l2sp"],
)
def test_buckets_cut_in_chunks_give_bitwise_the_same_run(kwargs: dict[str, Any], monkeypatch: Any) -> None:
    """The kernels' temporaries are bounded by cutting buckets into chunks; the values must not depend on it."""
    from lightning_decay import kernels

    def go() -> tuple[list[dict[str, Tensor]], BucketProbe]:
        cb = WeightPenalty(**kwargs)
        probe = BucketProbe(cb)
        return run(Lit(sgd(), hidden_layers=3), [cb, probe], max_epochs=2), probe

    whole, whole_probe = go()
    monkeypatch.setattr(kernels, "MIN_CHUNK_BYTES", 32)  # 8 float32 entries: every matrix cut in slices
    monkeypatch.setattr(kernels, "CHUNK_FRACTION", 2**40)
    cut, cut_probe = go()
    assert whole_probe.chunks == [[(0, 4)]]
    [chunks] = cut_probe.chunks
    assert [c[0] for c in chunks if len(c) == 4 and c[2] == 0] == [0, 1, 2, 3]  # every weight cut into slices
    assert_runs_equal(cut, whole, exact=True)  # element-wise kernels: bitwise whatever the slices
    assert whole_probe.values
    if "reference" in kwargs:  # ||w - ref||^2 of a cut tensor sums its slices' squares: rounding only
        assert cut_probe.values == pytest.approx(whole_probe.values, rel=1e-6)
    else:
        assert cut_probe.values == whole_probe.values


# ------------------------------------------------------------------------------------------ L2-SP
def test_l2sp_initial_pulls_toward_fit_start_weights() -> None:
    lam = 0.5
    start = Lit(adam())
    refs = {d.name: d.param.detach().clone() for d in DecayRules().classify(start).decay}
    got = run(Lit(adam()), [WeightPenalty(l2=lam, reference="initial")], max_epochs=2)
    want = run(Lit(adam(), extra_loss=explicit_penalty(l2=lam, refs=refs)), max_epochs=2)
    toward_zero = run(Lit(adam(), extra_loss=explicit_penalty(l2=lam)), max_epochs=2)
    assert_runs_equal(got, want, exact=False, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got[-1]["net.0.weight"], toward_zero[-1]["net.0.weight"], atol=1e-5)


@pytest.mark.parametrize("kind", ["mapping", "module"])
def test_l2sp_explicit_reference_and_l2_head(kind: str) -> None:
    lam, head = 0.5, 0.2
    other = Lit(adam(), seed=7)  # the "pretrained" weights: a different initialisation
    ref_first = {"net.0.weight": other.net[0].weight.detach().clone()}
    if kind == "mapping":
        reference: Any = ref_first
        refs = ref_first
    else:
        reference = other  # a module whose state_dict has the model's names: every weight has a reference
        refs = {d.name: d.param.detach().clone() for d in DecayRules().classify(other).decay}
    got = run(Lit(adam()), [WeightPenalty(l2=lam, reference=reference, l2_head=head)])
    want = run(Lit(adam(), extra_loss=explicit_penalty(l2=lam, refs=refs, l2_head=head)))
    assert_runs_equal(got, want, exact=False, rtol=1e-5, atol=1e-6)


class ZeroDataLoss(Lit):
    """A loss whose gradient is exactly zero (every parameter still gets one): only the penalty moves weights."""

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return (self.net(batch[0]) * 0.0).sum()


class DisplaceBackbone(Callback):
    """After the references are taken (fit start), move the backbone's weight away from them."""

    def __init__(self, by: float) -> None:
        self.by = by
        self.reference: Tensor | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.reference = pl_module.net[0].weight.detach().clone()
        with torch.no_grad():
            pl_module.net[0].weight.add_(self.by)


def test_l2sp_recipe_head_gets_l2_head_and_backbone_its_reference() -> None:
    """docs/recipes.md: the backbone is pulled toward its fit-start weights, the ``head`` toward zero by ``l2_head``.

    With a zero data gradient and plain SGD the closed forms are exact factors per step:
    ``w_t - w0 = (1 - lr * l2)**t * (w_start - w0)`` for the backbone, ``w_t = (1 - lr * l2_head)**t * w_start``
    for the head.
    """
    lr, l2, l2_head, by = 0.1, 0.5, 2.0, 0.25
    steps = N_SAMPLES // BATCH

    def go(**kwargs: Any) -> tuple[list[dict[str, Tensor]], Tensor, dict[str, Tensor]]:
        module = ZeroDataLoss(sgd(lr=lr))
        start = weights(module)
        displace = DisplaceBackbone(by)
        after = run(module, [WeightPenalty(l2=l2, reference="initial", l2_head=l2_head, **kwargs), displace])
        assert displace.reference is not None
        return after, displace.reference, start

    got, w0, start = go(head=["net.3.*"])
    assert torch.equal(w0, start["net.0.weight"])  # the reference is the fit-start weight
    torch.testing.assert_close(got[-1]["net.0.weight"] - w0, (1 - lr * l2) ** steps * torch.full_like(w0, by))
    torch.testing.assert_close(got[-1]["net.3.weight"], (1 - lr * l2_head) ** steps * start["net.3.weight"])
    for name in ("net.0.bias", "net.1.weight", "net.1.bias", "net.3.bias"):  # not decayed: untouched
        assert torch.equal(got[-1][name], start[name]), name

    # Without `head`, the head has a reference too (its own fit-start weights): l2_head never applies.
    with pytest.warns(UserWarning, match="`l2_head` never applies"):
        without, _, _ = go()
    assert torch.equal(without[-1]["net.3.weight"], start["net.3.weight"])
    # Bitwise: the L2 kernels are elementwise, so a tensor's update does not depend on its bucket's other tensors.
    torch.testing.assert_close(without[-1]["net.0.weight"], got[-1]["net.0.weight"], rtol=0, atol=0)


def test_l2sp_head_with_data_gradient_matches_explicit_loss_term() -> None:
    """L2-SP with a head, under Adam and a real data gradient, against autograd of the explicit penalty."""
    l2, l2_head = 0.5, 0.2
    module = Lit(adam())
    refs = {"net.0.weight": module.net[0].weight.detach().clone()}  # the backbone; the head gets none
    got = run(module, [WeightPenalty(l2=l2, reference="initial", head="net.3.*", l2_head=l2_head)], max_epochs=2)
    want = run(Lit(adam(), extra_loss=explicit_penalty(l2=l2, refs=refs, l2_head=l2_head)), max_epochs=2)
    assert_runs_equal(got, want, exact=False, rtol=1e-5, atol=1e-6)
    other = run(Lit(adam()), [WeightPenalty(l2=l2, reference="initial", head="net.3.*", l2_head=5.0)], max_epochs=2)
    assert not torch.allclose(other[-1]["net.3.weight"], got[-1]["net.3.weight"], rtol=1e-4, atol=1e-6)


def test_head_without_reference_gives_l2_head_to_the_head_and_l2_to_the_rest() -> None:
    l2, l2_head = 0.1, 0.7
    got = run(Lit(adam()), [WeightPenalty(l2=l2, head=["net.3.*"], l2_head=l2_head)])

    def penalty(m: Lit) -> Tensor:
        return l2 / 2 * m.net[0].weight.pow(2).sum() + l2_head / 2 * m.net[3].weight.pow(2).sum()

    want = run(Lit(adam(), extra_loss=penalty))
    assert_runs_equal(got, want, exact=False, rtol=1e-5, atol=1e-6)


def test_l2sp_references_are_in_state_dict_and_restored() -> None:
    cb = WeightPenalty(l2=0.1, reference="initial")
    module = Lit(adam())
    start = {d.name: d.param.detach().clone() for d in DecayRules().classify(module).decay}
    fit(module, [cb])
    state = cb.state_dict()
    assert set(state["refs"]) == set(start)
    for name, ref in state["refs"].items():
        assert torch.equal(ref, start[name])
        assert not torch.equal(ref, dict(module.named_parameters())[name].detach())  # not the current weights
    assert state["steps"] == [N_SAMPLES // BATCH]
    fresh = WeightPenalty(l2=0.1, reference="initial")
    fresh.load_state_dict(state)
    assert fresh.state_dict()["steps"] == state["steps"]
    for name in start:
        assert torch.equal(fresh.state_dict()["refs"][name], start[name])


def test_reference_shape_mismatch_and_unknown_names_raise_at_fit() -> None:
    with pytest.raises(ValueError, match=r"reference\['net.0.weight'\]"):
        fit(Lit(adam()), [WeightPenalty(l2=0.1, reference={"net.0.weight": torch.zeros(3, 3)})])
    with pytest.raises(ValueError, match="`reference` names none"):
        fit(Lit(adam()), [WeightPenalty(l2=0.1, reference={"nope.weight": torch.zeros(3, 3)})])


# ----------------------------------------------------------------------------------------- logging
@pytest.mark.parametrize("precision", ["32-true", "64-true", "bf16-true"])
def test_logs_penalty_values_on_logging_steps(precision: str, tmp_path: Path) -> None:
    l1, l2 = 0.01, 0.1

    class Expected(Callback):
        """Recomputes the penalties from the weights at the end of each batch, where the callback logs."""

        def __init__(self) -> None:
            self.values: dict[int, tuple[float, float]] = {}

        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
            ws = [w.detach().double() for w in decayed(pl_module)]
            self.values[trainer.global_step] = (
                l1 * sum(float(w.abs().sum()) for w in ws),
                l2 / 2 * sum(float(w.pow(2).sum()) for w in ws),
            )

    expected = Expected()
    logger = CSVLogger(tmp_path, name="run")
    callbacks = [WeightPenalty(l1=l1, l2=l2), expected]
    fit(Lit(adam()), callbacks, max_epochs=2, logger=logger, log_every_n_steps=3, precision=precision)
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("penalty/l2")]
    assert rows, "penalty/l2 was logged"
    total_steps = 2 * N_SAMPLES // BATCH
    assert len(rows) == total_steps // 3  # on logging steps only
    for row in rows:
        step = int(row["step"]) + 1  # CSV rows carry the step before the optimizer step; global_step after
        want_l1, want_l2 = expected.values[step]
        assert math.isclose(float(row["penalty/l1"]), want_l1, rel_tol=1e-5)
        assert math.isclose(float(row["penalty/l2"]), want_l2, rel_tol=1e-5)


def test_callback_metrics_hold_current_penalty(tmp_path: Path) -> None:
    l2 = 0.3
    module = Lit(adam())
    trainer = fit(module, [WeightPenalty(l2=l2)], logger=CSVLogger(tmp_path), log_every_n_steps=1)
    want = l2 / 2 * sum(float(w.detach().pow(2).sum()) for w in decayed(module))
    assert "penalty/l1" not in trainer.callback_metrics
    assert math.isclose(float(trainer.callback_metrics["penalty/l2"]), want, rel_tol=1e-5)


def test_log_penalty_false_logs_nothing(tmp_path: Path) -> None:
    trainer = fit(
        Lit(adam()), [WeightPenalty(l2=0.3, log_penalty=False)], logger=CSVLogger(tmp_path), log_every_n_steps=1
    )
    assert not any(k.startswith("penalty/") for k in trainer.callback_metrics)


# ------------------------------------------------------------------------------------ double decay
def test_adamw_default_weight_decay_plus_l2_penalty_raises() -> None:
    module = Lit(lambda m: torch.optim.AdamW(m.parameters(), lr=0.01))  # default weight_decay=0.01
    with pytest.raises(MisconfigurationException, match="Double weight decay"):
        fit(module, [WeightPenalty(l2=0.1)])


def test_l1_penalty_with_optimizer_weight_decay_is_elastic_net() -> None:
    lam, l1 = 0.05, 0.02

    def opt(m: Lit) -> torch.optim.Optimizer:
        return torch.optim.SGD(decay_param_groups(m, weight_decay=lam), lr=0.1, foreach=False)

    got = run(Lit(opt), [WeightPenalty(l1=l1)])
    want = run(Lit(opt, extra_loss=explicit_penalty(l1=l1)))
    assert_runs_equal(got, want, exact=False, rtol=1e-5, atol=1e-7)


# -------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "error", "argument"),
    [
        ({"l1": -0.1}, ValueError, "l1"),
        ({"l2": -1.0}, ValueError, "l2"),
        ({"l2": float("nan")}, ValueError, "l2"),
        ({"l1": float("inf")}, ValueError, "l1"),
        ({"l2": 0.1, "l2_head": -0.1}, ValueError, "l2_head"),
        ({"l2": "0.1"}, TypeError, "l2"),
        ({"l1_mode": "lasso"}, ValueError, "l1_mode"),
        ({"reference": "final"}, ValueError, "reference"),
        ({"reference": 3}, TypeError, "reference"),
        ({"rules": {"exclude": ["x"]}}, TypeError, "rules"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(kwargs: dict[str, Any], error: type[Exception], argument: str) -> None:
    with pytest.raises(error, match=f"`{argument}`"):
        WeightPenalty(**kwargs)


def test_nonfinite_weight_warns_once_naming_parameter_and_training_goes_on(tmp_path: Path) -> None:
    class Poison(Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int) -> None:
            if trainer.global_step == 2:
                with torch.no_grad():
                    pl_module.net[3].weight[0, 0] = float("nan")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = fit(
            Lit(sgd()), [Poison(), WeightPenalty(l2=0.1)], max_epochs=2, logger=CSVLogger(tmp_path), log_every_n_steps=1
        )
    assert trainer.global_step == 2 * N_SAMPLES // BATCH  # not crashed
    mine = [str(w.message) for w in caught if "WeightPenalty" in str(w.message) and "non-finite" in str(w.message)]
    named = [re.search(r"parameter '([^']+)'", m).group(1) for m in mine]  # type: ignore[union-attr]
    # NaN spreads to the other weights through the loss; each parameter is named once, the poisoned one too.
    assert named.count("net.3.weight") == 1, mine
    assert len(named) == len(set(named)), mine


def test_l1_penalty_alongside_adamw_default_weight_decay_is_allowed() -> None:
    l1 = 0.02
    adamw = lambda m: torch.optim.AdamW(m.parameters(), lr=0.01, foreach=False)  # noqa: E731  (weight_decay=0.01)
    got = run(Lit(adamw), [WeightPenalty(l1=l1)])
    want = run(Lit(adamw, extra_loss=explicit_penalty(l1=l1)))
    assert_runs_equal(got, want, exact=False, rtol=1e-5, atol=1e-7)


def test_two_penalties_with_disjoint_rules_and_same_coefficients() -> None:
    l2 = 0.1
    first, last = DecayRules(exclude=["net.3.*"]), DecayRules(exclude=["net.0.*"])
    got = run(Lit(sgd()), [WeightPenalty(l2=l2, rules=first), WeightPenalty(l2=l2, rules=last)])
    want = run(Lit(sgd(), extra_loss=explicit_penalty(l2=l2)))
    assert_runs_equal(got, want, exact=False, rtol=1e-5, atol=1e-7)
