"""The framework-free norm kernels of ``lightning_decay.norms`` against ``torch.linalg.vector_norm``."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from lightning_decay import norms as K

INF = math.inf


def _tensors() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [
        torch.randn(3, 4, generator=g),
        torch.randn(5, generator=g).to(torch.bfloat16),
        torch.randn(2, 2, generator=g).double(),
        torch.zeros(0),
        torch.randn(7, generator=g).half(),
    ]


@pytest.mark.parametrize("ord", [0, 1, 2, INF])
def test_grouped_norms_match_vector_norm_in_input_order(ord: float) -> None:
    tensors = _tensors()
    got = K.grouped_norms(tensors, ord, dtype=torch.float64)
    want = torch.stack(
        [
            torch.linalg.vector_norm(t.double(), ord) if t.numel() else torch.zeros((), dtype=torch.float64)
            for t in tensors
        ]
    )
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_low_precision_is_accumulated_in_float32() -> None:
    # 4097 is not a bf16 number (spacing 32 there): a bf16 result cannot hold it, an fp32 one does.
    ones = torch.ones(4097, dtype=torch.bfloat16)
    assert K.grouped_norms([ones], 1, dtype=torch.float32).item() == 4097.0
    assert torch._foreach_norm([ones], 1)[0].item() != 4097.0  # what the default would have given


def test_one_foreach_norm_per_device_dtype_group(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = torch._foreach_norm

    def counting(tensors, *args, **kwargs):
        calls.append(len(tensors))
        return real(tensors, *args, **kwargs)

    monkeypatch.setattr(torch, "_foreach_norm", counting)
    K.grouped_norms(_tensors(), 2)
    # float32 (the empty tensor is left out), bfloat16, float64, float16
    assert sorted(calls) == [1, 1, 1, 1]
    calls.clear()
    K.grouped_norms([torch.randn(3), torch.randn(4), torch.randn(2, 2)], 2)
    assert calls == [3]


@pytest.mark.parametrize("norm_type", [1.0, 2.0, INF])
def test_partials_combine_into_bucket_norms(norm_type: float) -> None:
    tensors = [torch.randn(4), torch.randn(3, 3), torch.randn(2), torch.randn(5)]
    index = torch.tensor([1, 0, 1, 1])
    parts = K.partials(tensors, norm_type)
    got = K.finalize_partials(K.combine_partials(parts, index, 2, norm_type), norm_type)
    want = torch.stack(
        [
            torch.linalg.vector_norm(tensors[1], norm_type),
            torch.linalg.vector_norm(torch.cat([tensors[0], tensors[2], tensors[3]]), norm_type),
        ]
    )
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("norm_type", [1.0, 2.0, INF])
def test_combine_propagates_nan(norm_type: float) -> None:
    parts = K.partials([torch.tensor([1.0, float("nan")]), torch.ones(2)], norm_type)
    out = K.combine_partials(parts, torch.tensor([0, 0]), 1, norm_type)
    assert torch.isnan(out).all()


@pytest.mark.parametrize("norm_type", [1.0, 2.0, INF])
def test_combine_all_partials_is_the_norm_of_every_tensor(norm_type: float) -> None:
    tensors = [torch.randn(4), torch.randn(3, 3), torch.zeros(0)]
    got = K.finalize_partials(K.combine_all_partials(K.partials(tensors, norm_type), norm_type), norm_type)
    want = torch.linalg.vector_norm(torch.cat([t.reshape(-1) for t in tensors]), norm_type)
    assert got.shape == (1,)
    torch.testing.assert_close(got[0], want)
    empty = K.combine_all_partials(torch.zeros(0), norm_type)  # no tensor: 0, not an error from ``amax``
    assert empty.tolist() == [0.0]
    assert torch.isnan(K.combine_all_partials(torch.tensor([1.0, math.nan]), norm_type)).all()


@pytest.mark.parametrize("norm_type", [1.0, 2.0, INF])
def test_masked_norms_are_the_norms_of_the_selected_tensors(norm_type: float) -> None:
    tensors = [torch.randn(4, dtype=torch.float64), torch.randn(3, 3, dtype=torch.float64), torch.randn(2).double()]
    norms = K.grouped_norms(tensors, norm_type, dtype=torch.float64)
    mask = torch.tensor([[True, True, True], [True, False, True], [False, False, False]])
    got = K.masked_norms(norms, mask, norm_type)
    flat = [t.reshape(-1) for t in tensors]
    want = [
        torch.linalg.vector_norm(torch.cat([f for f, m in zip(flat, row, strict=True) if m]), norm_type)
        for row in mask[:2]
    ]
    torch.testing.assert_close(got, torch.stack([*want, torch.zeros((), dtype=torch.float64)]))
    torch.testing.assert_close(K.masked_norms(norms, mask, norm_type, norms.new_zeros(())), got)
    # A NaN or Inf norm reaches only the rows that select it.
    bad = torch.tensor([math.inf, 1.0, math.nan], dtype=torch.float64)
    out = K.masked_norms(bad, torch.tensor([[True, True, False], [False, True, False], [False, True, True]]), norm_type)
    assert math.isinf(out[0]) and out[1] == 1.0 and math.isnan(out[2])
    assert K.masked_norms(torch.zeros(0), torch.zeros(2, 0, dtype=torch.bool), norm_type).tolist() == [0.0, 0.0]


def test_sharded_partials_equal_the_global_norm() -> None:
    # What the all_reduce does across ranks, done by hand: partials of the shards add up (max for inf).
    full = torch.randn(10, 3)
    shards = list(full.chunk(3))
    for norm_type in (1.0, 2.0, INF):
        parts = K.partials(shards, norm_type)
        reduced = parts.max() if K.reduce_op(norm_type) == "max" else parts.sum()
        torch.testing.assert_close(K.finalize_partials(reduced, norm_type), torch.linalg.vector_norm(full, norm_type))


def test_clone_and_sub_tensors() -> None:
    tensors = _tensors()[:3]
    copies = K.clone_tensors(tensors)
    for t, c in zip(tensors, copies, strict=True):
        assert c.dtype == t.dtype and torch.equal(c, t) and c.data_ptr() != t.data_ptr()
    diffs = K.sub_tensors(tensors, copies)
    assert all(d.abs().max() == 0 for d in diffs)


def test_sub_tensors_in_place_is_the_negated_difference() -> None:
    a, b = _tensors()[:3], [t * 1.5 + 0.25 for t in _tensors()[:3]]
    want = [-d for d in K.sub_tensors(b, a)]  # -(b - a) is exactly a - b in IEEE arithmetic
    storages = [t.data_ptr() for t in a]
    K.sub_tensors_(a, b)
    assert [t.data_ptr() for t in a] == storages  # in place: no new copy
    for got, w in zip(a, want, strict=True):
        assert got.dtype == w.dtype and torch.equal(got, w)


@pytest.mark.parametrize("ord", [0, 1, 2, INF])
def test_tensor_groups_built_once_give_grouped_norms(ord: float) -> None:
    tensors = _tensors()  # four dtypes and an empty tensor: the stacked groups are put back in input order
    groups = K.TensorGroups(tensors)
    assert groups.order is not None and len(groups.groups) == 4
    for _ in range(2):  # reusable
        torch.testing.assert_close(
            groups.norms(ord, dtype=torch.float64), K.grouped_norms(tensors, ord, dtype=torch.float64), rtol=0, atol=0
        )
    same = K.TensorGroups([torch.randn(3), torch.randn(2, 2)])
    assert same.order is None  # one group in input order: no reordering at all
    assert K.TensorGroups([]).norms(2).shape == (0,)
    assert K.partials(groups, 2.0).shape == (5,)


def test_accumulate_float32_keeps_float32_kernels_and_widens_low_precision() -> None:
    x32 = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    ones = torch.ones(4097, dtype=torch.bfloat16)
    x64 = x32.double()
    got = K.grouped_norms([x32, ones, x64], 2, dtype=torch.float64, accumulate=torch.float32)
    assert got.dtype == torch.float64
    assert got[0].item() == torch.linalg.vector_norm(x32).item()  # the float32 kernel's value, widened
    assert got[1].item() == torch.tensor(4097.0).sqrt().item()  # bf16 summed in float32 (in bf16: 4096)
    assert got[2].item() == torch.linalg.vector_norm(x64).item()  # float64 reduced in its own dtype
    # The default (``accumulate=dtype``) is a float64 kernel for the float32 tensor: exact to 1e-12.
    wide = K.grouped_norms([x32], 2, dtype=torch.float64)
    assert wide.item() == pytest.approx(torch.linalg.vector_norm(x64).item(), rel=1e-12)


def test_plain_tensors_are_not_sharded() -> None:
    t = torch.randn(3)
    assert not K.is_sharded(t)
    assert K.local_tensor(t) is t
    assert K.contributes_to_sum(t)  # no process group: this is the only copy


@pytest.mark.parametrize("value", [1, 2, 1.0, 2.0, INF, "inf", "INF"])
def test_parse_norm_type_accepts(value: object) -> None:
    assert K.parse_norm_type(value) in (1.0, 2.0, INF)


@pytest.mark.parametrize("value", [0, 3, -1, True, "2", None, 1.5])
def test_parse_norm_type_rejects(value: object) -> None:
    with pytest.raises(ValueError, match="norm_type"):
        K.parse_norm_type(value)


def _sharded_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3))
        full = {n: p.detach().clone() for n, p in model.named_parameters()}
        fully_shard(model)
        params = list(model.parameters())
        assert all(K.is_sharded(p) for p in params)
        out = {}
        for norm_type in (1.0, 2.0, INF):
            parts = K.partials([K.local_tensor(p) for p in params], norm_type, dtype=torch.float64)
            mask = torch.tensor([K.contributes_to_sum(p) for p in params])
            if K.reduce_op(norm_type) == "sum":
                parts = torch.where(mask, parts, torch.zeros_like(parts))  # replicas count once
                K.all_reduce_partials(parts, None)
            else:
                K.all_reduce_partials(None, parts)
            out[norm_type] = K.finalize_partials(parts, norm_type).tolist()
        want = {
            t: [torch.linalg.vector_norm(full[n].double(), t).item() for n, _ in model.named_parameters()]
            for t in (1.0, 2.0, INF)
        }
        torch.save((out, want), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_fsdp2_shards_reduce_to_the_global_norm(tmp_path: Any) -> None:
    """Two gloo ranks, ``fully_shard`` on CPU: local partials + one all_reduce = the unsharded norm."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: the children inherit the imports, which keeps this test at a few seconds.
    mp.start_processes(_sharded_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True, start_method="fork")
    for rank in range(2):
        out, want = torch.load(tmp_path / f"rank{rank}.pt")
        for norm_type, values in out.items():
            assert values == pytest.approx(want[norm_type], rel=1e-9)


@pytest.mark.parametrize("ord", [0, 1, 2, INF])
def test_large_float32_tensors_in_float64_are_reduced_in_slices(ord: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """A float64 kernel on float32 tensors copies each one to float64: a large one is reduced as flat slices
    (views) whose norms are combined. Same values as one float64 reduction, up to the order of the sums."""
    g = torch.Generator().manual_seed(0)
    big = torch.randn(300, 200, generator=g)
    big[0, :7] = 0.0  # exact zeros for p=0
    tensors = [torch.randn(5, generator=g), big, torch.randn(4, 4, generator=g), torch.randn(100, 70, generator=g)]
    monkeypatch.setattr(K, "SLICE_BYTES", 4096)  # the two larger tensors are cut, into 1024-entry slices
    groups = K.TensorGroups(tensors)
    assert groups._large == [[1, 3]]
    got = groups.norms(ord, dtype=torch.float64)
    want = torch.stack([torch.linalg.vector_norm(t.double(), ord) for t in tensors])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    # float32 kernels copy nothing: those are not cut, and bitwise one `_foreach_norm`.
    plain = groups.norms(ord, dtype=torch.float64, accumulate=torch.float32)
    assert torch.equal(plain, torch.stack(torch._foreach_norm(tensors, ord)).double())


def test_a_float64_norm_of_a_large_float32_tensor_copies_one_slice() -> None:
    from tests.test_kernels import peak_cpu_bytes

    big = [torch.randn(1024, 1024)]  # 4 MiB; a float64 copy would be 8 MiB
    groups = K.TensorGroups(big)
    slice_bytes = 4 * 2**20 // K.SLICE_FRACTION
    assert 0 < peak_cpu_bytes(lambda: groups.norms(2, dtype=torch.float64)) <= 2 * slice_bytes + 4096


@pytest.mark.parametrize("mixed", [False, True], ids=["one-group", "mixed-dtypes"])
def test_a_split_like_another_gives_the_norms_of_a_fresh_split(mixed: bool) -> None:
    """``like``: tensors mirroring the split's (gradients, a snapshot) reuse its grouping, same results."""
    tensors = _tensors() if mixed else [t.float() for t in _tensors() if t.numel()]
    groups = K.TensorGroups(tensors)
    assert groups.simple is not mixed
    mirror = [torch.randn_like(t) for t in tensors]
    for ord in (0, 1, 2, INF):
        assert torch.equal(
            groups.like(mirror).norms(ord, torch.float64), K.TensorGroups(mirror).norms(ord, torch.float64)
        )
    with pytest.raises(ValueError, match="like"):
        groups.like(mirror[:-1])
    if not mixed:
        copies = groups.clone()
        assert all(c is not t and torch.equal(c, t) for c, t in zip(copies, tensors, strict=True))
        groups.like(copies).sub_(groups)
        assert all(not c.any() for c in copies)


def test_update_ratios_and_angles_are_defined_for_zero_norms() -> None:
    """Squared norms ``(||a||², ||b||², ||b - a||²)``: zero norms give 0 / 1 ratios and 0 angles, never inf or NaN."""
    a2 = torch.tensor([4.0, 0.0, 0.0, 4.0, 1.0], dtype=torch.float64)
    b2 = torch.tensor([4.0, 0.0, 9.0, 0.0, 1.0], dtype=torch.float64)
    d2 = torch.tensor([8.0, 0.0, 9.0, 4.0, 0.0], dtype=torch.float64)  # a ⊥ b, both 0, 0 -> b, a -> 0, a == b
    ratio = K.update_ratios(a2, d2)
    angle = K.angular_updates(a2, b2, d2)
    assert ratio.tolist() == [math.sqrt(2.0), 0.0, 1.0, 1.0, 0.0]
    torch.testing.assert_close(angle, torch.tensor([math.pi / 2, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64))


def test_nonzero_counts_beyond_float32_exact_integers_are_exact() -> None:
    """``ord=0`` in float32 kernels (no float64 copy of the weights): a tensor of more than 2**24 entries is
    counted in slices, so its count is exact, as ``torch.count_nonzero`` gives it."""
    big = torch.ones(2**24 + 7)
    big[:4] = 0.0
    tensors = [big, torch.zeros(3), torch.tensor([0.0, 2.0, -1.0])]
    counts = K.TensorGroups(tensors).norms(0, dtype=torch.float64, accumulate=torch.float32)
    assert counts.tolist() == [float(torch.count_nonzero(t)) for t in tensors]
    assert torch.stack(torch._foreach_norm([big], 0)).item() != 2**24 + 3  # one float32 kernel would round
