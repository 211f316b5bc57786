"""``DecayPlan``: lookups, rendering, optimizer parameter groups, overrides, and a real AdamW step."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

from lightning_decay import DecayPlan, DecayRules, decay_param_groups
from tests.models import make_cnn, make_frozen_backbone, make_gpt, make_llama, make_vit


def _ids(params) -> list[int]:
    return [id(p) for p in params]


# ------------------------------------------------------------------------------------- lookups
def test_lookups_and_partition() -> None:
    model = make_gpt()
    plan = DecayRules().classify(model)
    assert len(plan) == len(list(model.parameters()))
    assert sorted(plan.decay_names + plan.no_decay_names) == sorted(n for n, _ in model.named_parameters())
    assert _ids(plan.decay_params) == _ids(d.param for d in plan.decay)
    assert model.wte.weight in plan and model.lm_head.weight in plan
    assert nn.Parameter(torch.zeros(1)) not in plan
    assert plan.decision_for(model.ln_f.weight) is plan["ln_f.weight"]
    assert plan.decision_for(torch.zeros(1)) is None
    assert plan.is_decayed(model.h[0].attn.c_attn.weight)
    assert not plan.is_decayed(model.ln_f.bias)
    assert not plan.is_decayed(torch.zeros(1))
    assert plan["lm_head.weight"] is plan["wte.weight"]
    with pytest.raises(KeyError, match="nope"):
        plan["nope"]
    d = plan["h.0.mlp.c_fc.weight"]
    assert d.numel == 64 * 16 == d.param.numel() and d.group == "decay"
    assert plan["ln_f.bias"].group == "no_decay"


def test_scalar_numel_is_one() -> None:
    d = DecayRules().classify(make_llama())["logit_scale"]
    assert d.shape == () and d.numel == 1


def test_str_table() -> None:
    plan = DecayRules().classify(make_cnn())
    text = str(plan)
    lines = text.splitlines()
    assert lines[0].split() == ["name", "shape", "numel", "group", "reason"]
    for d in plan:
        line = next(line for line in lines if line.split()[0] == d.name)
        assert "x".join(map(str, d.shape)) in line
        assert f"{d.numel:,}" in line
        assert d.group in line and d.reason in line
    assert "1,152" in text  # conv2.weight, thousands separator
    assert lines[-1] == plan.summary()
    assert plan.table() == text


def test_str_scalar_and_alias() -> None:
    text = str(DecayRules().classify(make_llama()))
    assert any(line.startswith("logit_scale") and "scalar" in line for line in text.splitlines())
    text = str(DecayRules(decay_embeddings=False).classify(make_gpt()))
    assert "wte.weight (= lm_head.weight)" in text
    assert "tied, no_decay wins" in text


def test_summary_and_repr() -> None:
    plan = DecayRules().classify(make_cnn())
    dn = sum(d.param.numel() for d in plan.decay)
    assert dn == 216 + 1152 + 160
    assert plan.summary() == "DecayPlan: decay 3 tensors (1.5K params), no_decay 6 tensors (66 params)"
    assert repr(plan) == f"<{plan.summary()}>"
    frozen = DecayRules().classify(make_frozen_backbone())
    assert frozen.summary().endswith(f", {len(frozen.frozen)} frozen skipped")
    assert "frozen" not in plan.summary()


def test_explain() -> None:
    plan = DecayRules().classify(make_vit())
    assert plan.explain("pos_embed") == "pos_embed: no_decay (no_weight_decay() 'pos_embed')"
    assert plan.explain("head.weight") == "head.weight: decay (weight of Linear)"
    assert plan.explain("norm.bias") == "norm.bias: no_decay (bias)"
    with pytest.raises(KeyError):
        plan.explain("missing.weight")


def test_plan_is_pure_data() -> None:
    model = make_cnn()
    plan = DecayPlan([], ())
    assert len(plan) == 0 and plan.decay_names == [] and list(plan) == []
    plan = DecayRules().classify(model)
    assert plan["head.weight"].param is model.head.weight  # a reference, not a copy


# -------------------------------------------------------------------------------------- groups
def test_groups_named_with_explicit_zero() -> None:
    model = make_cnn()
    plan = DecayRules().classify(model)
    groups = plan.param_groups(weight_decay=0.05, lr=1e-3)
    assert [g["name"] for g in groups] == ["decay", "no_decay"]
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    assert all(g["lr"] == 1e-3 for g in groups)
    assert _ids(groups[0]["params"]) == _ids(plan.decay_params)
    assert _ids(groups[1]["params"]) == _ids(plan.no_decay_params)


def test_every_trainable_param_in_exactly_one_group() -> None:
    for model in (make_cnn(), make_gpt(), make_llama(), make_vit(), make_frozen_backbone()):
        groups = decay_param_groups(
            model, weight_decay=0.1, overrides={"h.0.*": {"lr": 0.5}} if hasattr(model, "h") else None
        )
        ids = [id(p) for g in groups for p in g["params"]]
        assert len(ids) == len(set(ids))
        assert set(ids) == {id(p) for p in model.parameters() if p.requires_grad}
        assert all(g["params"] for g in groups)


def test_weight_decay_none_keeps_optimizer_default() -> None:
    groups = decay_param_groups(make_cnn(), weight_decay=None)
    assert "weight_decay" not in groups[0] and groups[1]["weight_decay"] == 0.0
    assert decay_param_groups(make_cnn())[0].keys() == groups[0].keys()  # None is the default
    opt = torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.07)
    by_name = {g["name"]: g for g in opt.param_groups}
    assert by_name["decay"]["weight_decay"] == 0.07
    assert by_name["no_decay"]["weight_decay"] == 0.0


def test_weight_decay_zero_is_explicit() -> None:
    groups = decay_param_groups(make_cnn(), weight_decay=0)
    opt = torch.optim.AdamW(groups, weight_decay=0.07)
    assert opt.param_groups[0]["weight_decay"] == 0


def test_only_no_decay_params_gives_one_group() -> None:
    model = nn.Sequential(nn.LayerNorm(4), nn.BatchNorm1d(4))
    groups = decay_param_groups(model, weight_decay=0.1)
    assert [g["name"] for g in groups] == ["no_decay"]
    assert groups[0]["weight_decay"] == 0.0 and len(groups[0]["params"]) == 4
    torch.optim.AdamW(groups)
    only_decay = decay_param_groups(nn.Linear(3, 3, bias=False), weight_decay=0.1)
    assert [g["name"] for g in only_decay] == ["decay"]


@pytest.mark.parametrize("bad", [-0.1, -1, math.nan, math.inf, -math.inf])
def test_bad_weight_decay_raises(bad) -> None:
    plan = DecayRules().classify(make_cnn())
    with pytest.raises(ValueError, match="weight_decay"):
        plan.param_groups(weight_decay=bad)
    with pytest.raises(ValueError, match="weight_decay"):
        decay_param_groups(make_cnn(), weight_decay=bad)
    with pytest.raises(ValueError, match=r"overrides\['head\.\*'\]\['weight_decay'\]"):
        plan.param_groups(0.1, overrides={"head.*": {"weight_decay": bad}})


@pytest.mark.parametrize("bad", ["0.1", True, torch.tensor(0.1)])
def test_weight_decay_wrong_type_raises(bad) -> None:
    with pytest.raises(TypeError, match="weight_decay"):
        DecayRules().classify(make_cnn()).param_groups(weight_decay=bad)


def test_overrides_extra_named_groups() -> None:
    model = make_cnn()
    groups = decay_param_groups(model, 0.05, overrides={"head.*": {"lr": 1e-2, "betas": (0.8, 0.9)}}, lr=1e-3)
    by_name = {g["name"]: g for g in groups}
    assert list(by_name) == ["decay", "no_decay", "head.*/decay", "head.*/no_decay"]
    assert _ids(by_name["head.*/decay"]["params"]) == [id(model.head.weight)]
    assert _ids(by_name["head.*/no_decay"]["params"]) == [id(model.head.bias)]
    for n in ("head.*/decay", "head.*/no_decay"):
        assert by_name[n]["lr"] == 1e-2 and by_name[n]["betas"] == (0.8, 0.9)
    assert by_name["head.*/decay"]["weight_decay"] == 0.05
    assert by_name["head.*/no_decay"]["weight_decay"] == 0.0
    assert by_name["decay"]["lr"] == 1e-3 and "betas" not in by_name["decay"]
    assert id(model.head.weight) not in _ids(by_name["decay"]["params"])
    opt = torch.optim.AdamW(groups, lr=1.0)
    assert [g["name"] for g in opt.param_groups] == list(by_name)


def test_override_weight_decay_applies_to_its_decay_group_only() -> None:
    groups = decay_param_groups(make_cnn(), None, overrides={"head.*": {"weight_decay": 0.3}})
    by_name = {g["name"]: g for g in groups}
    assert by_name["head.*/decay"]["weight_decay"] == 0.3
    assert by_name["head.*/no_decay"]["weight_decay"] == 0.0
    assert "weight_decay" not in by_name["decay"]
    groups = decay_param_groups(make_cnn(), 0.1, overrides={"head.*": {"weight_decay": 0.3}})
    assert {g["name"]: g["weight_decay"] for g in groups} == {
        "decay": 0.1,
        "no_decay": 0.0,
        "head.*/decay": 0.3,
        "head.*/no_decay": 0.0,
    }


def test_override_without_decay_params_drops_empty_group() -> None:
    groups = decay_param_groups(make_cnn(), 0.1, overrides={"bn*": {"lr": 2.0}})
    assert [g["name"] for g in groups] == ["decay", "no_decay", "bn*/no_decay"]
    assert len(groups[2]["params"]) == 4


def test_overrides_first_match_wins_and_unused_warns() -> None:
    model = make_cnn()
    with pytest.warns(UserWarning, match=r"'head\.weight'"):
        groups = decay_param_groups(model, 0.1, overrides={"head.*": {"lr": 1.0}, "head.weight": {"lr": 2.0}})
    by_name = {g["name"]: g for g in groups}
    assert "head.weight/decay" not in by_name
    assert _ids(by_name["head.*/decay"]["params"]) == [id(model.head.weight)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        groups = decay_param_groups(model, 0.1, overrides={"head.weight": {"lr": 2.0}, "head.*": {"lr": 1.0}})
    by_name = {g["name"]: g for g in groups}
    assert _ids(by_name["head.weight/decay"]["params"]) == [id(model.head.weight)]
    assert _ids(by_name["head.*/no_decay"]["params"]) == [id(model.head.bias)]
    with pytest.warns(UserWarning, match="nothing"):
        decay_param_groups(model, 0.1, overrides={"nothing*": {"lr": 1.0}})


def test_override_matches_tied_alias() -> None:
    model = make_gpt()
    groups = decay_param_groups(model, 0.1, overrides={"lm_head.*": {"lr": 0.5}})
    by_name = {g["name"]: g for g in groups}
    assert _ids(by_name["lm_head.*/decay"]["params"]) == [id(model.wte.weight)]


@pytest.mark.parametrize("key", ["params", "name"])
def test_override_reserved_keys_raise(key) -> None:
    with pytest.raises(ValueError, match=key):
        decay_param_groups(make_cnn(), 0.1, overrides={"head.*": {key: []}})


def test_override_options_must_be_mapping() -> None:
    with pytest.raises(TypeError, match="head"):
        decay_param_groups(make_cnn(), 0.1, overrides={"head.*": 0.5})


def test_decay_param_groups_equals_plan_groups() -> None:
    rules = DecayRules(decay_embeddings=False)
    model = make_gpt()
    a = decay_param_groups(model, 0.1, rules=rules, betas=(0.9, 0.95))
    b = rules.classify(model).param_groups(0.1, betas=(0.9, 0.95))
    assert [(g["name"], _ids(g["params"]), g["weight_decay"], g["betas"]) for g in a] == [
        (g["name"], _ids(g["params"]), g["weight_decay"], g["betas"]) for g in b
    ]


def test_frozen_params_not_in_groups() -> None:
    model = make_frozen_backbone()
    groups = decay_param_groups(model, 0.1)
    assert _ids(p for g in groups for p in g["params"]) == [id(model.head.weight), id(model.head.bias)]


# --------------------------------------------------------------------------- real AdamW steps
def _gpt_loss(model: nn.Module, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    idx = torch.randint(0, 32, (2, 8), generator=g)
    logits = model(idx)
    return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 32), idx[:, 1:].reshape(-1))


@pytest.mark.parametrize("weight_decay", [0.1, None])
def test_adamw_step_equals_two_separate_optimizers(weight_decay) -> None:
    default_wd = 0.3  # AdamW's default for a group without the key
    model = make_gpt(seed=3)
    ref = copy.deepcopy(model)  # deepcopy keeps the tie
    assert ref.lm_head.weight is ref.wte.weight

    opt = torch.optim.AdamW(decay_param_groups(model, weight_decay), lr=1e-2, weight_decay=default_wd)

    plan = DecayRules().classify(ref)
    wd = default_wd if weight_decay is None else weight_decay
    ref_decay = torch.optim.AdamW(plan.decay_params, lr=1e-2, weight_decay=wd)
    ref_no_decay = torch.optim.AdamW(plan.no_decay_params, lr=1e-2, weight_decay=0.0)

    for step in range(3):
        for m, opts in ((model, [opt]), (ref, [ref_decay, ref_no_decay])):
            for o in opts:
                o.zero_grad()
            _gpt_loss(m, step).backward()
            for o in opts:
                o.step()
    for (n, p), (n2, q) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        assert n == n2
        assert torch.equal(p, q), n
    # and the decay really acted: a plain AdamW without groups ends elsewhere
    assert not torch.equal(model.h[0].ln_1.weight, make_gpt(seed=3).h[0].ln_1.weight)


def test_no_decay_group_not_decayed_by_adamw() -> None:
    # With zero gradients AdamW's update is exactly the decoupled decay: w *= 1 - lr * wd.
    model = make_cnn()
    plan = DecayRules().classify(model)
    before = {d.name: d.param.detach().clone() for d in plan}
    opt = torch.optim.AdamW(plan.param_groups(0.5), lr=0.1, weight_decay=0.9)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for d in plan:
        expected = before[d.name] * (1 - 0.1 * 0.5) if d.decay else before[d.name]
        assert torch.equal(d.param.detach(), expected), d.name


@pytest.mark.parametrize("key", ["params", "name"])
def test_group_kwargs_reserved_keys_raise(key) -> None:
    with pytest.raises(ValueError, match=key):
        DecayRules().classify(make_cnn()).param_groups(0.1, **{key: []})


def test_unknown_names_suggest_the_closest_and_frozen_names_say_so() -> None:
    model = nn.Module()
    model.net = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
    model.net.head = nn.Linear(2, 2)
    model.net[0].requires_grad_(False)
    plan = DecayRules().classify(model)
    with pytest.raises(KeyError, match=r"'head.weight' is not .*did you mean 'net.head.weight'"):
        plan.explain("head.weight")  # the prefix is missing
    with pytest.raises(KeyError, match=r"did you mean 'net.head.weight'"):
        plan["model.net.head.weight"]  # one too many
    with pytest.raises(KeyError, match=r"did you mean 'net.head.bias'"):
        plan["net.head.bais"]
    with pytest.raises(KeyError, match=r"'net.0.weight' is frozen"):
        plan["net.0.weight"]
    with pytest.raises(KeyError, match=r"the names are 'net.1.weight', 'net.1.bias', 'net.head.weight'"):
        plan["zzz"]  # nothing close: the names


def test_group_options_unknown_to_torch_warn_with_the_closest_name() -> None:
    # torch's optimizers keep any key on a group without a word: a typo must not pass silently.
    model = make_cnn(0)
    with pytest.warns(UserWarning, match=r"'momentun' \(did you mean 'momentum'\?\); 'foo'"):
        groups = decay_param_groups(model, 0.05, momentun=0.9, foo=1)
    assert all(g["momentun"] == 0.9 and g["foo"] == 1 for g in groups)  # kept: a custom optimizer may read it
    with pytest.warns(UserWarning, match="'nesterow'"):
        DecayRules().classify(model).param_groups(overrides={"head.*": {"nesterow": True}})
    # Every torch.optim optimizer's own hyperparameters pass without a warning.
    signature_args = set()
    for opt in (torch.optim.SGD, torch.optim.AdamW, torch.optim.RMSprop, torch.optim.Adagrad):
        signature_args |= set(opt([torch.zeros(1, requires_grad=True)]).defaults)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        decay_param_groups(model, 0.05, **{k: None for k in signature_args if k != "weight_decay"})
