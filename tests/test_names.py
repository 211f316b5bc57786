"""``clean_param_name``: wrapper prefixes removed, user names kept, on strings and on real wrappers."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from lightning_decay import DecayRules, clean_param_name
from tests.models import NameWrapper, make_gpt, make_vit, wrap


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("blocks.0.attn.weight", "blocks.0.attn.weight"),
        ("weight", "weight"),
        ("", ""),
        # torch.compile
        ("_orig_mod.blocks.0.attn.weight", "blocks.0.attn.weight"),
        # FSDP1: the root and every wrapped submodule
        ("_fsdp_wrapped_module.blocks.0._fsdp_wrapped_module.attn.weight", "blocks.0.attn.weight"),
        # activation checkpointing
        ("blocks.0._checkpoint_wrapped_module.mlp.fc1.bias", "blocks.0.mlp.fc1.bias"),
        # DDP / DataParallel
        ("module.head.weight", "head.weight"),
        ("module._orig_mod.head.weight", "head.weight"),
        ("_orig_mod.module.head.weight", "head.weight"),
        # all at once (the docstring example)
        ("module._orig_mod.blocks.0._fsdp_wrapped_module.attn.weight", "blocks.0.attn.weight"),
        (
            "_fsdp_wrapped_module.h.1._fsdp_wrapped_module._checkpoint_wrapped_module.ln_1.weight",
            "h.1.ln_1.weight",
        ),
        # a user submodule named `module` in the middle is a real name: kept
        ("encoder.module.weight", "encoder.module.weight"),
        ("module.encoder.module.weight", "encoder.module.weight"),
        ("_orig_mod.encoder.module.layers.0.bias", "encoder.module.layers.0.bias"),
        # a parameter whose own name is `module` is kept (never emptied)
        ("module", "module"),
        # names that merely contain a wrapper word are untouched
        ("my_module.weight", "my_module.weight"),
        ("modules.0.weight", "modules.0.weight"),
        ("orig_mod.weight", "orig_mod.weight"),
    ],
)
def test_clean_param_name(raw: str, clean: str) -> None:
    assert clean_param_name(raw) == clean


def test_clean_is_idempotent() -> None:
    for raw in ("module._orig_mod.a.b", "_fsdp_wrapped_module.x._checkpoint_wrapped_module.y.weight"):
        once = clean_param_name(raw)
        assert clean_param_name(once) == once


def test_torch_compile_names_cleaned() -> None:
    model = make_gpt()
    compiled = torch.compile(model)  # lazy: nothing is compiled until the first forward
    raw = [n for n, _ in compiled.named_parameters()]
    assert all(n.startswith("_orig_mod.") for n in raw)
    assert [clean_param_name(n) for n in raw] == [n for n, _ in model.named_parameters()]


def test_real_checkpoint_wrapper_names_cleaned() -> None:
    model = make_vit()
    plain = [n for n, _ in make_vit().named_parameters()]
    model.blocks[1] = checkpoint_wrapper(model.blocks[1])
    raw = [n for n, _ in model.named_parameters()]
    assert any("._checkpoint_wrapped_module." in n for n in raw)
    assert [clean_param_name(n) for n in raw] == plain


def test_fsdp1_style_and_ddp_style_names_cleaned() -> None:
    model = make_vit()
    plain = [n for n, _ in make_vit().named_parameters()]
    for i, block in enumerate(model.blocks):
        model.blocks[i] = NameWrapper(block, "_fsdp_wrapped_module")
    outer = wrap(model, "_fsdp_wrapped_module", "module")
    raw = [n for n, _ in outer.named_parameters()]
    assert raw[0].startswith("module._fsdp_wrapped_module.")
    assert [clean_param_name(n) for n in raw] == plain


def test_plan_uses_clean_names_of_real_wrappers() -> None:
    model = make_gpt()
    model.h[0] = checkpoint_wrapper(model.h[0])
    plan = DecayRules().classify(torch.compile(model))
    assert [d.name for d in plan] == [d.name for d in DecayRules().classify(make_gpt())]
