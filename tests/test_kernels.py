"""The foreach kernels against per-tensor reference loops, and the shape of the per-step hot path."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from itertools import pairwise
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_decay import WeightDecay, WeightPenalty, kernels
from tests.bench import load_benchmark
from tests.test_penalty import Lit, fit

DTYPES = [torch.float32, torch.bfloat16]


def tensors(dtype: torch.dtype, seed: int = 0, zeros: bool = True) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(3, 4), (5,), (2, 3, 2), ()]
    out = [torch.randn(s, generator=g).to(dtype) for s in shapes]
    if zeros:
        out[0][0, 0] = 0.0  # sign(0) == 0
    return out


def clones(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.clone() for t in ts]


def tol(dtype: torch.dtype) -> dict[str, float]:
    """float32: round-off only; bfloat16: one rounding of a float32 reference (8 mantissa bits)."""
    return {"rtol": 1e-2, "atol": 4e-3} if dtype == torch.bfloat16 else {"rtol": 1e-6, "atol": 1e-6}


def assert_lists_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_refs", [False, True])
def test_add_l2_gradient(dtype: torch.dtype, with_refs: bool) -> None:
    w, g = tensors(dtype, 0), tensors(dtype, 1)
    refs = tensors(dtype, 2) if with_refs else None
    got = clones(g)
    kernels.add_l2_gradient_(got, w, 0.3, refs)
    want = []  # per tensor, in float32
    for i, (gi, wi) in enumerate(zip(g, w, strict=True)):
        ref = refs[i].float() if refs else torch.zeros(())
        want.append((gi.float() + 0.3 * (wi.float() - ref)).to(dtype))
    for x, y in zip(got, want, strict=True):
        assert x.dtype == dtype
        torch.testing.assert_close(x, y, **tol(dtype))
    # a 0-dim tensor coefficient (the AMP scale) gives the same values as the float
    got_t = clones(g)
    kernels.add_l2_gradient_(got_t, w, torch.tensor(0.3, dtype=torch.float32), refs)
    for x, y in zip(got_t, want, strict=True):
        torch.testing.assert_close(x, y, **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_l1_subgradient(dtype: torch.dtype) -> None:
    w, g = tensors(dtype, 0), tensors(dtype, 1)
    got = clones(g)
    kernels.add_l1_subgradient_(got, w, 0.25)
    want = [gi.add(torch.sign(wi), alpha=0.25) for gi, wi in zip(g, w, strict=True)]
    assert_lists_equal(got, want)
    assert got[0][0, 0] == g[0][0, 0]  # subgradient 0 at w == 0
    got_t = clones(g)
    kernels.add_l1_subgradient_(got_t, w, torch.tensor(0.25))
    for x, y in zip(got_t, want, strict=True):
        torch.testing.assert_close(x, y, **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threshold", [0.0, 0.4, 10.0])
def test_soft_threshold(dtype: torch.dtype, threshold: float) -> None:
    w = tensors(dtype, 0)
    got = clones(w)
    kernels.soft_threshold_(got, threshold)
    want = [torch.sign(t) * torch.clamp(t.abs() - threshold, min=0) for t in w]
    assert_lists_equal(got, want)
    if threshold == 10.0:
        assert all((t == 0).all() for t in got)
    if threshold == 0.0:
        assert_lists_equal(got, w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_soft_threshold_is_bitwise_the_explicit_formula(dtype: torch.dtype) -> None:
    """Against ``sign(w) * max(|w| - t, 0)`` bit for bit (``-0.0`` for shrunk negative weights, NaN kept) on many
    values and thresholds, including exact zeros, values at +-t, +-inf and NaN, in every chunking (whole tensors
    and flat slices of one tensor, which take another code path); a 0-dim tensor threshold gives the same."""
    g = torch.Generator().manual_seed(0)
    for t in (0.0, 1e-3, 0.1234567, 0.4, 3.0):
        w = [(torch.randn(4000, generator=g) * scale).to(dtype) for scale in (1e-3, 1.0, 10.0)]
        w[1][:8] = torch.tensor([0.0, -0.0, t, -t, float("inf"), -float("inf"), float("nan"), 2 * t]).to(dtype)
        want = [torch.sign(x) * torch.clamp(x.abs() - t, min=0) for x in w]
        sliced = [(i, i + 1, lo, lo + 999) for i in range(3) for lo in range(0, 4000, 999)]
        sliced = [(i, j, lo, min(hi, 4000)) for i, j, lo, hi in sliced]
        for chunks in (None, [(0, 3)], [(0, 1), (1, 3)], sliced):
            for threshold in (t, torch.tensor(t, dtype=torch.float64)):  # the Python float's value
                got = clones(w)
                kernels.soft_threshold_(got, threshold, chunks)
                assert_bitwise(got, want)
                shrunk = got[1][:8]
                assert shrunk[:2].eq(0).all() and torch.isinf(shrunk[4:6]).all() and torch.isnan(shrunk[6])
                assert (got[0] == 0).any() or t == 0.0  # small weights are set to exact zeros
                assert torch.signbit(got[0][(w[0] < 0) & (got[0] == 0)]).all()  # -0.0, as the formula gives


@pytest.mark.parametrize("dtype", DTYPES)
def test_decay(dtype: torch.dtype) -> None:
    w = tensors(dtype, 0)
    got = clones(w)
    kernels.decay_(got, 0.9)
    for x, t in zip(got, w, strict=True):
        assert x.dtype == dtype
        torch.testing.assert_close(x, (t.float() * 0.9).to(dtype), **tol(dtype))
    got_t = clones(w)
    kernels.decay_(got_t, torch.tensor(1.0))  # the factor of a step the GradScaler skips
    assert_lists_equal(got_t, w)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_refs", [False, True])
def test_squared_distances(dtype: torch.dtype, with_refs: bool) -> None:
    w = tensors(dtype, 0)
    refs = tensors(dtype, 2) if with_refs else None
    got = kernels.squared_distances(w, refs)
    for i, (value, t) in enumerate(zip(got, w, strict=True)):
        diff = (t - refs[i]) if refs else t
        assert value.dtype == torch.float32 and value.dim() == 0
        torch.testing.assert_close(value, diff.float().pow(2).sum(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sum_abs(dtype: torch.dtype) -> None:
    w = tensors(dtype, 0)
    got = kernels.sum_abs(w)
    for value, t in zip(got, w, strict=True):
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, t.float().abs().sum(), rtol=1e-5, atol=1e-6)


def test_empty_lists_are_no_ops() -> None:
    kernels.add_l2_gradient_([], [], 0.1)
    kernels.add_l2_gradient_([], [], 0.1, [])
    kernels.add_l1_subgradient_([], [], 0.1)
    kernels.soft_threshold_([], 0.1)
    kernels.decay_([], 0.5)
    assert kernels.squared_distances([]) == []
    assert kernels.sum_abs([]) == []


def _check_chunks(ts: list[torch.Tensor], chunks: list[tuple[int, ...]], limit: int) -> None:
    """Every entry of every tensor in exactly one chunk, in order; each chunk within ``limit`` bytes unless it
    is one tensor that cannot be cut (no flat view)."""
    covered: list[tuple[int, int, int]] = []  # (tensor, lo, hi) in chunk order
    for c in chunks:
        if len(c) == 2:
            a, b = c
            assert a < b
            covered += [(i, 0, ts[i].numel()) for i in range(a, b)]
            nbytes = sum(t.numel() * 4 for t in ts[a:b])
            assert nbytes <= limit or (b - a == 1 and not ts[a].is_contiguous()), c
        else:
            i, stop, lo, hi = c
            assert stop == i + 1 and 0 <= lo < hi <= ts[i].numel() and ts[i].is_contiguous()
            assert (hi - lo) * 4 <= max(limit, 4)  # at least one entry
            covered.append((i, lo, hi))
    merged: list[tuple[int, int, int]] = []
    for i, lo, hi in covered:
        if merged and merged[-1][0] == i and merged[-1][2] == lo:
            merged[-1] = (i, merged[-1][1], hi)
        else:
            merged.append((i, lo, hi))
    assert merged == [(i, 0, t.numel()) for i, t in enumerate(ts)]


def test_chunk_ranges_cover_the_list_within_the_budget() -> None:
    g = torch.Generator().manual_seed(0)
    ts = [torch.empty(int(n)) for n in torch.randint(0, 400, (200,), generator=g)] + [torch.empty(5000)]
    ts.insert(100, torch.empty(30, 40).t())  # non-contiguous, larger than small budgets: kept whole
    total = sum(t.numel() * 4 for t in ts)
    for budget in (1, 64, 1000, 4000, 10**9, None):
        chunks = kernels.chunk_ranges(ts, budget)
        limit = budget or max(kernels.MIN_CHUNK_BYTES, total // kernels.CHUNK_FRACTION)
        _check_chunks(ts, chunks, limit)
        # next fit: two consecutive ranges hold more than the budget, so their number is bounded
        ranges = [c for c in chunks if len(c) == 2]
        for r, s in pairwise(ranges):
            if r[1] == s[0]:
                assert sum(t.numel() * 4 for t in ts[r[0] : s[1]]) > limit
    assert kernels.chunk_ranges(ts, 10**9) == [(0, len(ts))]
    assert kernels.chunk_ranges([]) == []


def test_a_large_tensor_is_cut_into_flat_slices() -> None:
    big = torch.empty(1000, 100)  # 400 KB
    chunks = kernels.chunk_ranges([torch.empty(3), big, torch.empty(5)], 40_000)
    assert chunks == [(0, 1), *[(1, 2, lo, lo + 10_000) for lo in range(0, 100_000, 10_000)], (2, 3)]
    # The default budget cuts one huge tensor into CHUNK_FRACTION slices, not into more launches.
    huge = torch.empty(1024, 1024)  # 4 MiB: its budget is 4 MiB / 32, above the 64 KiB floor
    assert len(kernels.chunk_ranges([huge])) == kernels.CHUNK_FRACTION
    # A 0-dim tensor is never cut (a 1-element view would change its type promotion with a 0-dim coefficient).
    assert kernels.chunk_ranges([torch.empty(())], 1) == [(0, 1)]


def chunkings(w: list[torch.Tensor]) -> list[list[tuple[int, ...]] | None]:
    """None (the kernel's own), one chunk, one per tensor, an uneven split, and every tensor but the 0-dim one
    cut into flat slices of 7 entries."""
    n = len(w)
    sliced = [
        (i, i + 1, lo, min(lo + 7, t.numel())) if t.dim() else (i, i + 1)
        for i, t in enumerate(w)
        for lo in range(0, t.numel(), 7)
    ]
    return [None, [(0, n)], [(i, i + 1) for i in range(n)], [(0, 1), (1, n)], sliced]


def assert_bitwise(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    for x, y in zip(a, b, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert torch.equal(x.view(-1).view(torch.uint8), y.view(-1).view(torch.uint8))  # NaN and -0.0 too


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_chunked_kernels_are_bitwise_the_unchunked_ones(dtype: torch.dtype) -> None:
    """Each tensor goes through the same kernels in any chunking: the values cannot depend on it."""
    w, g, refs = tensors(dtype, 0), tensors(dtype, 1), tensors(dtype, 2)
    w[2][0, 0, 0], w[2][1, 0, 0] = float("nan"), -0.0
    n = len(w)
    coeffs: list[kernels.Coeff] = [0.3, torch.tensor(0.3), torch.tensor(2.0**14) * 0.3]  # a float, AMP scales
    whole = [(0, n)]
    for chunks in chunkings(w):
        for coeff in coeffs:
            for r in (None, refs):
                want, got = clones(g), clones(g)
                kernels.add_l2_gradient_(want, w, coeff, r, whole)
                kernels.add_l2_gradient_(got, w, coeff, r, chunks)
                assert_bitwise(got, want)
            want, got = clones(g), clones(g)
            kernels.add_l1_subgradient_(want, w, coeff, whole)
            kernels.add_l1_subgradient_(got, w, coeff, chunks)
            assert_bitwise(got, want)
        for threshold in (0.0, 0.4, torch.tensor(0.4), 10.0):
            want, got = clones(w), clones(w)
            kernels.soft_threshold_(want, threshold, whole)
            kernels.soft_threshold_(got, threshold, chunks)
            assert_bitwise(got, want)
        assert_bitwise(kernels.squared_distances(w, None, chunks), kernels.squared_distances(w, None, whole))
        got, want = kernels.squared_distances(w, refs, chunks), kernels.squared_distances(w, refs, whole)
        if chunks is not None and any(len(c) == 4 for c in chunks):
            # A tensor cut into slices: the squares of the slices' norms are summed, in float32 (float rounding).
            for x, y in zip(got, want, strict=True):
                torch.testing.assert_close(x, y, rtol=1e-5, atol=0, equal_nan=True)
        else:
            assert_bitwise(got, want)


def peak_cpu_bytes(fn: Callable[[], None]) -> int:
    """Most CPU bytes allocated at once while ``fn`` runs: the benchmarks' own measure (profiler events)."""
    return int(load_benchmark().peak_bytes(fn, torch.device("cpu")))


def test_kernel_temporaries_are_one_chunk() -> None:
    """8 tensors of 64 KiB in 4 chunks: the temporaries are one chunk at a time, not a copy of the list."""
    w, g, refs = ([torch.randn(128, 128) for _ in range(8)] for _ in range(3))
    chunk = 2 * w[0].numel() * 4
    chunks = kernels.chunk_ranges(w, chunk)
    assert chunks == [(0, 2), (2, 4), (4, 6), (6, 8)]
    for fn in (
        lambda: kernels.soft_threshold_(w, 0.1, chunks),
        lambda: kernels.add_l2_gradient_(g, w, 0.1, refs, chunks),
        lambda: kernels.add_l1_subgradient_(g, w, 0.1, chunks),
        lambda: kernels.squared_distances(w, refs, chunks),
    ):
        assert 0 < peak_cpu_bytes(fn) <= chunk + 4096  # (and the few 0-dim results)
    assert peak_cpu_bytes(lambda: kernels.add_l2_gradient_(g, w, 0.1)) <= 4096  # plain L2: no temporary


def test_temporaries_inside_one_large_tensor_are_one_slice() -> None:
    """One 1 MiB weight (an embedding): its temporaries are one slice of the default budget, not a copy."""
    w, g, refs = ([torch.randn(512, 512)] for _ in range(3))
    chunks = kernels.chunk_ranges(w)
    budget = max(kernels.MIN_CHUNK_BYTES, w[0].numel() * 4 // kernels.CHUNK_FRACTION)
    assert len(chunks) == w[0].numel() * 4 // budget and all(len(c) == 4 for c in chunks)
    for fn in (  # the L1 and L2-SP kernels: `test_slices_of_a_large_tensor_share_one_temporary`
        lambda: kernels.add_l2_gradient_(g, w, torch.tensor(0.1)),
        lambda: kernels.squared_distances(w, refs),
    ):
        assert 0 < peak_cpu_bytes(fn) <= budget + 4096


def cpu_allocations(fn: Callable[[], None]) -> list[int]:
    """Sizes of the CPU allocations made while ``fn`` runs (profiler events, as `peak_cpu_bytes`)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()

    def walk(events: Any) -> Iterator[Any]:
        for e in events:
            yield e
            yield from walk(e.children)

    events = walk(prof.profiler.kineto_results.experimental_event_tree())
    allocations = [e for e in events if e.tag == _EventType.Allocation]
    return [e.extra_fields.alloc_size for e in allocations if e.extra_fields.alloc_size > 0]


def test_slices_of_a_large_tensor_share_one_temporary() -> None:
    """The L1 and L2-SP kernels over a large tensor's slices allocate one buffer per call, not one per slice, and on
    CPU one of at least `MAPPED_BYTES` (a mapping of its own in glibc's malloc, of which a slice's pages are written):
    chunk-sized blocks freed and reallocated on malloc's heap made a fit's peak RSS grow by a chunk a step
    (issue 23)."""
    w, g, refs = [torch.randn(512, 512)], [torch.randn(512, 512)], [torch.randn(512, 512)]
    chunks = kernels.chunk_ranges(w)
    slice_bytes = w[0].numel() * 4 // len(chunks)
    assert len(chunks) > 4
    for fn in (
        lambda: kernels.soft_threshold_(w, 0.1, chunks),
        lambda: kernels.add_l1_subgradient_(g, w, 0.1, chunks),
        lambda: kernels.add_l1_subgradient_(g, w, torch.tensor(0.1), chunks),
        lambda: kernels.add_l2_gradient_(g, w, 0.1, refs, chunks),  # L2-SP
    ):
        large = [n for n in cpu_allocations(fn) if n >= slice_bytes // 2]
        assert large == [max(slice_bytes, kernels.MAPPED_BYTES)]


def test_a_gradient_without_a_flat_view_is_taken_whole() -> None:
    """A contiguous weight cut into slices, with a non-contiguous gradient: the pair is processed whole, once."""
    w = [torch.randn(40, 30)]
    chunks = kernels.chunk_ranges(w, 400)
    assert len(chunks) == 12
    want = [torch.randn(30, 40).t()]
    got = [want[0].clone().t().contiguous().t()]  # the same values and the same (transposed) layout
    assert not got[0].is_contiguous()
    kernels.add_l1_subgradient_(want, w, 0.3, [(0, 1)])
    kernels.add_l1_subgradient_(got, w, 0.3, chunks)
    assert_bitwise([got[0].contiguous()], [want[0].contiguous()])


def test_kernels_do_not_record_autograd() -> None:
    w = [torch.randn(3, requires_grad=True)]
    g = [torch.zeros(3)]
    kernels.add_l2_gradient_(g, w, 0.5)
    assert g[0].grad_fn is None
    assert kernels.squared_distances(w)[0].grad_fn is None


# ------------------------------------------------------------------------------ hot-path shape
FOREACH = [name for name in dir(torch) if name.startswith("_foreach_")]


@contextmanager
def count_foreach_calls(counts: Counter[str]) -> Iterator[None]:
    originals = {name: getattr(torch, name) for name in FOREACH}

    def wrap(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            if counting[0]:
                counts[name] += 1
            return fn(*args, **kwargs)

        return counted

    for name, fn in originals.items():
        setattr(torch, name, wrap(name, fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(torch, name, fn)


counting = [False]


class CountDuringSteps(Callback):
    """Counts only inside training batches (the optimizer step and the callbacks' hooks)."""

    def on_train_batch_start(self, *args: Any) -> None:
        counting[0] = True

    def on_train_batch_end(self, *args: Any) -> None:
        counting[0] = False


def foreach_calls(hidden_layers: int, make_callback: Callable[[], Callback], **trainer_kwargs: Any) -> Counter[str]:
    counts: Counter[str] = Counter()
    module = Lit(lambda m: torch.optim.SGD(m.parameters(), lr=0.01, foreach=False), hidden_layers=hidden_layers)
    with count_foreach_calls(counts):
        fit(module, [make_callback(), CountDuringSteps()], **trainer_kwargs)
    counting[0] = False
    return counts


@pytest.mark.parametrize(
    "make_callback",
    [
        lambda: WeightPenalty(l1=0.01, l2=0.01),
        lambda: WeightPenalty(l1=0.01, l1_mode="proximal"),
        lambda: WeightPenalty(l2=0.01, reference="initial"),
        lambda: WeightDecay(0.01),
    ],
    ids=["l1+l2", "proximal", "l2sp", "decay"],
)
def test_foreach_calls_per_step_do_not_grow_with_parameter_count(make_callback: Callable[[], Callback]) -> None:
    small = foreach_calls(3, make_callback)
    large = foreach_calls(30, make_callback)
    assert sum(small.values()) > 0, "the callback runs foreach kernels"
    assert small == large


def test_bucket_with_grads_reuses_its_lists_and_skips_missing_gradients() -> None:
    from lightning_decay._binding import Bucket

    params = [torch.nn.Parameter(torch.randn(n)) for n in (3, 4, 5)]
    b = Bucket(0, params, ["a", "b", "c"], sharded=False)
    assert b.chunks == [(0, 3)] and b.every == [0, 1, 2]
    for p in params:
        p.grad = torch.ones_like(p)
    weights, grads, idx = b.with_grads()
    assert idx is b.every and weights is b.locals  # the common case builds no new lists but the grads'
    assert all(g is p.grad for g, p in zip(grads, params, strict=True))
    params[1].grad = None  # checked on every step
    weights, grads, idx = b.with_grads()
    assert idx == [0, 2] and b.every == [0, 1, 2]
    assert weights[0] is params[0] and weights[1] is params[2] and grads[1] is params[2].grad


def test_logging_costs_a_constant_number_of_kernels(tmp_path: Any) -> None:
    from lightning.pytorch.loggers import CSVLogger

    def make() -> Callback:
        return WeightPenalty(l1=0.01, l2=0.01)

    small = foreach_calls(3, make, logger=CSVLogger(tmp_path / "a"), log_every_n_steps=1)
    large = foreach_calls(30, make, logger=CSVLogger(tmp_path / "b"), log_every_n_steps=1)
    assert small["_foreach_norm"] > 0
    assert small == large
