"""Corner cases of the classification (issue 18, items 10-12): RNN cell biases, class names that merely
contain "norm", and the position-bias tables of Hugging Face's T5, UMT5, Swin and BEiT.

The Hugging Face modules below are written here (no download) with HF's own class and attribute names, so
the parameter names are those of the real models; the reference is HF ``Trainer.get_decay_parameter_names``
(``hf_decay``), and the outcome is checked on the weights with torch's own ``AdamW``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_decay import DecayRules, decay_param_groups
from tests.test_rules import hf_decay, ours_decay, ours_no_decay, timm_no_decay
from tests.timm_like import SwinTransformer


def _decay_group_ids(model: nn.Module, **rules: bool) -> set[int]:
    groups = decay_param_groups(model, 0.1, rules=DecayRules(**rules))
    return {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}


def _adamw_step_with_zero_grads(model: nn.Module, lr: float = 0.1, wd: float = 0.1) -> dict[str, torch.Tensor]:
    """One real ``AdamW`` step on ``decay_param_groups``' groups with zero gradients (so only the decay acts);
    returns the weights before it."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(decay_param_groups(model, wd), lr=lr)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    return before


def _decayed_by_torch(weight: torch.Tensor, lr: float = 0.1, wd: float = 0.1) -> torch.Tensor:
    """torch's ``AdamW(weight_decay=wd)`` on a copy of ``weight``, zero gradient: the exact decayed value."""
    copy = nn.Parameter(weight.clone())
    copy.grad = torch.zeros_like(copy)
    torch.optim.AdamW([copy], lr=lr, weight_decay=wd).step()
    return copy.detach()


# ----------------------------------------------------------------------------------- 10. RNN cells
@pytest.mark.parametrize(
    "cell", [nn.LSTMCell(4, 3), nn.GRUCell(4, 3), nn.RNNCell(4, 3)], ids=lambda m: type(m).__name__
)
def test_rnn_cell_biases_follow_decay_bias(cell: nn.Module) -> None:
    default = DecayRules().classify(cell)
    biased = DecayRules(decay_bias=True).classify(cell)
    for name in ("bias_ih", "bias_hh"):
        assert not default[name].decay and default[name].reason == "bias"
        assert biased[name].decay and biased[name].reason == "bias (decay_bias=True)"
    assert _decay_group_ids(cell, decay_bias=True) == {id(p) for p in cell.parameters()}
    assert _decay_group_ids(cell) == {id(cell.weight_ih), id(cell.weight_hh)}


def test_rnn_cell_biases_are_treated_like_the_rnn_layers() -> None:
    # nn.LSTM's `bias_ih_l0` was already a bias; its cell's `bias_ih` now is too.
    lstm, cell = nn.LSTM(4, 3), nn.LSTMCell(4, 3)
    for rules in (DecayRules(), DecayRules(decay_bias=True), DecayRules(decay_vectors=True)):
        assert rules.classify(lstm)["bias_ih_l0"].decay == rules.classify(cell)["bias_ih"].decay
        assert rules.classify(lstm)["bias_hh_l0"].reason == rules.classify(cell)["bias_hh"].reason


# ------------------------------------------------------------------------- 11. class names with "norm"
class Enormous(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 4))
        self.bias = nn.Parameter(torch.zeros(4))


class NormalizingFlow(Enormous):
    pass


class Denormalizer(Enormous):
    pass


class NormalizedLinear(nn.Linear):
    pass


class WeightNormedConv(nn.Conv2d):
    pass


@pytest.mark.parametrize(
    ("layer", "reason"),
    [
        (Enormous(), "default (ndim >= 2)"),
        (NormalizingFlow(), "default (ndim >= 2)"),
        (Denormalizer(), "default (ndim >= 2)"),
        (NormalizedLinear(4, 4), "weight of NormalizedLinear"),
        (WeightNormedConv(2, 2, 3), "weight of WeightNormedConv"),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else "",
)
def test_names_that_merely_contain_norm_are_decayed_as_timm_and_hf_do(layer: nn.Module, reason: str) -> None:
    model = nn.ModuleDict({"inner": layer, "head": nn.Linear(4, 2)})
    plan = DecayRules().classify(model)
    assert plan["inner.weight"].decay and plan["inner.weight"].reason == reason
    assert not plan["inner.bias"].decay and plan["inner.bias"].reason == "bias"
    assert ours_no_decay(model) == timm_no_decay(model)
    assert ours_decay(model) == hf_decay(model)
    assert id(layer.weight) in _decay_group_ids(model)


def _norm_class(name: str, base: type[nn.Module] = nn.Module) -> nn.Module:
    cls = type(name, (base,), {})
    module = cls(4) if base is not nn.Module else cls()
    if base is nn.Module:
        module.weight = nn.Parameter(torch.ones(2, 4))  # a 2-D gain: only the norm rule keeps it out
    return module


@pytest.mark.parametrize(
    "name",
    ["LayerNorm2d", "LlamaRMSNorm", "T5LayerNorm", "LayerNormalization", "FusedLayerNorm", "GroupNorm1",
     "InstanceNorm1d", "BatchNorm2d", "LocalResponseNorm", "Layernorm", "ScaleNorm"],
)  # fmt: skip
def test_norm_layers_are_known_by_the_last_word_of_their_class_name(name: str) -> None:
    plan = DecayRules().classify(nn.ModuleDict({"norm": _norm_class(name), "fc": nn.Linear(4, 4)}))
    assert not plan["norm.weight"].decay and plan["norm.weight"].reason == f"normalization layer ({name})"
    assert plan["fc.weight"].decay


def test_subclasses_of_torch_norm_layers_are_norm_layers_whatever_their_name() -> None:
    plan = DecayRules().classify(nn.ModuleDict({"a": _norm_class("Scaler", nn.LayerNorm), "b": nn.Linear(4, 4)}))
    assert not plan["a.weight"].decay and plan["a.weight"].reason == "normalization layer (Scaler)"


# ------------------------------------------------------------------- 12. HF T5 / UMT5 (written here)
class T5LayerNorm(nn.Module):
    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))


class T5Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, has_relative_attention_bias: bool, num_buckets: int = 8) -> None:
        super().__init__()
        self.q = nn.Linear(d_model, d_model, bias=False)
        self.k = nn.Linear(d_model, d_model, bias=False)
        self.v = nn.Linear(d_model, d_model, bias=False)
        self.o = nn.Linear(d_model, d_model, bias=False)
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(num_buckets, n_heads)


class T5LayerSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, has_relative_attention_bias: bool) -> None:
        super().__init__()
        self.SelfAttention = T5Attention(d_model, n_heads, has_relative_attention_bias)
        self.layer_norm = T5LayerNorm(d_model)


class T5DenseActDense(nn.Module):
    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.wi = nn.Linear(d_model, 2 * d_model, bias=False)
        self.wo = nn.Linear(2 * d_model, d_model, bias=False)


class T5LayerFF(nn.Module):
    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.DenseReluDense = T5DenseActDense(d_model)
        self.layer_norm = T5LayerNorm(d_model)


class T5Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, has_relative_attention_bias: bool) -> None:
        super().__init__()
        self.layer = nn.ModuleList(
            [T5LayerSelfAttention(d_model, n_heads, has_relative_attention_bias), T5LayerFF(d_model)]
        )


class T5Stack(nn.Module):
    def __init__(self, embed_tokens: nn.Embedding, d_model: int, n_heads: int, n_layers: int, umt5: bool) -> None:
        super().__init__()
        self.embed_tokens = embed_tokens
        # T5: only the first block holds the table; UMT5: every block has its own.
        self.block = nn.ModuleList(T5Block(d_model, n_heads, umt5 or i == 0) for i in range(n_layers))
        self.final_layer_norm = T5LayerNorm(d_model)


class T5ForConditionalGeneration(nn.Module):
    def __init__(self, vocab: int = 32, d_model: int = 8, n_heads: int = 2, n_layers: int = 2, umt5: bool = False):
        super().__init__()
        self.shared = nn.Embedding(vocab, d_model)
        self.encoder = T5Stack(self.shared, d_model, n_heads, n_layers, umt5)
        self.decoder = T5Stack(self.shared, d_model, n_heads, n_layers, umt5)
        self.lm_head = nn.Linear(d_model, vocab, bias=False)


def _t5_tables(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters() if "relative_attention_bias" in n]


@pytest.mark.parametrize("umt5", [False, True], ids=["t5", "umt5"])
def test_hf_t5_relative_attention_bias_is_not_decayed(umt5: bool) -> None:
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(umt5=umt5)
    tables = _t5_tables(model)
    assert len(tables) == (4 if umt5 else 2)  # 2 stacks x (each of 2 blocks | the first block)
    plan = DecayRules().classify(model)
    for name in tables:
        assert not plan[name].decay and plan[name].reason == "position bias table"
        assert plan.explain(name) == f"{name}: no_decay (position bias table)"
    assert plan["shared.weight"].decay  # the token embedding still decays, as in HF and timm
    assert ours_decay(model) == hf_decay(model)  # T5 has no other 1-D tensor than its norms'
    # On the weights: a real AdamW step with zero gradients leaves every table as it was, and decays the
    # matrices exactly as torch's AdamW(weight_decay) does.
    before = _adamw_step_with_zero_grads(model)
    params = dict(model.named_parameters())
    for name in tables:
        assert torch.equal(params[name], before[name])
    q = "encoder.block.0.layer.0.SelfAttention.q.weight"
    assert torch.equal(params[q], _decayed_by_torch(before[q]))
    assert not torch.equal(params[q], before[q])


def test_position_bias_option_decays_the_tables_again() -> None:
    model = T5ForConditionalGeneration()
    plan = DecayRules(decay_position_bias=True).classify(model)
    for name in _t5_tables(model):
        assert plan[name].decay and plan[name].reason == "position bias table (decay_position_bias=True)"
    assert {id(p) for n, p in model.named_parameters() if n in _t5_tables(model)} <= _decay_group_ids(
        model, decay_position_bias=True
    )
    assert "decay_position_bias=True" in repr(DecayRules(decay_position_bias=True))
    # The user's own rules still come first.
    name = _t5_tables(model)[0]
    assert DecayRules(include=["*relative_attention_bias*"]).classify(model)[name].decay
    assert not DecayRules(exclude=["*relative_attention_bias*"], decay_position_bias=True).classify(model)[name].decay


# ---------------------------------------------------------------------------- 12. HF Swin (written here)
class SwinPatchEmbeddings(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.projection = nn.Conv2d(3, dim, 4, stride=4)


class SwinEmbeddings(nn.Module):
    def __init__(self, dim: int, num_patches: int = 16) -> None:
        super().__init__()
        self.patch_embeddings = SwinPatchEmbeddings(dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.position_embeddings = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        self.norm = nn.LayerNorm(dim)


class SwinSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, window: int) -> None:
        super().__init__()
        self.relative_position_bias_table = nn.Parameter(torch.randn((2 * window - 1) * (2 * window - 1), heads))
        self.register_buffer("relative_position_index", torch.zeros(window**2, window**2, dtype=torch.long))
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)


class SwinSelfOutput(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, dim)


class SwinAttention(nn.Module):
    def __init__(self, dim: int, heads: int, window: int) -> None:
        super().__init__()
        self.self = SwinSelfAttention(dim, heads, window)
        self.output = SwinSelfOutput(dim)


class SwinLayer(nn.Module):
    def __init__(self, dim: int, heads: int = 2, window: int = 2) -> None:
        super().__init__()
        self.layernorm_before = nn.LayerNorm(dim)
        self.attention = SwinAttention(dim, heads, window)
        self.layernorm_after = nn.LayerNorm(dim)
        self.intermediate = nn.ModuleDict({"dense": nn.Linear(dim, 2 * dim)})
        self.output = nn.ModuleDict({"dense": nn.Linear(2 * dim, dim)})


class SwinPatchMerging(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)


class SwinStage(nn.Module):
    def __init__(self, dim: int, depth: int, downsample: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(SwinLayer(dim) for _ in range(depth))
        self.downsample = SwinPatchMerging(dim) if downsample else None


class SwinModel(nn.Module):
    def __init__(self, dim: int = 4) -> None:
        super().__init__()
        self.embeddings = SwinEmbeddings(dim)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList([SwinStage(dim, 2, True), SwinStage(2 * dim, 2, False)])
        self.layernorm = nn.LayerNorm(2 * dim)


def test_hf_swin_relative_position_bias_tables_are_not_decayed() -> None:
    torch.manual_seed(0)
    model = SwinModel()
    tables = [n for n, _ in model.named_parameters() if n.endswith("relative_position_bias_table")]
    assert len(tables) == 4 and all(len(dict(model.named_parameters())[n].shape) == 2 for n in tables)
    plan = DecayRules().classify(model)
    for name in tables:
        assert not plan[name].decay and plan[name].reason == "position bias table"
    assert plan["embeddings.position_embeddings"].decay  # HF decays its absolute position embedding too
    assert ours_decay(model) == hf_decay(model)
    before = _adamw_step_with_zero_grads(model)
    params = dict(model.named_parameters())
    for name in tables:
        assert torch.equal(params[name], before[name])


def test_timm_swin_tables_keep_the_reason_of_its_no_weight_decay_hook() -> None:
    # timm 1.0's Swin lists its tables in no_weight_decay(): the hook (level 5) decides before the built-in rule.
    model = SwinTransformer()
    plan = DecayRules().classify(model)
    tables = [d for d in plan if d.name.endswith("relative_position_bias_table")]
    assert tables and all(not d.decay and d.reason == f"no_weight_decay() {d.name!r}" for d in tables)
    assert ours_no_decay(model) == timm_no_decay(model)


# ---------------------------------------------------------------------------- 12. HF BEiT (written here)
class BeitRelativePositionBias(nn.Module):
    def __init__(self, window: int, heads: int) -> None:
        super().__init__()
        num_relative_distance = (2 * window - 1) * (2 * window - 1) + 3
        self.relative_position_bias_table = nn.Parameter(torch.randn(num_relative_distance, heads))


class BeitSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, window: int | None) -> None:
        super().__init__()
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim, bias=False)
        self.value = nn.Linear(dim, dim)
        if window is not None:
            self.relative_position_bias = BeitRelativePositionBias(window, heads)


class BeitAttention(nn.Module):
    def __init__(self, dim: int, heads: int, window: int | None) -> None:
        super().__init__()
        self.attention = BeitSelfAttention(dim, heads, window)
        self.output = nn.ModuleDict({"dense": nn.Linear(dim, dim)})


class BeitLayer(nn.Module):
    def __init__(self, dim: int, heads: int, window: int | None, layer_scale: float = 0.1) -> None:
        super().__init__()
        self.attention = BeitAttention(dim, heads, window)
        self.intermediate = nn.ModuleDict({"dense": nn.Linear(dim, 2 * dim)})
        self.output = nn.ModuleDict({"dense": nn.Linear(2 * dim, dim)})
        self.layernorm_before = nn.LayerNorm(dim)
        self.layernorm_after = nn.LayerNorm(dim)
        self.lambda_1 = nn.Parameter(layer_scale * torch.ones(dim))
        self.lambda_2 = nn.Parameter(layer_scale * torch.ones(dim))


class BeitEmbeddings(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.patch_embeddings = nn.ModuleDict({"projection": nn.Conv2d(3, dim, 4, stride=4)})


class BeitEncoder(nn.Module):
    def __init__(self, dim: int, heads: int, window: int, shared: bool, n_layers: int = 2) -> None:
        super().__init__()
        if shared:
            self.relative_position_bias = BeitRelativePositionBias(window, heads)
        self.layer = nn.ModuleList(BeitLayer(dim, heads, None if shared else window) for _ in range(n_layers))


class BeitModel(nn.Module):
    def __init__(self, dim: int = 8, heads: int = 2, window: int = 2, shared: bool = False) -> None:
        super().__init__()
        self.embeddings = BeitEmbeddings(dim)
        self.encoder = BeitEncoder(dim, heads, window, shared)
        self.pooler = nn.ModuleDict({"layernorm": nn.LayerNorm(dim)})


@pytest.mark.parametrize("shared", [False, True], ids=["per_layer", "shared"])
def test_hf_beit_tables_not_decayed_layer_scale_stays_not_decayed(shared: bool) -> None:
    torch.manual_seed(0)
    model = BeitModel(shared=shared)
    tables = [n for n, _ in model.named_parameters() if n.endswith("relative_position_bias_table")]
    assert len(tables) == (1 if shared else 2)
    plan = DecayRules().classify(model)
    for name in tables:
        assert not plan[name].decay and plan[name].reason == "position bias table"
    lambdas = {f"encoder.layer.{i}.lambda_{k}" for i in range(2) for k in (1, 2)}
    for name in lambdas:  # 1-D layer scale: not decayed, as before (HF's Trainer decays it)
        assert not plan[name].decay and plan[name].reason == "ndim <= 1"
    assert plan["embeddings.cls_token"].decay and plan["embeddings.mask_token"].decay  # 3-D, as HF
    assert hf_decay(model) - ours_decay(model) == lambdas
    assert ours_decay(model) <= hf_decay(model)
    before = _adamw_step_with_zero_grads(model)
    params = dict(model.named_parameters())
    for name in (*tables, *lambdas):
        assert torch.equal(params[name], before[name])
    dense = "encoder.layer.0.intermediate.dense.weight"
    assert torch.equal(params[dense], _decayed_by_torch(before[dense]))


def test_clip_class_embedding_stays_not_decayed() -> None:
    class CLIPVisionEmbeddings(nn.Module):
        def __init__(self, dim: int = 8, num_positions: int = 5) -> None:
            super().__init__()
            self.class_embedding = nn.Parameter(torch.randn(dim))
            self.patch_embedding = nn.Conv2d(3, dim, 4, stride=4, bias=False)
            self.position_embedding = nn.Embedding(num_positions, dim)

    model = nn.ModuleDict({"embeddings": CLIPVisionEmbeddings(), "pre_layrnorm": nn.LayerNorm(8)})
    plan = DecayRules().classify(model)
    assert not plan["embeddings.class_embedding"].decay and plan["embeddings.class_embedding"].reason == "ndim <= 1"
    assert plan["embeddings.position_embedding.weight"].decay
    assert hf_decay(model) - ours_decay(model) == {"embeddings.class_embedding"}


# ----------------------------------------------------------------- 14. the faster hook lookup, same result
def test_hooks_set_on_an_instance_or_forwarded_by_a_wrapper_are_honored() -> None:
    inner = nn.ModuleDict({"a": nn.Linear(4, 4), "b": nn.Linear(4, 4)})
    inner.no_weight_decay = lambda: {"a.weight"}  # a hook on the instance, not its class
    plan = DecayRules().classify(inner)
    assert not plan["a.weight"].decay and plan["a.weight"].reason == "no_weight_decay() 'a.weight'"
    assert plan["b.weight"].decay

    class Forwarding(nn.Module):  # a wrapper whose __getattr__ forwards to the model it holds, as PEFT's do
        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model

        def __getattr__(self, name: str):
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(self.model, name)

    wrapper = Forwarding(nn.ModuleDict({"w": nn.Linear(4, 4)}))
    wrapper.model.no_weight_decay_keywords = lambda: ["w.weight"]
    plan = DecayRules().classify(wrapper)
    # The wrapper's forwarded hook is read as the wrapper's own (its names are relative to the wrapper);
    # both readings give no decay here, through the first one met (the wrapper's, outermost).
    assert not plan["model.w.weight"].decay
    assert plan["model.w.weight"].reason == "no_weight_decay_keywords() 'w.weight'"
