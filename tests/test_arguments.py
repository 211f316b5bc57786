"""docs/arguments.md, row by row: every public argument's accepted values, and the error for the rest.

Each table row of the page is a ``ROWS`` entry below: values the row accepts must build, values it refuses
must raise the documented exception naming the argument. ``test_yaml_*`` builds the callbacks from YAML
through jsonargparse (what ``LightningCLI`` does with a config): strings, ``null`` and lists. The checks
made at fit start run real fits and assert that a refused input left every weight untouched.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from jsonargparse import ArgumentParser
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from lightning_decay import (
    DecayGroupsMixin,
    DecayLightningCLI,
    DecayRules,
    WeightDecay,
    WeightNormMonitor,
    WeightPenalty,
    decay_param_groups,
    unfreeze_and_add_decay_groups,
)
from lightning_decay.schedules import Constant, Cosine, Linear, Warmup
from tests.test_penalty import Lit, adam, fit, sgd, weights

ROOT = Path(__file__).resolve().parents[1]
NAN, INF = float("nan"), float("inf")


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))


class _Mixed(DecayGroupsMixin, nn.Module):
    def __init__(self, rules: Any) -> None:
        super().__init__()
        self.net = _model()
        self.decay_rules = rules


@dataclass
class Row:
    """One row of docs/arguments.md: ``build(value)`` for each good and each bad value."""

    row: str  # the argument column of the page, as written there
    build: Callable[[Any], Any]
    good: list[Any]
    bad: list[tuple[Any, type[Exception]]]
    names: str = ""  # the argument named in the error (a regex); default: the row's first argument


def _argument(row: Row) -> str:
    return row.names or re.search(r"(\w+)=?[,)]", row.row).group(1)  # type: ignore[union-attr]


ROWS = [
    # ------------------------------------------------------------------ coefficients and schedules
    Row(
        "WeightPenalty(l1=, l2=, l2_head=)",
        lambda v: WeightPenalty(l2=v),
        [0.0, 1e-4, 3, np.float32(1e-4), Constant(0.1), Linear(0.1, 0.0, 10), lambda step: 0.1],
        [
            ("1e-4", TypeError),
            (True, TypeError),
            ([0.1], TypeError),
            (None, TypeError),
            (-0.1, ValueError),
            (NAN, ValueError),
            (INF, ValueError),
        ],
        names="l2",
    ),
    Row(
        "WeightPenalty(l1=, l2=, l2_head=)  [l1]",
        lambda v: WeightPenalty(l1=v),
        [1e-3, Cosine(0.1, 0.0, 5)],
        [("0.1", TypeError), (-1, ValueError), (NAN, ValueError)],
        names="l1",
    ),
    Row(
        "WeightPenalty(l1=, l2=, l2_head=)  [l2_head]",
        lambda v: WeightPenalty(l2=0.1, reference="initial", head=["1.*"], l2_head=v),
        [None, 0.0, 1e-4],
        [("0.1", TypeError), (-1e-4, ValueError), (INF, ValueError)],
        names="l2_head",
    ),
    Row(
        "WeightDecay(weight_decay=)",
        lambda v: WeightDecay(v),
        [None, 0.0, 0.05, Linear(0.1, 0.0, 100), lambda step: 0.01],
        [("0.05", TypeError), (False, TypeError), ([0.05], TypeError), (-0.05, ValueError), (NAN, ValueError)],
    ),
    Row(
        "Constant(value)",
        Constant,
        [0.0, 2, 0.5],
        [("0.5", TypeError), (None, TypeError), (-0.5, ValueError), (INF, ValueError)],
        names="value",
    ),
    Row(
        "Linear(start, end, steps)  [end]",
        lambda v: Linear(0.1, v, 10),
        [0.0, 0.2],
        [(-0.1, ValueError), (NAN, ValueError), ("0", TypeError)],
        names="end",
    ),
    Row(
        "Linear(start, end, steps)  [start]",
        lambda v: Cosine(v, 0.0, 10),
        [0.0, 1.0],
        [(-1.0, ValueError), (INF, ValueError), (None, TypeError)],
        names="start",
    ),
    Row(
        "Linear(start, end, steps)  [steps]",
        lambda v: Linear(0.1, 0.0, v),
        [1, 100, np.int64(10)],
        [(0, ValueError), (-3, ValueError), (2.5, TypeError), (True, TypeError), ("10", TypeError)],
        names="steps",
    ),
    Row(
        "Warmup(after, warmup_steps)",
        lambda v: Warmup(v, 5),
        [0.1, Linear(0.1, 0.0, 10)],
        [(-0.1, ValueError), ("0.1", TypeError)],
        names="after",
    ),
    Row(
        "Warmup(after, warmup_steps)  [warmup_steps]",
        lambda v: Warmup(0.1, v),
        [1, 10],
        [(0, ValueError), (1.5, TypeError), (None, TypeError)],
        names="warmup_steps",
    ),
    # --------------------------------------------------------------------------- callback options
    Row(
        "WeightPenalty(l1_mode=)",
        lambda v: WeightPenalty(l1=0.1, l1_mode=v),
        ["subgradient", "proximal"],
        [("lasso", ValueError), (None, ValueError), (1, ValueError)],
    ),
    Row(
        "WeightPenalty(reference=)",
        lambda v: WeightPenalty(l2=0.1, reference=v),
        [None, "initial", {"0.weight": torch.zeros(4, 4)}, _model()],
        [
            ("final", ValueError),
            (3, TypeError),
            ([torch.zeros(4)], TypeError),
            ({"0.weight": [[0.0] * 4] * 4}, TypeError),
            ({"0.weight": np.zeros((4, 4))}, TypeError),
            ({0: torch.zeros(4, 4)}, TypeError),
        ],
    ),
    Row(
        "WeightPenalty(head=)",
        lambda v: WeightPenalty(l2=0.1, head=v),
        [[], ["head.*"], "head.*", ("a.*", "b.*")],
        [(None, TypeError), (3, TypeError), ([""], TypeError), ({"head": 1}, TypeError)],
    ),
    Row(
        "WeightPenalty(name=), WeightDecay(name=)",
        lambda v: WeightPenalty(l2=0.1, name=v),
        [None, "backbone"],
        [("", ValueError), (1, TypeError), (["a"], TypeError)],
        names="name",
    ),
    Row(
        "WeightPenalty(name=), WeightDecay(name=)  [WeightDecay]",
        lambda v: WeightDecay(0.1, name=v),
        [None, "decay"],
        [("", ValueError), (0.1, TypeError)],
        names="name",
    ),
    Row(
        "WeightPenalty(missing_state=), WeightDecay(missing_state=)",
        lambda v: WeightPenalty(l2=0.1, missing_state=v),
        ["raise", "restart"],
        [("ignore", ValueError), (None, ValueError), (True, ValueError)],
        names="missing_state",
    ),
    Row(
        "WeightPenalty(missing_state=), WeightDecay(missing_state=)  [WeightDecay]",
        lambda v: WeightDecay(0.1, missing_state=v),
        ["raise", "restart"],
        [("Raise", ValueError)],
        names="missing_state",
    ),
    Row(
        "WeightDecay(cautious=)",
        lambda v: WeightDecay(0.1, cautious=v),
        [True, False],
        [("true", TypeError), (1, TypeError), (None, TypeError)],
    ),
    Row(
        "WeightPenalty(log_penalty=)",
        lambda v: WeightPenalty(l2=0.1, log_penalty=v),
        [True, False],
        [("false", TypeError), ("no", TypeError), (0, TypeError), (None, TypeError)],
    ),
    Row(
        "WeightPenalty(...) positional",
        lambda v: WeightPenalty(v),
        [],
        [(1e-4, TypeError)],
        names="positional",
    ),
    Row(
        "WeightDecay(mode=)",
        lambda v: WeightDecay(0.05, mode=v),
        ["lr", "lr_ratio", "constant"],
        [("cosine", ValueError), (None, ValueError)],
    ),
    Row(
        "WeightDecay(mode=)  [constant weight_decay >= 1]",
        lambda v: WeightDecay(v, mode="constant"),
        [0.5, 0.999, Linear(2.0, 0.0, 10)],  # a schedule is checked at each step instead
        [(1.0, ValueError), (5.0, ValueError)],
        names="weight_decay",
    ),
    Row(
        "schedule(step)",
        lambda v: fit(Lit(sgd()), [WeightDecay(lambda step: v)]),
        [0.1, 0.0],
        [(-0.1, ValueError), (NAN, ValueError), ("0.1", TypeError)],
        names="weight_decay",
    ),
    Row(
        "rules= (all callbacks)",
        lambda v: (WeightPenalty(l2=0.1, rules=v), WeightDecay(0.1, rules=v), WeightNormMonitor(rules=v)),
        [None, DecayRules(), DecayRules(exclude=["x.*"])],
        [("DecayRules()", TypeError), ({"exclude": ["x"]}, TypeError), (["x.*"], TypeError)],
        names="rules",
    ),
    Row(
        "decay_param_groups(rules=)",
        lambda v: decay_param_groups(_model(), rules=v),
        [None, DecayRules(decay_norm=True)],
        [("default", TypeError), ({}, TypeError)],
    ),
    Row(
        "DecayLightningCLI(decay_rules=)",
        lambda v: DecayLightningCLI.__init__(object.__new__(DecayLightningCLI), decay_rules=v, run=False, args=[]),
        [],
        [("DecayRules", TypeError), (["x"], TypeError)],
    ),
    Row(
        "DecayGroupsMixin.decay_rules",
        lambda v: _Mixed(v).decay_param_groups(),
        [None, DecayRules()],
        [("DecayRules()", TypeError)],
        names="decay_rules",
    ),
    Row(
        "WeightNormMonitor(norm_type=)",
        lambda v: WeightNormMonitor(norm_type=v),
        [1, 2, 2.0, INF, "inf", "INF"],
        [(3, ValueError), ("2", ValueError), (True, ValueError), (None, ValueError)],
    ),
    Row(
        "WeightNormMonitor(granularity=)",
        lambda v: WeightNormMonitor(granularity=v),
        ["param", "module"],
        [("layer", ValueError), (None, ValueError)],
    ),
    Row(
        "WeightNormMonitor(blocks=)",
        lambda v: WeightNormMonitor(blocks=v),
        [None, {"first": r"^0\."}, {"first": re.compile(r"^0\.")}],
        [
            (["a"], ValueError),
            ({}, ValueError),
            ({"total": "a"}, ValueError),
            ({"a": "("}, ValueError),
            ({"": "a"}, ValueError),
        ],
    ),
    Row(
        "WeightNormMonitor(logging_interval=)",
        lambda v: WeightNormMonitor(logging_interval=v),
        [None, 1, 50],
        [(0, ValueError), (2.5, ValueError), ("10", ValueError), (True, ValueError)],
    ),
    Row(
        "WeightNormMonitor(log_grad_norm=, log_update_ratio=, log_angular_update=, log_sparsity=, log_histograms=, "
        "include_frozen=)",
        lambda v: [
            WeightNormMonitor(**{flag: v})
            for flag in (
                "log_grad_norm",
                "log_update_ratio",
                "log_angular_update",
                "log_sparsity",
                "log_histograms",
                "include_frozen",
            )
        ],
        [True, False],
        [("yes", TypeError), (1, TypeError), (None, TypeError)],
    ),
    Row(
        "WeightNormMonitor(group_separator=)",
        lambda v: WeightNormMonitor(group_separator=v),
        ["/", "."],
        [("", ValueError), (None, ValueError), (1, ValueError)],
    ),
    Row(
        "WeightNormMonitor(log_equilibrium=, keep_snapshot=)",
        lambda v: [WeightNormMonitor(**{flag: v}) for flag in ("log_equilibrium", "keep_snapshot")],
        [True, False],
        [("yes", TypeError), (1, TypeError), (None, TypeError)],
    ),
    Row(
        "WeightNormMonitor(decay_report=)",
        lambda v: WeightNormMonitor(log_equilibrium=v is not False, decay_report=v),
        [None, True, False],
        [("yes", TypeError), (1, TypeError)],
    ),
    Row(
        "WeightNormMonitor(decay_report=)  [without log_equilibrium]",
        lambda v: WeightNormMonitor(decay_report=v),
        [None, False],
        [(True, ValueError)],
        names="decay_report",
    ),
    # ------------------------------------------------------------------------ decay rules and plans
    Row(
        "DecayRules(exclude=, include=)",
        lambda v: (DecayRules(exclude=v), DecayRules(include=v)),
        [[], ["*.bias"], "*.bias", ("a", "b")],
        [(None, TypeError), (3, TypeError), ([""], TypeError), ([1], TypeError), ({"a": 1}, TypeError)],
        names="exclude",
    ),
    Row(
        "DecayRules(exclude_modules=)",
        lambda v: DecayRules(exclude_modules=v),
        [[], [nn.LayerNorm], nn.LayerNorm, (nn.LayerNorm, nn.Embedding)],
        [
            (None, TypeError),
            ("LayerNorm", TypeError),
            (["torch.nn.LayerNorm"], TypeError),
            ([nn.LayerNorm(2)], TypeError),
            ([int], TypeError),
        ],
    ),
    Row(
        "DecayRules(predicate=)",
        lambda v: DecayRules(predicate=v),
        [None, lambda name, param, module: None],
        [("bias", TypeError), (True, TypeError)],
    ),
    Row(
        "DecayRules(decay_bias=, decay_norm=, decay_embeddings=, decay_vectors=, use_model_hooks=)",
        lambda v: [
            DecayRules(**{flag: v})
            for flag in ("decay_bias", "decay_norm", "decay_embeddings", "decay_vectors", "use_model_hooks")
        ],
        [True, False],
        [("false", TypeError), (0, TypeError), (None, TypeError)],
    ),
    Row(
        "DecayRules(decay_position_bias=)",
        lambda v: DecayRules(decay_position_bias=v),
        [True, False],
        [("false", TypeError), (0, TypeError), (None, TypeError)],
    ),
    Row(
        "DecayRules(**other)",
        lambda v: DecayRules(**{v: True}),
        [],
        [("exclude_bias", ValueError), ("decay_biases", ValueError)],
        names="exclude_bias|decay_biases",
    ),
    Row(
        "DecayRules.classify(module, include_frozen=)",
        lambda v: DecayRules().classify(_model(), include_frozen=v),
        [True, False],
        [("yes", TypeError), (None, TypeError)],
        names="include_frozen",
    ),
    Row(
        "DecayRules.classify(module, include_frozen=)  [module]",
        lambda v: DecayRules().classify(v),
        [_model()],
        [("model", TypeError), (nn.ReLU(), ValueError), (_model().requires_grad_(False), ValueError)],
        names="module|no (trainable )?parameters",
    ),
    Row(
        "plan[name], plan.explain(name)",
        lambda v: DecayRules().classify(nn.Sequential(_model())).explain(v),
        ["0.0.weight", "0.1.bias"],
        [("0.weight", KeyError), ("0.0.wieght", KeyError)],
        names=r"did you mean '0\.0\.weight'",
    ),
    Row(
        "param_groups(weight_decay=), decay_param_groups(weight_decay=)",
        lambda v: decay_param_groups(_model(), weight_decay=v),
        [None, 0.0, 0.05],
        [("0.05", TypeError), (True, TypeError), (-1.0, ValueError), (NAN, ValueError)],
    ),
    Row(
        "WeightDecay(timescale_epochs=)",
        lambda v: WeightDecay(timescale_epochs=v),
        [None, 10, 0.5, np.float32(3.0)],
        [
            ("10", TypeError),
            (True, TypeError),
            (0, ValueError),
            (-1.0, ValueError),
            (NAN, ValueError),
            (INF, ValueError),
        ],
    ),
    Row(
        "WeightDecay(timescale_epochs=)  [with weight_decay or mode]",
        lambda v: WeightDecay(**v, timescale_epochs=10),
        [{}, {"mode": "lr"}],
        [({"weight_decay": 0.1}, ValueError), ({"mode": "constant"}, ValueError)],
        names="timescale_epochs",
    ),
    Row(
        "param_groups(**group_kwargs), decay_param_groups(**group_kwargs), override options",
        lambda v: decay_param_groups(_model(), **v),
        [{"lr": 0.1}, {"betas": (0.9, 0.99)}, {"overrides": {"1.*": {"lr": 0.1}}}],
        [
            ({"params": []}, ValueError),
            ({"exclude": ["1.*"]}, ValueError),
            ({"no_weight_decay_list": ["1.*"]}, ValueError),
            ({"custom_keys": {}}, ValueError),
            ({"overrides": {"1.*": {"rules": None}}}, ValueError),
            ({"layer_decay": 0.5, "lr_scale": 2.0}, ValueError),
        ],
        names="params|exclude|no_weight_decay_list|custom_keys|rules|lr_scale",
    ),
    Row(
        "layer_decay=",
        lambda v: decay_param_groups(_model(), layer_decay=v),
        [None, 0.5, 1, np.float32(0.75)],
        [("0.5", TypeError), (True, TypeError), (0, ValueError), (1.5, ValueError), (NAN, ValueError)],
        names="layer_decay",
    ),
    Row(
        "layer_decay=  [no layer]",
        lambda v: decay_param_groups(nn.ModuleDict({"a": nn.Linear(2, 2)}), layer_decay=v),
        [None],
        [(0.5, ValueError)],
        names="no layer for 'a.weight'",
    ),
    Row(
        "layer_of=",
        lambda v: decay_param_groups(_model(), layer_decay=0.5, layer_of=v),
        [None, {"1.*": -1}, lambda name: None, lambda name: 0],
        [
            ("1.*", TypeError),
            ({"1.*": "top"}, TypeError),
            ({"1.*": 1.0}, TypeError),
            (lambda name: "top", TypeError),
            ({"1.*": -5}, ValueError),
        ],
        names="layer_of",
    ),
    Row(
        "layer_of=  [without layer_decay]",
        lambda v: decay_param_groups(_model(), layer_of=v),
        [None],
        [({"1.*": 0}, ValueError)],
        names="layer_of",
    ),
    Row(
        "param_groups(overrides=)",
        lambda v: decay_param_groups(_model(), overrides=v),
        [None, {"1.*": {"lr": 0.1}}],
        [
            (["1.*"], TypeError),
            ({"1.*": 0.1}, TypeError),
            ({"1.*": {"params": []}}, ValueError),
            ({"1.*": {"weight_decay": -1}}, ValueError),
        ],
    ),
    Row(
        "unfreeze_and_add_decay_groups(model=)",
        lambda v: _unfreeze_first_layer(v),
        [None, "whole"],
        [("net", TypeError), ({"0.weight": 1}, TypeError)],
    ),
]


def _unfreeze_first_layer(model: Any) -> list[dict[str, Any]]:
    """The first Linear of a model frozen, then unfrozen into groups; ``"whole"``: ``model=`` the model."""
    net = _model()
    net[0].requires_grad_(False)
    optimizer = torch.optim.SGD(decay_param_groups(net[1:]), lr=0.1)
    return unfreeze_and_add_decay_groups(net[0], optimizer, model=net if model == "whole" else model)


def _cases(kind: str) -> list[Any]:
    out = []
    for row in ROWS:
        values = row.good if kind == "good" else row.bad
        for i, value in enumerate(values):
            out.append(pytest.param(row, value, id=f"{row.row} #{i}"))
    return out


@pytest.mark.parametrize(("row", "value"), _cases("good"))
def test_accepted_values_build(row: Row, value: Any) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no-op warnings have their own test
        row.build(value)


@pytest.mark.parametrize(("row", "bad"), _cases("bad"))
def test_refused_values_raise_naming_the_argument(row: Row, bad: tuple[Any, type[Exception]]) -> None:
    value, error = bad
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(error) as info:
            row.build(value)
    assert info.type is error  # exactly the documented type, not a subclass from deep inside
    assert re.search(_argument(row), str(info.value)), str(info.value)


def test_every_row_of_the_page_is_tested() -> None:
    """Each row of the argument tables (up to the fit-start section, tested below) has its ``Row``."""
    page = (ROOT / "docs" / "arguments.md").read_text().split("## Checked when training starts")[0]
    documented = [m.group(1) for m in re.finditer(r"^\| `([^`]+)`", page, flags=re.M)]
    assert len(documented) >= 25
    missing = [d for d in documented if not any(row.row.startswith(d) for row in ROWS)]
    assert not missing, missing


# ------------------------------------------------------------------------------------------ warnings
@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: WeightPenalty(), "all 0"),
        (lambda: WeightPenalty(l1=0.0, l2=Constant(0.0)), "all 0"),
        (lambda: WeightPenalty(l2=0.1, l2_head=0.01), "`l2_head` is ignored"),
        (lambda: WeightPenalty(l2=0.1, reference="initial", l2_head=0.01), "`l2_head` never applies"),
        (lambda: WeightPenalty(l2=0.1, l1_mode="proximal"), "`l1_mode='proximal'` does nothing"),
    ],
    ids=["no-args", "all-zero", "l2_head-alone", "l2_head-initial-no-head", "proximal-l1-0"],
)
def test_no_op_arguments_warn_naming_them(build: Callable[[], Any], match: str) -> None:
    with pytest.warns(UserWarning, match=re.escape(match)):
        build()


@pytest.mark.parametrize(
    "build",
    [
        lambda: WeightPenalty(l2=0.1),
        lambda: WeightPenalty(l2=0.1, head=["net.3.*"], l2_head=0.01),
        lambda: WeightPenalty(l2=0.1, reference="initial", head="net.3.*", l2_head=0.01),
        lambda: WeightPenalty(l1=0.1, l1_mode="proximal"),
    ],
)
def test_arguments_that_act_do_not_warn(build: Callable[[], Any]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build()


def test_patterns_matching_nothing_warn_once_at_fit(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import CSVLogger

    penalty = WeightPenalty(l2=0.1, head=["head.*"])
    monitor = WeightNormMonitor(blocks={"first": r"^net\.0\.", "missing": r"^backbone\."})
    with pytest.warns(UserWarning) as caught:
        fit(Lit(sgd()), [penalty, monitor], max_epochs=2, logger=CSVLogger(tmp_path), log_every_n_steps=1)
    messages = [str(w.message) for w in caught]
    head = [m for m in messages if "`head` pattern 'head.*'" in m]
    blocks = [m for m in messages if "`blocks['missing']`" in m]
    assert len(head) == 1 and "net.3.weight" in head[0], messages  # once, with the closest names
    assert len(blocks) == 1 and "net.0.weight" in blocks[0], messages
    assert not [m for m in messages if "`blocks['first']`" in m]


# -------------------------------------------------------------------- fit start: references, factors
def _refused_at_fit_start(module: Lit, callback: Callback, error: type[Exception], match: str) -> None:
    before = weights(module)
    with pytest.raises(error, match=match):
        fit(module, [callback])
    for name, w in weights(module).items():
        assert torch.equal(w, before[name]), f"{name} changed before the refusal"
    assert module.trainer.global_step == 0


def _shape(name: str) -> tuple[int, ...]:
    return tuple(dict(Lit(adam()).named_parameters())[name].shape)


@pytest.mark.parametrize(
    ("reference", "error", "match"),
    [
        ({"net.0.weight": torch.full(_shape("net.0.weight"), NAN)}, ValueError, r"reference\['net.0.weight'\].*NaN"),
        ({"net.0.weight": torch.full(_shape("net.0.weight"), INF)}, ValueError, r"non-finite"),
        ({"net.0.weight": torch.zeros(3, 3)}, ValueError, r"reference\['net.0.weight'\]` has shape \(3, 3\)"),
        ({"net.0.weight": torch.zeros(_shape("net.0.weight"), dtype=torch.int64)}, TypeError, r"floating dtype"),
        ({"net.0.weight": torch.zeros(_shape("net.0.weight"), dtype=torch.bool)}, TypeError, r"floating dtype"),
        ({"0.weight": torch.zeros(_shape("net.0.weight"))}, ValueError, r"names none.*did you mean 'net.0.weight'"),
        ({"nope": torch.zeros(2)}, ValueError, r"names none"),
    ],
    ids=["nan", "inf", "shape", "int64", "bool", "missing-prefix", "unknown"],
)
def test_bad_references_are_refused_at_fit_start_before_any_weight_changes(
    reference: dict[str, torch.Tensor], error: type[Exception], match: str
) -> None:
    _refused_at_fit_start(Lit(adam()), WeightPenalty(l2=0.1, reference=reference), error, match)


def test_bad_reference_module_is_refused_at_fit_start() -> None:
    pretrained = Lit(adam(), seed=3)
    with torch.no_grad():
        pretrained.net[3].weight[0, 0] = NAN
    _refused_at_fit_start(Lit(adam()), WeightPenalty(l2=0.1, reference=pretrained), ValueError, r"net.3.weight.*NaN")


def test_partly_unknown_reference_names_warn_with_the_closest_names() -> None:
    module = Lit(adam())
    good = module.net[0].weight.detach().clone()
    reference = {"net.0.weight": good, "net.3.wieght": torch.zeros(2, 8), "fc.weight": torch.zeros(2, 8)}
    with pytest.warns(UserWarning, match=r"2 `reference` name\(s\).*'net.3.wieght' \(closest: 'net.3.weight'"):
        fit(module, [WeightPenalty(l2=0.1, reference=reference, l2_head=0.0)])


class WithModuleAttribute(Lit):
    """A user's attribute called ``module`` holding a BatchNorm (buffers): not a wrapper, its names keep it."""

    def __init__(self, optimizer: Callable[[Lit], Any]) -> None:
        super().__init__(optimizer)
        self.module = nn.BatchNorm1d(2)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.module(self.net(x)), y)


def test_reference_buffer_names_are_the_module_trees() -> None:
    """A whole ``state_dict`` as the reference: its buffers ``module.running_mean``... are the model's (by the
    module tree, not stripped by spelling into ``running_mean``), so only the misspelt name is reported."""
    module = WithModuleAttribute(adam())
    reference = {k: v.clone() for k, v in module.state_dict().items()}
    reference["net.3.wieght"] = torch.zeros(2, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(module, [WeightPenalty(l2=0.1, reference=reference)])
    reports = [str(w.message) for w in caught if "`reference` name(s)" in str(w.message)]
    assert len(reports) == 1 and reports[0].startswith("WeightPenalty: 1 `reference` name(s)"), reports
    assert "'net.3.wieght'" in reports[0] and "running_mean" not in reports[0]


FACTOR_ERROR = r"at step (\d+):.*? with lr ([0-9.e-]+).*?weight_decay ([0-9.e-]+)"


def _with_scheduler(factor: Callable[[int], float], lr: float) -> Callable[[Lit], Any]:
    def make(m: Lit) -> Any:
        opt = torch.optim.SGD(m.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return make


@pytest.mark.parametrize(
    ("optimizer", "callback", "step", "lr", "coefficient"),
    [
        (sgd(lr=0.1), lambda: WeightDecay(20.0), 0, 0.1, 20.0),  # lr * wd = 2
        (sgd(lr=0.1), lambda: WeightDecay(10.0), 0, 0.1, 10.0),  # exactly 1: every weight would be zeroed
        (sgd(lr=0.1), lambda: WeightDecay(lambda s: 0.5 if s < 2 else 50.0), 2, 0.1, 50.0),  # a schedule, later
        (_with_scheduler(lambda s: 1.0 + s, 0.1), lambda: WeightDecay(0.4, mode="lr_ratio"), 2, 0.3, 0.4),
        (lambda m: torch.optim.AdamW(m.parameters(), lr=0.5, weight_decay=4.0), lambda: WeightDecay(), 0, 0.5, 4.0),
    ],
    ids=["lr-mode", "factor-zero", "schedule-at-step-2", "lr_ratio-above-start", "take-over"],
)
def test_impossible_decay_factors_are_refused_naming_step_lr_and_coefficient(
    optimizer: Any, callback: Callable[[], WeightDecay], step: int, lr: float, coefficient: float
) -> None:
    module = Lit(optimizer)
    cb = callback()
    snapshots: list[dict[str, torch.Tensor]] = []

    class Before(Callback):
        def on_train_batch_start(self, trainer: Any, pl_module: Any, *args: Any) -> None:
            snapshots.append(weights(pl_module))

    with pytest.raises(ValueError, match=FACTOR_ERROR) as info:
        fit(module, [cb, Before()])
    got_step, got_lr, got_coeff = re.search(FACTOR_ERROR, str(info.value)).groups()  # type: ignore[union-attr]
    assert int(got_step) == step
    assert math.isclose(float(got_lr), lr) and math.isclose(float(got_coeff), coefficient)
    # Refused before the multiplication: the weights are those the step started with, signs unflipped.
    for name, w in weights(module).items():
        assert torch.equal(w, snapshots[-1][name]), name


def test_lr_ratio_with_initial_lr_zero_is_refused() -> None:
    module = Lit(lambda m: torch.optim.SGD(m.parameters(), lr=0.0))
    with pytest.raises(ValueError, match=r"mode='lr_ratio'.*initial lr 0"):
        fit(module, [WeightDecay(0.1, mode="lr_ratio")])


# ------------------------------------------------------------------------------------------- YAML
def _from_yaml(yaml: str) -> Any:
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--cb", type=Callback)
    return parser.instantiate(parser.parse_string(yaml)).cb


def _cb(class_path: str, init_args: str) -> str:
    return f"cb: {{class_path: lightning_decay.{class_path}, init_args: {{{init_args}}}}}"


RULES = "rules: {{class_path: lightning_decay.DecayRules, init_args: {{{}}}}}"


@pytest.mark.parametrize(
    ("yaml", "check"),
    [
        (_cb("WeightPenalty", "l2: 1e-4"), lambda cb: cb._l2.value == 1e-4),
        (_cb("WeightPenalty", "l2: '1e-4'"), lambda cb: cb._l2.value == 1e-4),  # jsonargparse converts
        (_cb("WeightPenalty", "l2: 0.1, log_penalty: 'no'"), lambda cb: cb.log_penalty is False),
        (_cb("WeightPenalty", "l2: 0.1, head: head.*"), lambda cb: cb.head == ("head.*",)),
        (_cb("WeightPenalty", "l2: 0.1, head: [head.*, fc.*]"), lambda cb: cb.head == ("head.*", "fc.*")),
        (_cb("WeightPenalty", "l2: 0.1, reference: initial"), lambda cb: cb._reference == "initial"),
        (_cb("WeightPenalty", "l2: 0.1, reference: null"), lambda cb: cb._reference is None),
        (
            _cb(
                "WeightPenalty",
                "l2: {class_path: lightning_decay.schedules.Warmup, init_args: {after: 0.1, warmup_steps: 10}}",
            ),
            lambda cb: isinstance(cb._l2, Warmup),
        ),
        (_cb("WeightDecay", "weight_decay: null"), lambda cb: cb.takes_over),
        (_cb("WeightDecay", "weight_decay: 0.05, mode: lr_ratio"), lambda cb: cb.mode == "lr_ratio"),
        (
            _cb("WeightDecay", "name: backbone, missing_state: restart"),
            lambda cb: cb.state_key == "WeightDecay{'name': 'backbone'}" and cb.missing_state == "restart",
        ),
        (
            _cb("WeightDecay", "weight_decay: 0.05, " + RULES.format("exclude_modules: [torch.nn.LayerNorm]")),
            lambda cb: cb.rules.exclude_modules == (nn.LayerNorm,),
        ),
        (
            _cb("WeightDecay", "weight_decay: 0.05, " + RULES.format("exclude: '*.bias'")),
            lambda cb: cb.rules.exclude == ("*.bias",),
        ),
        (_cb("WeightNormMonitor", "norm_type: inf"), lambda cb: cb.norm_type == INF),
        (_cb("WeightNormMonitor", "log_sparsity: 'yes'"), lambda cb: cb.log_sparsity is True),
        (_cb("WeightNormMonitor", "blocks: {first: '^net\\.0\\.'}"), lambda cb: list(cb.blocks) == ["first"]),
    ],
)
def test_yaml_values_that_are_accepted(yaml: str, check: Callable[[Any], bool]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert check(_from_yaml(yaml))


@pytest.mark.parametrize(
    ("yaml", "argument"),
    [
        (_cb("WeightPenalty", "l2: -1"), "l2"),
        (_cb("WeightPenalty", "l2: .nan"), "l2"),
        (_cb("WeightPenalty", "l2: [0.1]"), "l2"),
        (_cb("WeightPenalty", "l2: null"), "l2"),
        (_cb("WeightPenalty", "l2: abc"), "l2"),
        (
            _cb(
                "WeightPenalty",
                "l2: {class_path: lightning_decay.schedules.Linear, init_args: {start: 0.1, end: -0.1, steps: 10}}",
            ),
            "end",
        ),
        (
            _cb(
                "WeightPenalty",
                "l2: {class_path: lightning_decay.schedules.Linear, init_args: {start: 0.1, end: 0, steps: 10.5}}",
            ),
            "l2",
        ),
        (_cb("WeightPenalty", "l2: 0.1, l1_mode: lasso"), "l1_mode"),
        (_cb("WeightPenalty", "l2: 0.1, log_penalty: nope"), "log_penalty"),
        (_cb("WeightPenalty", "l2: 0.1, log_penalty: null"), "log_penalty"),
        (_cb("WeightPenalty", "l2: 0.1, head: null"), "head"),
        (_cb("WeightPenalty", "l2: 0.1, reference: final"), "reference"),
        (_cb("WeightPenalty", "l2: 0.1, reference: {net.0.weight: [1.0, 2.0]}"), "reference"),
        (_cb("WeightPenalty", "l2: 0.1, rules: x"), "rules"),
        (_cb("WeightPenalty", "l2: 0.1, rules: [x]"), "rules"),
        (_cb("WeightPenalty", "l2: 0.1, " + RULES.format("exclude: null")), "exclude"),
        (_cb("WeightPenalty", "l2: 0.1, " + RULES.format("exclude_modules: LayerNorm")), "exclude_modules"),
        (_cb("WeightPenalty", "l2: 0.1, " + RULES.format("decay_bias: maybe")), "decay_bias"),
        (_cb("WeightPenalty", "l2: 0.1, " + RULES.format("exclude_bias: true")), "exclude_bias"),
        (_cb("WeightDecay", "weight_decay: 2.0, mode: constant"), "weight_decay"),
        (_cb("WeightPenalty", "l2: 0.1, missing_state: ignore"), "missing_state"),
        (_cb("WeightDecay", "weight_decay: 0.1, mode: cosine"), "mode"),
        (_cb("WeightNormMonitor", "norm_type: 3"), "norm_type"),
        (_cb("WeightNormMonitor", "logging_interval: 2.5"), "logging_interval"),
        (_cb("WeightNormMonitor", "logging_interval: 0"), "logging_interval"),
        (_cb("WeightNormMonitor", "blocks: [a]"), "blocks"),
        (_cb("WeightNormMonitor", "blocks: {a: '('}"), "blocks"),
        (_cb("WeightNormMonitor", "log_sparsity: null"), "log_sparsity"),
        (_cb("WeightNormMonitor", "granularity: layer"), "granularity"),
    ],
)
def test_yaml_values_that_are_refused_name_the_argument(yaml: str, argument: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(Exception) as info:  # jsonargparse's ArgumentError, or ours
            _from_yaml(yaml)
    message = str(info.value)
    # Named by jsonargparse (`Parser key "x"`) or by the library (`x` in backticks), never a bare traceback.
    assert f'"{argument}"' in message or f"`{argument}" in message or f"'{argument}'" in message, message
