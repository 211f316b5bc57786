"""Real LightningCLI runs from YAML: decay / no-decay groups from a config alone."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from lightning.pytorch.cli import LightningCLI

from lightning_decay import DecayLightningCLI, DecayRules, decay_param_groups
from tests.cli_app import InjectedModel, PlainModel, RegressionData, build_net

TRAINER = """
trainer:
  max_epochs: 2
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  default_root_dir: {root}
"""

# `--optimizer AdamW` from the command line, lr 0.05 and weight_decay 0.05.
ADAMW = ("--optimizer", "AdamW", "--optimizer.lr", "0.05", "--optimizer.weight_decay", "0.05")


def _run(cli_class: type[LightningCLI], model: type, tmp_path: Path, yaml: str, *args: str) -> LightningCLI:
    config = tmp_path / "config.yaml"
    config.write_text(TRAINER.format(root=tmp_path) + yaml)
    return cli_class(
        model, RegressionData, args=["fit", "--config", str(config), *args], save_config_kwargs={"overwrite": True}
    )


def _reference(
    optimizer: type[torch.optim.Optimizer], weight_decay: float, lr: float, epochs: int = 2
) -> torch.nn.Module:
    """The same training written by hand: ``optimizer`` on decay / no-decay groups."""
    net = build_net()
    opt = optimizer(decay_param_groups(net, weight_decay), lr=lr)
    for _ in range(epochs):
        for x, y in RegressionData().train_dataloader():
            opt.zero_grad()
            torch.nn.functional.mse_loss(net(x), y).backward()
            opt.step()
    return net


def _assert_same_weights(cli: LightningCLI, reference: torch.nn.Module) -> None:
    for (name, a), b in zip(cli.model.net.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)


def _groups(cli: LightningCLI) -> dict[str, float]:
    return {g["name"]: g["weight_decay"] for g in cli.trainer.optimizers[0].param_groups}


def test_injected_optimizer_from_yaml_gives_decay_groups(tmp_path: Path) -> None:
    yaml = """
model:
  optimizer:
    class_path: torch.optim.AdamW
    init_args: {lr: 0.05, weight_decay: 0.05}
  lr_scheduler:
    class_path: torch.optim.lr_scheduler.StepLR
    init_args: {step_size: 1, gamma: 0.5}
"""
    cli = _run(LightningCLI, InjectedModel, tmp_path, yaml)
    assert _groups(cli) == {"decay": 0.05, "no_decay": 0.0}
    assert all(g["lr"] == pytest.approx(0.05 * 0.5**2) for g in cli.trainer.optimizers[0].param_groups)


def test_plain_cli_automatic_optimizer_is_one_flat_group(tmp_path: Path) -> None:
    # The upstream behaviour (Lightning #20743) DecayLightningCLI exists to fix: biases decay too.
    cli = _run(LightningCLI, PlainModel, tmp_path, "", "--optimizer", "AdamW", "--optimizer.weight_decay", "0.05")
    groups = cli.trainer.optimizers[0].param_groups
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.05


def test_decay_cli_automatic_optimizer_gives_groups_and_scheduler_drives_all(tmp_path: Path) -> None:
    cli = _run(
        DecayLightningCLI,
        PlainModel,
        tmp_path,
        "",
        *ADAMW,
        "--lr_scheduler",
        "StepLR",
        "--lr_scheduler.step_size",
        "1",
        "--lr_scheduler.gamma",
        "0.5",
    )
    assert _groups(cli) == {"decay": 0.05, "no_decay": 0.0}
    assert all(g["lr"] == pytest.approx(0.05 * 0.5**2) for g in cli.trainer.optimizers[0].param_groups)


def test_decay_cli_weights_equal_hand_written_adamw_groups(tmp_path: Path) -> None:
    cli = _run(DecayLightningCLI, PlainModel, tmp_path, "", *ADAMW)
    _assert_same_weights(cli, _reference(torch.optim.AdamW, 0.05, 0.05))


@pytest.mark.parametrize(
    ("optimizer", "lr"),
    [(torch.optim.AdamW, 0.05), (torch.optim.SGD, 0.1)],
    ids=["adamw-decoupled", "sgd-coupled-l2"],
)
def test_weight_decay_callback_in_yaml_takes_over_automatic_optimizer(
    optimizer: type[torch.optim.Optimizer], lr: float, tmp_path: Path
) -> None:
    """Plain ``LightningCLI``: the callback alone turns ``--optimizer.weight_decay`` into grouped decay."""
    yaml = """
  callbacks:
    - class_path: lightning_decay.WeightDecay
"""
    args = ["--optimizer", optimizer.__name__, "--optimizer.lr", str(lr), "--optimizer.weight_decay", "0.05"]
    cli = _run(LightningCLI, PlainModel, tmp_path, yaml, *args)
    # The optimizer no longer decays (the callback took it over, with the optimizer's own semantics:
    # decoupled for AdamW, an L2 gradient term for SGD) and the weights match it on decay groups.
    assert [g["weight_decay"] for g in cli.trainer.optimizers[0].param_groups] == [0.0]
    _assert_same_weights(cli, _reference(optimizer, 0.05, lr))


def test_decay_section_help_is_plain_text(capsys: pytest.CaptureFixture[str]) -> None:
    # `fit --help` of the real CLI: the decay.rules.* help comes from DecayRules' docstring, written for the
    # docs site; the terminal gets it without RST/Markdown markup, and each option's default printed once.
    with pytest.raises(SystemExit) as exit_info:
        DecayLightningCLI(PlainModel, RegressionData, args=["fit", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    sections = [s for s in out.split("\n\n") if "--decay.rules.decay_bias" in s and "usage:" not in s]
    assert len(sections) == 1, out
    (section,) = sections
    for option in ("exclude", "include", "decay_bias", "decay_norm", "decay_embeddings", "use_model_hooks"):
        assert f"--decay.rules.{option}" in section
    assert "`" not in section, section
    assert "names ending in 'bias'" in " ".join(section.split())  # ``bias`` becomes a quoted word
    # once per boolean option that defaults to False (decay_bias, decay_norm, decay_vectors, decay_position_bias)
    false_options = [p for p in inspect.signature(DecayRules).parameters.values() if p.default is False]
    assert section.count("default: False") == len(false_options) >= 3 and "Default" not in section
