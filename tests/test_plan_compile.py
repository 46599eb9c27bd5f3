"""The vectorised plan compiler equals the row-by-row reference loop (tests/plan_reference.py),
field for field, on random specs of every kind, and is fast enough to recompile every epoch."""
from __future__ import annotations

import random
import time

import pytest
import torch

from plan_reference import compile_plan_reference
from rsm_fast.engine.plan import PlanError, PlanSpec, _mix, _mix_many, compile_plan

TENSOR_LISTS = ("src", "noisy", "trained", "key", "group", "record")
TENSORS = ("leaf_ancestor", "record_step", "record_group", "record_parent", "initial_key", "record_set")


def _random_spec(rng: random.Random, kind: str) -> PlanSpec:
    n = rng.randint(1, 9)
    sde = tuple(rng.random() < 0.7 for _ in range(n))
    kw = dict(kind=kind, num_steps=n, groups=rng.randint(1, 4), trunks=rng.randint(1, 3),
              group_offset=rng.choice([0, 0, 5]))
    if kind == "sde":
        return PlanSpec(**kw, sde_mask=sde, train_mask=tuple(rng.random() < 0.8 for _ in range(n)))
    # a tree multiplies its width at every splitting step: keep it small
    k = [rng.choice([0, 0, 1, 2, 3, 6] if kind == "branch" else [0, 0, 0, 1, 2, 3]) for _ in range(n)]
    if not any(k):
        k[rng.randrange(n)] = rng.randint(1, 4)
    k = k[:n - 1] if (kind == "branch" and n > 1 and rng.random() < 0.3) else k
    if kind == "branch" and not any(k):
        k = [2] + k[1:]
    return PlanSpec(**kw, k=tuple(k), sde_mask=sde if kind == "tree" else ())


def _same(a, b):
    assert a.rows == b.rows and a.trunk_rows == b.trunk_rows and a.set_sizes == b.set_sizes
    for name in TENSOR_LISTS:
        for x, y in zip(getattr(a, name), getattr(b, name), strict=True):
            assert x.dtype == y.dtype and torch.equal(x, y), name
    for name in TENSORS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y), name


@pytest.mark.parametrize("kind", ["sde", "branch", "tree"])
def test_vectorised_compiler_equals_the_reference_loop(kind):
    rng = random.Random({"sde": 1, "branch": 2, "tree": 3}[kind])
    checked = 0
    for _ in range(60):
        spec = _random_spec(rng, kind)
        try:
            want = compile_plan_reference(spec, require_records=False)
        except PlanError as e:
            with pytest.raises(PlanError, match=str(e).split("(")[0][:30]):
                compile_plan(spec, require_records=False)
            continue
        _same(compile_plan(spec, require_records=False), want)
        checked += 1
    assert checked >= 40


def test_released_profiles_match_the_reference():
    for kind, k in [("branch", (6,) * 9 + (0,)), ("branch", (4, 5, 5, 6, 7, 8, 9, 10, 0, 0)),
                    ("branch", (0,) * 9 + (3,)), ("tree", (2, 0, 0, 2, 0, 0, 3, 0, 0, 0)), ("tree", (0,) * 9 + (4,))]:
        spec = PlanSpec(kind=kind, num_steps=10, groups=4, trunks=2, k=k)
        _same(compile_plan(spec), compile_plan_reference(spec))


def test_vectorised_key_mix_equals_the_python_int_version():
    g = torch.Generator().manual_seed(0)
    keys = torch.randint(0, 2**62, (500,), generator=g)
    child = torch.randint(0, 64, (500,), generator=g)
    for step in (0, 7, 49, 10**6):
        got = _mix_many(keys, step, child)
        want = torch.tensor([_mix(int(a), step, int(c)) for a, c in zip(keys, child)])
        assert torch.equal(got, want) and bool((got >= 0).all())


def test_recompiling_a_large_branch_plan_is_cheap():
    """The online allocator recompiles every epoch: 64 trunks x TempFlow's 54 branches x 10 steps
    (20k rows) must compile in well under the reference loop's time (measured ~25 ms vs ~1 ms)."""
    spec = PlanSpec(kind="branch", num_steps=10, groups=16, trunks=4, k=(6,) * 9 + (0,))
    compile_plan(spec)
    t0 = time.perf_counter()
    for _ in range(3):
        compile_plan(spec)
    fast = (time.perf_counter() - t0) / 3
    t0 = time.perf_counter()
    compile_plan_reference(spec)
    slow = time.perf_counter() - t0
    assert fast < slow / 3, (fast, slow)
