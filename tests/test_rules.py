"""``DecayRules.classify``: built-in rules on real architectures, independent references, precedence,
flags, model hooks, tied parameters, frozen parameters, wrappers and errors."""

from __future__ import annotations

import fnmatch
import re
import warnings

import pytest
import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from lightning_decay import DecayPlan, DecayRules
from tests.models import (
    NameWrapper,
    TinyViT,
    make_cnn,
    make_frozen_backbone,
    make_gpt,
    make_llama,
    make_swin,
    make_transformer_encoder,
    make_vit,
)


# ----------------------------------------------------------------------------- references
def timm_no_decay(model: nn.Module) -> set[str]:
    """timm ``param_groups_weight_decay`` with ``no_weight_decay_list=model.no_weight_decay()``:
    ``ndim <= 1`` or ``.bias`` suffix or a (glob) match of the TOP-LEVEL hook only; Swin's keywords as in
    the original Swin code (substring of the full name), again top-level only."""
    nwd = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    kws = set(model.no_weight_decay_keywords()) if hasattr(model, "no_weight_decay_keywords") else set()
    out = set()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if (
            p.ndim <= 1
            or name.endswith(".bias")
            or any(fnmatch.fnmatch(name, pat) for pat in nwd)
            or any(k in name for k in kws)
        ):
            out.add(name)
    return out


_HF_PATTERNS = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]


def hf_decay(model: nn.Module) -> set[str]:
    """Hugging Face ``Trainer.get_decay_parameter_names``: not inside an ``nn.LayerNorm`` and no
    forbidden pattern in the lower-cased full name (top-level parameters only see the patterns)."""
    owners = {
        n: m
        for mn, m in model.named_modules()
        for n in (f"{mn}.{pn}" if mn else pn for pn, _ in m.named_parameters(recurse=False))
    }
    return {
        name
        for name, _ in model.named_parameters()
        if not isinstance(owners[name], nn.LayerNorm) and not any(re.search(p, name.lower()) for p in _HF_PATTERNS)
    }


def mingpt_decay(model: nn.Module) -> set[str]:
    """minGPT ``configure_optimizers``: Linear weights decay; LayerNorm/Embedding weights and all biases
    don't; the tied ``lm_head.weight`` name removed from the decay set (the nanoGPT #268 fix)."""
    decay, no_decay = set(), set()
    for mn, m in model.named_modules():
        for pn, _ in m.named_parameters(recurse=False):
            fpn = f"{mn}.{pn}" if mn else pn
            if pn.endswith("bias"):
                no_decay.add(fpn)
            elif pn.endswith("weight") and isinstance(m, nn.Linear):
                decay.add(fpn)
            elif pn.endswith("weight") and isinstance(m, (nn.LayerNorm, nn.Embedding)):
                no_decay.add(fpn)
    params = dict(model.named_parameters())
    decay &= set(params)  # drops the alias lm_head.weight
    no_decay &= set(params)
    assert not decay & no_decay and decay | no_decay == set(params)
    return decay


def nanogpt_decay(model: nn.Module) -> set[str]:
    """nanoGPT: decay iff ``p.dim() >= 2`` (embeddings decayed)."""
    return {n for n, p in model.named_parameters() if p.dim() >= 2}


def ours_no_decay(model: nn.Module, **kw) -> set[str]:
    return set(DecayRules(**kw).classify(model).no_decay_names)


def ours_decay(model: nn.Module, **kw) -> set[str]:
    return set(DecayRules(**kw).classify(model).decay_names)


def assert_partition(plan: DecayPlan, model: nn.Module) -> None:
    """Every trainable parameter exactly once, under its first registered name."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert [d.name for d in plan] == [n for n, _ in trainable]
    assert [id(d.param) for d in plan] == [id(p) for _, p in trainable]
    assert set(plan.decay_names).isdisjoint(plan.no_decay_names)


# ------------------------------------------------------------------- independent references
@pytest.mark.parametrize(
    "build",
    [make_cnn, make_transformer_encoder, make_gpt, make_llama, make_vit],
    ids=["cnn", "encoder", "gpt", "llama", "vit"],
)
def test_matches_timm(build) -> None:
    model = build()
    assert ours_no_decay(model) == timm_no_decay(model)
    assert_partition(DecayRules().classify(model), model)


def test_swin_submodule_keywords_beyond_timm() -> None:
    # Intentional difference: timm reads hooks of the top-level model only (its Swin puts the keyword
    # hook there); we also honor a block's own no_weight_decay_keywords().
    model = make_swin()
    diff = ours_no_decay(model) - timm_no_decay(model)
    assert diff == {f"layers.{i}.attn.relative_position_bias_table" for i in range(2)}
    assert timm_no_decay(model) <= ours_no_decay(model)


def test_wrapped_vit_keeps_hooks_unlike_timm_deit39() -> None:
    # deit #39: wrapping the model hides its no_weight_decay() from timm; we still honor it.
    model = NameWrapper(make_vit(), "backbone", extra=True)
    assert ours_no_decay(model) - timm_no_decay(model) == {"backbone.pos_embed", "backbone.cls_token"}
    assert ours_no_decay(model.backbone) == timm_no_decay(model.backbone)


@pytest.mark.parametrize("build", [make_transformer_encoder, make_gpt], ids=["encoder", "gpt"])
def test_matches_hugging_face(build) -> None:
    model = build()
    assert ours_decay(model) == hf_decay(model)


def test_hugging_face_differences_are_intentional() -> None:
    # Llama: HF's regexes catch the RMSNorm names, but HF decays the top-level scalar temperature.
    llama = make_llama()
    assert hf_decay(llama) - ours_decay(llama) == {"logit_scale"}
    assert ours_decay(llama) <= hf_decay(llama)
    # CNN: HF only knows nn.LayerNorm, so it decays BatchNorm weights.
    cnn = make_cnn()
    assert hf_decay(cnn) - ours_decay(cnn) == {"bn1.weight", "bn2.weight"}
    # ViT: HF ignores no_weight_decay().
    vit = make_vit()
    assert hf_decay(vit) - ours_decay(vit) == {"pos_embed", "cls_token"}
    for model in (llama, cnn, vit):
        assert ours_decay(model) <= hf_decay(model)


def test_matches_nanogpt_and_mingpt() -> None:
    gpt = make_gpt()
    assert ours_decay(gpt) == nanogpt_decay(gpt)
    assert ours_decay(gpt, decay_embeddings=False) == mingpt_decay(gpt)
    untied = make_gpt(tie=False)
    assert ours_decay(untied, decay_embeddings=False) == mingpt_decay(untied)


# ------------------------------------------------------------------------ real architectures
def test_cnn() -> None:
    plan = DecayRules().classify(make_cnn())
    assert plan.decay_names == ["conv1.weight", "conv2.weight", "head.weight"]
    assert plan["bn1.weight"].reason == "normalization layer (BatchNorm2d)"
    assert plan["bn1.bias"].reason == "bias"
    assert plan["conv1.weight"].reason == "weight of Conv2d"
    assert plan["conv1.weight"].shape == (8, 3, 3, 3)
    assert plan["head.weight"].module_type == "Linear"


def test_transformer_encoder() -> None:
    plan = DecayRules().classify(make_transformer_encoder())
    for i in range(2):
        p = f"layers.{i}."
        assert plan[p + "self_attn.in_proj_weight"].decay
        assert plan[p + "self_attn.in_proj_weight"].reason == "weight of MultiheadAttention"
        assert not plan[p + "self_attn.in_proj_bias"].decay
        assert plan[p + "self_attn.in_proj_bias"].reason == "bias"
        assert plan[p + "self_attn.out_proj.weight"].decay
        for n in ("norm1", "norm2"):
            assert not plan[f"{p}{n}.weight"].decay
            assert plan[f"{p}{n}.weight"].reason == "normalization layer (LayerNorm)"
            assert not plan[f"{p}{n}.bias"].decay
    assert not plan["norm.weight"].decay
    assert {d.name for d in plan.decay} == {
        f"layers.{i}.{n}"
        for i in range(2)
        for n in ("self_attn.in_proj_weight", "self_attn.out_proj.weight", "linear1.weight", "linear2.weight")
    }


def test_gpt_tied_parameter_appears_once() -> None:
    model = make_gpt()
    assert model.lm_head.weight is model.wte.weight
    plan = DecayRules().classify(model)
    assert_partition(plan, model)
    d = plan["wte.weight"]
    assert d.aliases == ("lm_head.weight",)
    assert plan["lm_head.weight"] is d
    assert [x.name for x in plan].count("wte.weight") == 1
    assert "lm_head.weight" not in [x.name for x in plan]
    assert d.decay and d.reason == "embedding (Embedding)"  # both names agree: decay
    assert plan["wpe.weight"].decay
    assert len(plan) == len(list(model.parameters()))


def test_gpt_tied_owners_disagree_no_decay_wins() -> None:
    plan = DecayRules(decay_embeddings=False).classify(make_gpt())
    d = plan["lm_head.weight"]
    assert d.name == "wte.weight" and not d.decay
    assert d.reason.startswith("tied, no_decay wins")
    text = plan.explain("lm_head.weight")
    assert text.startswith("wte.weight: no_decay (")
    assert "wte.weight: no_decay (embedding (decay_embeddings=False))" in text
    assert "lm_head.weight: decay (weight of Linear)" in text
    assert plan.explain("wte.weight") == text
    assert not plan["wpe.weight"].decay


def test_gpt_tied_explicit_rule_wins() -> None:
    # An explicit rule under one name beats the built-in verdict under the other.
    plan = DecayRules(decay_embeddings=False, include=["lm_head.weight"]).classify(make_gpt())
    d = plan["wte.weight"]
    assert d.decay and d.reason.startswith("tied, explicit rule wins")
    assert "include pattern 'lm_head.weight'" in d.reason
    # Conflicting explicit rules: no decay wins.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan = DecayRules(include=["lm_head.*"], exclude=["wte.*"]).classify(make_gpt())
    assert not plan["wte.weight"].decay and plan["wte.weight"].reason.startswith("tied, no_decay wins")


def test_custom_rmsnorm_and_scalar_temperature() -> None:
    plan = DecayRules().classify(make_llama())
    for i in range(2):
        for n in ("input_layernorm", "post_attention_layernorm"):
            d = plan[f"layers.{i}.{n}.weight"]
            assert not d.decay and d.reason == "normalization layer (LlamaRMSNorm)"
    assert plan["norm.weight"].reason == "normalization layer (LlamaRMSNorm)"
    assert not plan["final_layer_norm.weight"].decay
    assert plan["final_layer_norm.weight"].reason == "normalization layer (T5LayerNorm)"
    t = plan["logit_scale"]
    assert t.shape == () and not t.decay and t.reason == "ndim <= 1"
    assert plan["embed_tokens.weight"].decay and plan["lm_head.weight"].decay
    assert plan["layers.0.self_attn.q_proj.weight"].decay


def test_custom_norm_detected_even_with_2d_weight() -> None:
    class GroupedRMSNorm(nn.Module):  # a norm by name whose gain is 2-D: still no decay
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(2, 8))

    class NormalLinear(nn.Module):  # "Normal" (a distribution) is not a norm layer
        def __init__(self) -> None:
            super().__init__()
            self.mean = nn.Parameter(torch.zeros(4, 8))

    model = nn.ModuleDict({"g": GroupedRMSNorm(), "n": NormalLinear()})
    plan = DecayRules().classify(model)
    assert not plan["g.weight"].decay and plan["g.weight"].reason == "normalization layer (GroupedRMSNorm)"
    assert plan["n.mean"].decay and plan["n.mean"].reason == "default (ndim >= 2)"


@pytest.mark.parametrize(
    "norm",
    [nn.GroupNorm(2, 8), nn.InstanceNorm1d(8, affine=True), nn.LayerNorm(8), nn.BatchNorm1d(8), nn.RMSNorm(8)],
    ids=lambda m: type(m).__name__,
)
def test_torch_norm_layers(norm: nn.Module) -> None:
    plan = DecayRules().classify(nn.Sequential(nn.Linear(8, 8), norm))
    assert plan.decay_names == ["0.weight"]
    assert plan["1.weight"].reason == f"normalization layer ({type(norm).__name__})"


def test_frozen_backbone() -> None:
    model = make_frozen_backbone()
    plan = DecayRules().classify(model)
    assert [d.name for d in plan] == ["head.weight", "head.bias"]
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and list(plan.frozen) == frozen
    assert "backbone.conv1.weight" in plan.frozen
    with pytest.raises(KeyError):
        plan["backbone.conv1.weight"]
    full = DecayRules().classify(model, include_frozen=True)
    assert len(full) == len(list(model.parameters())) and full.frozen == ()
    assert full["backbone.conv1.weight"].decay


def test_all_frozen_raises() -> None:
    model = make_cnn().requires_grad_(False)
    with pytest.raises(ValueError, match="frozen"):
        DecayRules().classify(model)


def test_no_parameters_and_not_a_module() -> None:
    with pytest.raises(ValueError, match="no parameters"):
        DecayRules().classify(nn.ReLU())
    with pytest.raises(TypeError, match=r"nn\.Module"):
        DecayRules().classify([nn.Parameter(torch.zeros(2))])  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ compile / wrappers
def _signature(plan: DecayPlan) -> list[tuple]:
    return [(d.name, d.decay, d.reason, d.shape, d.aliases, id(d.param)) for d in plan]


@pytest.mark.parametrize("build", [make_gpt, make_vit, make_swin, make_llama], ids=["gpt", "vit", "swin", "llama"])
def test_torch_compile_plan_equals_uncompiled(build) -> None:
    model = build()
    compiled = torch.compile(model)  # lazy: no compilation happens here
    assert next(iter(compiled.named_parameters()))[0].startswith("_orig_mod.")
    plan = DecayRules().classify(compiled)
    assert all("_orig_mod" not in d.name for d in plan)
    assert _signature(plan) == _signature(DecayRules().classify(model))
    for kw in ({"decay_embeddings": False}, {"use_model_hooks": False}):
        assert _signature(DecayRules(**kw).classify(compiled)) == _signature(DecayRules(**kw).classify(model))


def _decisions(plan: DecayPlan) -> list[tuple]:
    return [(d.name, d.decay, d.reason, d.shape, d.aliases) for d in plan]


def test_fsdp1_and_checkpoint_wrapped_blocks_plan_equal() -> None:
    from tests.models import ViTBlock
    from tests.wrappers import fsdp1, process_group

    model = make_vit()
    reference = _decisions(DecayRules().classify(model))
    model.blocks[0] = checkpoint_wrapper(model.blocks[0])  # a real activation-checkpoint wrapper
    with process_group():
        outer = fsdp1(model, {ViTBlock})  # real FSDP1: the root and every (other) block wrapped
        raw = [n for n, _ in outer.named_parameters()]
        assert any("blocks.1._fsdp_wrapped_module." in n for n in raw)
        assert any("._checkpoint_wrapped_module." in n for n in raw)
        assert _decisions(DecayRules().classify(outer)) == reference


def test_ddp_wrapper_without_hooks() -> None:
    from tests.wrappers import ddp, process_group

    model = make_gpt()
    with process_group():
        assert _signature(DecayRules().classify(ddp(model))) == _signature(DecayRules().classify(model))


def test_ddp_wrapper_keeps_model_hooks() -> None:
    from tests.wrappers import ddp, process_group

    model = make_vit()
    with process_group():
        assert _signature(DecayRules().classify(ddp(model))) == _signature(DecayRules().classify(model))


# ----------------------------------------------------------------------------------- model hooks
def test_vit_hooks() -> None:
    plan = DecayRules().classify(make_vit())
    for n in ("pos_embed", "cls_token"):
        assert plan[n].shape[0] == 1 and len(plan[n].shape) == 3
        assert not plan[n].decay and plan[n].reason == f"no_weight_decay() {n!r}"
    plan = DecayRules(use_model_hooks=False).classify(make_vit())
    assert plan["pos_embed"].decay and plan["pos_embed"].reason == "default (ndim >= 2)"


def test_swin_keyword_hook_on_submodule() -> None:
    model = make_swin()
    plan = DecayRules().classify(model)
    for i in range(2):
        d = plan[f"layers.{i}.attn.relative_position_bias_table"]
        assert not d.decay and d.reason == "no_weight_decay_keywords() 'relative_position_bias_table'"
    assert plan["absolute_pos_embed"].reason == "no_weight_decay() 'absolute_pos_embed'"
    # a keyword of one block does not leak outside that block: outside it, the built-in table rule decides
    model.head.relative_position_bias_table = nn.Parameter(torch.zeros(3, 3))
    assert DecayRules().classify(model)["head.relative_position_bias_table"].reason == "position bias table"
    assert DecayRules(decay_position_bias=True).classify(model)["head.relative_position_bias_table"].decay


def test_hooks_of_wrapped_model_honored_with_prefix() -> None:
    outer = NameWrapper(make_vit(), "backbone", extra=True)
    plan = DecayRules().classify(outer)
    for n in ("pos_embed", "cls_token"):
        d = plan[f"backbone.{n}"]
        assert not d.decay and d.reason == f"no_weight_decay() of backbone {n!r}"
    assert plan["extra.weight"].decay
    swin = NameWrapper(make_swin(), "backbone")
    plan = DecayRules().classify(swin)
    assert not plan["backbone.layers.1.attn.relative_position_bias_table"].decay
    assert not plan["backbone.absolute_pos_embed"].decay


def test_hook_may_name_a_submodule() -> None:
    plan = DecayRules().classify(make_vit(extra_no_decay=("head", "blocks.1.attn")))
    for n in ("head.weight", "head.bias", "blocks.1.attn.qkv.weight", "blocks.1.attn.proj.weight"):
        assert not plan[n].decay
    assert plan["head.weight"].reason == "no_weight_decay() 'head'"
    assert plan["blocks.1.attn.qkv.weight"].reason == "no_weight_decay() 'blocks.1.attn'"
    assert plan["blocks.0.attn.qkv.weight"].decay
    assert plan["blocks.1.mlp.fc1.weight"].decay


def test_hook_returning_a_string_raises() -> None:
    class Bad(TinyViT):
        def no_weight_decay(self):  # type: ignore[override]
            return "pos_embed"

    with pytest.raises(TypeError, match="no_weight_decay"):
        DecayRules().classify(Bad())


def test_submodule_keywords_match_relative_names() -> None:
    class Gated(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate = nn.Parameter(torch.zeros(4, 4))
            self.fc = nn.Linear(4, 4)

        def no_weight_decay_keywords(self):
            return {"gate"}

    model = nn.Module()
    model.gated_mlp = Gated()
    plan = DecayRules().classify(model)
    assert not plan["gated_mlp.gate"].decay
    assert plan["gated_mlp.fc.weight"].decay


# ------------------------------------------------------------------------------------ precedence
def test_predicate_beats_include() -> None:
    plan = DecayRules(predicate=lambda n, p, m: False if n == "head.weight" else None, include=["head.*"]).classify(
        make_cnn()
    )
    assert not plan["head.weight"].decay and plan["head.weight"].reason == "predicate"
    assert plan["head.bias"].decay and plan["head.bias"].reason == "include pattern 'head.*'"


def test_include_beats_exclude() -> None:
    plan = DecayRules(include=["head.weight"], exclude=["head.*"]).classify(make_cnn())
    assert plan["head.weight"].decay and plan["head.weight"].reason == "include pattern 'head.weight'"
    assert plan["head.bias"].reason == "exclude pattern 'head.*'"


def test_exclude_beats_exclude_modules() -> None:
    plan = DecayRules(exclude=["head.weight"], exclude_modules=[nn.Linear]).classify(make_cnn())
    assert plan["head.weight"].reason == "exclude pattern 'head.weight'"
    assert plan["head.bias"].reason == "exclude_modules (Linear)"
    assert plan["conv1.weight"].decay


def test_exclude_modules_beats_model_hooks() -> None:
    plan = DecayRules(exclude_modules=TinyViT).classify(make_vit())  # a single type is accepted
    assert plan["pos_embed"].reason == "exclude_modules (TinyViT)"
    assert plan["head.weight"].decay  # only the module's OWN parameters


def test_model_hooks_beat_builtins() -> None:
    # pos_embed is 3-D (built-in: decay); the hook says no decay. A hook naming a bias gives its reason.
    plan = DecayRules().classify(make_vit(extra_no_decay=("head.bias",)))
    assert not plan["pos_embed"].decay
    assert plan["head.bias"].reason == "no_weight_decay() 'head.bias'"


def test_include_beats_model_hooks_and_builtins() -> None:
    plan = DecayRules(include=["pos_embed", "*.bias", "norm.*"]).classify(make_vit())
    assert plan["pos_embed"].decay
    assert plan["head.bias"].decay and plan["norm.weight"].decay
    assert plan["norm.weight"].reason == "include pattern 'norm.*'"


def test_exclude_beats_builtins() -> None:
    plan = DecayRules(exclude=["wte.*", "h.*.mlp.*"]).classify(make_gpt())
    assert not plan["wte.weight"].decay and not plan["h.1.mlp.c_fc.weight"].decay
    assert plan["h.1.attn.c_attn.weight"].decay


def test_predicate_none_defers_and_sees_owner() -> None:
    calls: list[tuple[str, type]] = []

    def predicate(name, param, module):
        calls.append((name, type(module)))
        return None

    model = make_gpt()
    assert _signature(DecayRules(predicate=predicate).classify(model)) == _signature(DecayRules().classify(model))
    seen = dict(calls)
    assert seen["wte.weight"] is nn.Embedding and seen["lm_head.weight"] is nn.Linear  # asked under both names
    assert seen["h.0.ln_1.weight"] is nn.LayerNorm


def test_predicate_by_type() -> None:
    plan = DecayRules(predicate=lambda n, p, m: True if isinstance(m, nn.LayerNorm) else None).classify(make_gpt())
    assert plan["ln_f.weight"].decay and plan["ln_f.bias"].decay
    assert not plan["h.0.attn.c_attn.bias"].decay


def test_predicate_raising_names_parameter() -> None:
    def predicate(name, param, module):
        if name == "bn1.bias":
            raise RuntimeError("boom")
        return None

    with pytest.raises(ValueError, match=r"bn1\.bias") as info:
        DecayRules(predicate=predicate).classify(make_cnn())
    assert isinstance(info.value.__cause__, RuntimeError)


@pytest.mark.parametrize("bad", [1, 0, "yes", torch.tensor(True)])
def test_predicate_non_bool_raises(bad) -> None:
    with pytest.raises(TypeError, match=r"head\.weight"):
        DecayRules(predicate=lambda n, p, m: bad if n == "head.weight" else None).classify(make_cnn())


# ------------------------------------------------------------------------------ options / flags
def test_unknown_option() -> None:
    with pytest.raises(ValueError, match="foo") as info:
        DecayRules(foo=1)
    for allowed in ("exclude", "include", "predicate", "decay_bias", "use_model_hooks"):
        assert allowed in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "exc"),
    [
        ({"decay_bias": 1}, TypeError),
        ({"decay_norm": "no"}, TypeError),
        ({"exclude_modules": [nn.Linear, "LayerNorm"]}, TypeError),
        ({"exclude": [""]}, TypeError),
        ({"include": [3]}, TypeError),
        ({"predicate": 3}, TypeError),
    ],
)
def test_bad_option_types(kwargs, exc) -> None:
    with pytest.raises(exc):
        DecayRules(**kwargs)


def test_single_string_pattern_accepted() -> None:
    assert not DecayRules(exclude="head.*").classify(make_cnn())["head.weight"].decay


def test_unused_pattern_warns() -> None:
    with pytest.warns(UserWarning, match=r"'nope\.\*'"):
        DecayRules(exclude=["nope.*"]).classify(make_cnn())
    with pytest.warns(UserWarning, match=r"'typo_head\.weight'"):
        DecayRules(include=["typo_head.weight"]).classify(make_cnn())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DecayRules(exclude=["head.*"], include=["conv1.*"]).classify(make_cnn())


def test_patterns_are_case_sensitive_globs() -> None:
    with pytest.warns(UserWarning, match="HEAD"):
        plan = DecayRules(exclude=["HEAD.*"]).classify(make_cnn())
    assert plan["head.weight"].decay
    plan = DecayRules(exclude=["h.?.attn.*"]).classify(make_gpt())
    assert not plan["h.0.attn.c_attn.weight"].decay and plan["h.0.mlp.c_fc.weight"].decay


def test_decay_bias() -> None:
    plan = DecayRules(decay_bias=True).classify(make_cnn())
    assert plan["conv1.bias"].decay and plan["head.bias"].decay
    plan = DecayRules(decay_bias=True).classify(make_transformer_encoder())
    assert plan["layers.0.self_attn.in_proj_bias"].decay


def test_decay_bias_with_decay_vectors() -> None:
    plan = DecayRules(decay_bias=True, decay_vectors=True).classify(make_cnn())
    assert plan["conv1.bias"].decay and plan["head.bias"].decay
    assert not plan["bn1.bias"].decay  # still a normalization-layer parameter
    assert not DecayRules(decay_vectors=True).classify(make_cnn())["head.bias"].decay


def test_decay_norm() -> None:
    plan = DecayRules(decay_norm=True).classify(make_llama())
    d = plan["norm.weight"]
    assert d.decay and d.reason == "normalization layer (LlamaRMSNorm, decay_norm=True)"
    assert not plan["logit_scale"].decay
    plan = DecayRules(decay_norm=True).classify(make_cnn())
    assert plan["bn1.weight"].decay and not plan["bn1.bias"].decay


def test_decay_embeddings() -> None:
    plan = DecayRules(decay_embeddings=False).classify(make_llama())
    assert not plan["embed_tokens.weight"].decay
    assert plan["embed_tokens.weight"].reason == "embedding (decay_embeddings=False)"
    bag = nn.ModuleDict({"bag": nn.EmbeddingBag(10, 4)})
    assert not DecayRules(decay_embeddings=False).classify(bag)["bag.weight"].decay
    assert DecayRules().classify(bag)["bag.weight"].decay


def test_decay_vectors() -> None:
    plan = DecayRules(decay_vectors=True).classify(make_llama())
    assert plan["logit_scale"].decay
    assert not plan["norm.weight"].decay  # norm rule comes first
    plan = DecayRules(decay_vectors=True).classify(make_cnn())
    assert not plan["conv1.bias"].decay  # bias rule comes first


def test_decay_vectors_reason_is_truthful() -> None:
    d = DecayRules(decay_vectors=True).classify(make_llama())["logit_scale"]
    assert d.decay and "ndim >= 2" not in d.reason


def test_rnn_biases_are_biases() -> None:
    plan = DecayRules(decay_vectors=True).classify(nn.LSTM(4, 4))
    assert plan["weight_ih_l0"].decay
    assert not plan["bias_ih_l0"].decay and not plan["bias_hh_l0"].decay


def test_rnn_default() -> None:
    plan = DecayRules().classify(nn.GRU(4, 4, num_layers=2))
    assert plan.decay_names == ["weight_ih_l0", "weight_hh_l0", "weight_ih_l1", "weight_hh_l1"]


def test_repr_shows_non_defaults() -> None:
    assert repr(DecayRules()) == "DecayRules()"
    text = repr(DecayRules(exclude=["a.*"], decay_bias=True))
    assert "exclude=('a.*',)" in text and "decay_bias=True" in text and "decay_norm" not in text


def test_classification_is_deterministic() -> None:
    a = DecayRules().classify(make_gpt(seed=1))
    b = DecayRules().classify(make_gpt(seed=1))
    assert [(d.name, d.decay, d.reason) for d in a] == [(d.name, d.decay, d.reason) for d in b]
    assert all(torch.equal(x.param, y.param) for x, y in zip(a, b, strict=True))


def test_shadowed_pattern_warning_is_truthful() -> None:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        DecayRules(include=["head.*"], exclude=["head.weight"]).classify(make_cnn())
    assert not any("matches no parameter" in str(w.message) for w in record)
