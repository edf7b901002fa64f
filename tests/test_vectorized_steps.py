"""The vectorized engine's stacked steps equal the Flower path's per-bank code (Opacus, Adam, SecAgg+)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from flwr.common.secure_aggregation.quantization import dequantize, quantize
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer

from models.nets import build_model
from models.training import make_optimizer, train_epochs
from server.secagg import SecAggParams
from simulations.vectorized_batches import ShuffledBatches, poisson_batch
from simulations.vectorized_dp import LocalPlan, LocalSettings, Rows, StackedModel, train_chunk
from simulations.vectorized_server import SecureSum


def _stack(model, banks):
    return [
        t.detach().unsqueeze(0).repeat(banks, *[1] * t.dim()).clone() for t in model.state_dict().values()
    ]


def _bank_rows(seed, banks=2, rows=40, features=6):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(banks, rows, features, generator=gen)
    y = (torch.rand(banks, rows, generator=gen) < 0.3).float()
    return x, y


@pytest.mark.parametrize("clipping", ["ghost", "vmap"])
def test_clipped_sums_equal_opacus_per_sample_clipping_for_each_bank(clipping):
    x, y = _bank_rows(0)
    mask = torch.ones_like(y)
    mask[1, 25:] = 0  # bank 1 has 25 rows
    pos_weight = torch.tensor([1.0, 4.0])
    model = build_model("mlp", 6, hidden_sizes=(16, 8), seed=3)
    stacked = StackedModel(model, clipping=clipping)
    assert stacked.clipping == clipping
    sums = stacked.clipped_sums(_stack(model, 2), Rows(x, y, mask, pos_weight), clip=0.5)
    for bank, rows in ((0, 40), (1, 25)):
        gsm = GradSampleModule(build_model("mlp", 6, hidden_sizes=(16, 8), seed=3))
        opt = DPOptimizer(
            torch.optim.SGD(gsm.parameters(), lr=0.1),
            noise_multiplier=0.0,
            max_grad_norm=0.5,
            expected_batch_size=rows,
        )
        loss = F.binary_cross_entropy_with_logits(
            gsm(x[bank, :rows]), y[bank, :rows], pos_weight=pos_weight[bank]
        )
        loss.backward()
        opt.pre_step()  # clip, (zero) noise, divide by the expected batch size
        for p, s in zip(gsm.parameters(), sums, strict=True):
            torch.testing.assert_close(p.grad, s[bank] / rows, atol=1e-6, rtol=1e-5)


class _Fixed:
    """The same explicit batches for every bank (indices per step), for comparing with the per-bank loop."""

    def __init__(self, batches, sizes):
        self.batches, self.sizes = batches, sizes

    def __call__(self, step):
        idx = torch.zeros(len(self.sizes), max(len(b) for b in self.batches[step]), dtype=torch.long)
        mask = torch.zeros_like(idx, dtype=torch.bool)
        for bank, rows in enumerate(self.batches[step]):
            idx[bank, : len(rows)] = torch.tensor(rows)
            mask[bank, : len(rows)] = True
        return idx, mask


@pytest.mark.parametrize("mu", [0.0, 0.5])
def test_plain_round_equals_train_epochs_with_adam_for_each_bank(mu):
    x, y = _bank_rows(1)
    sizes = [40, 23]
    gen = np.random.default_rng(0)
    batches = [
        [sorted(gen.choice(n, size=min(16, n), replace=False).tolist()) for n in sizes] for _ in range(4)
    ]
    model = build_model("mlp", 6, hidden_sizes=(16, 8), seed=5)
    params = _stack(model, 2)
    n = torch.tensor(sizes)
    mask = (torch.arange(40) < n.unsqueeze(1)).float()
    plan = LocalPlan(
        n=n,
        batch=torch.tensor([16, 16]),
        steps=torch.tensor([4, 3]),
        active=torch.tensor([True, True]),
        pos_weight=torch.tensor([1.0, 2.0]),
    )
    taken = train_chunk(
        StackedModel(model),
        params,
        Rows(x, y, mask, plan.pos_weight),
        plan,
        LocalSettings(lr=0.01, epochs=1, weight_decay=0.001, proximal_mu=mu),
        generator=torch.Generator(),
        batches=_Fixed(batches, sizes),
    )
    assert taken.tolist() == [4, 3]
    for bank, steps in ((0, 4), (1, 3)):
        ref = build_model("mlp", 6, hidden_sizes=(16, 8), seed=5)
        start = [p.detach().clone() for p in ref.parameters()]
        loader = [(x[bank, batches[s][bank]], y[bank, batches[s][bank]]) for s in range(steps)]
        train_epochs(
            ref,
            make_optimizer(ref, lr=0.01, weight_decay=0.001),
            loader,
            epochs=1,
            pos_weight=[1.0, 2.0][bank],
            proximal_mu=mu,
            global_weights=start,
        )
        for p, s in zip(ref.parameters(), params, strict=True):
            torch.testing.assert_close(p.detach(), s[bank], atol=2e-6, rtol=1e-5)


def test_dp_step_with_noise_off_equals_opacus_dp_optimizer_around_adam():
    x, y = _bank_rows(2, banks=1, rows=30)
    rows = [0, 3, 4, 9, 11, 17, 20, 28]
    model = build_model("mlp", 6, hidden_sizes=(16, 8), seed=7)
    params = _stack(model, 1)
    plan = LocalPlan(
        n=torch.tensor([30]),
        batch=torch.tensor([10]),
        steps=torch.tensor([1]),
        active=torch.tensor([True]),
        pos_weight=torch.tensor([1.0]),
        rate=torch.tensor([1 / 3]),
        expected=torch.tensor([10.0]),
        sigma=torch.tensor([0.0]),
    )
    train_chunk(
        StackedModel(model),
        params,
        Rows(x, y, torch.ones_like(y), plan.pos_weight),
        plan,
        LocalSettings(lr=0.01, epochs=1, max_grad_norm=0.3),
        generator=torch.Generator(),
        batches=_Fixed([[rows]], [30]),
    )
    gsm = GradSampleModule(build_model("mlp", 6, hidden_sizes=(16, 8), seed=7))
    opt = DPOptimizer(
        make_optimizer(gsm, lr=0.01), noise_multiplier=0.0, max_grad_norm=0.3, expected_batch_size=10
    )
    F.binary_cross_entropy_with_logits(gsm(x[0, rows]), y[0, rows]).backward()
    opt.step()
    for p, s in zip(gsm.parameters(), params, strict=True):
        torch.testing.assert_close(p.detach(), s[0], atol=2e-6, rtol=1e-5)


def test_poisson_batches_sample_each_valid_row_at_its_banks_rate():
    valid = torch.arange(50) < torch.tensor([50, 20]).unsqueeze(1)
    rate = torch.tensor([0.1, 0.5])
    counts = torch.zeros(2, 50)
    gen = torch.Generator().manual_seed(0)
    draws = 2000
    for _ in range(draws):
        index, mask = poisson_batch(valid, rate, gen)
        for bank in range(2):
            picked = index[bank][mask[bank]]
            assert len(set(picked.tolist())) == len(picked)  # no row twice
            counts[bank, picked] += 1
    assert counts[1, 20:].sum() == 0  # padding never sampled
    for bank, n in ((0, 50), (1, 20)):
        q = float(rate[bank])
        freq = counts[bank, :n] / draws
        assert (freq - q).abs().max() < 5 * math.sqrt(q * (1 - q) / draws)


def test_shuffled_batches_cover_every_row_once_per_epoch():
    n, batch = torch.tensor([10, 7]), torch.tensor([4, 4])
    batches = ShuffledBatches(n, batch, epochs=2, rows=10, generator=torch.Generator().manual_seed(1))
    for bank, size in ((0, 10), (1, 7)):
        per_epoch = math.ceil(size / 4)
        for epoch in range(2):
            seen = []
            for j in range(per_epoch):
                index, mask = batches(epoch * per_epoch + j)
                seen += index[bank][mask[bank]].tolist()
                assert int(mask[bank].sum()) == min(4, size - 4 * j)
            assert sorted(seen) == list(range(size))


def test_secure_sum_is_flowers_quantized_weighted_mean():
    params = SecAggParams(
        num_shares=3,
        reconstruction_threshold=2,
        clipping_range=8.0,
        quantization_range=2**22,
        modulus_range=2**32,
        max_weight=1000.0,
    )
    rng = np.random.default_rng(0)
    vectors = rng.normal(0, 2, size=(5, 300)).astype(np.float32)
    examples = np.array([1000, 400, 7, 0, 999])
    summer = SecureSum(params, generator=torch.Generator().manual_seed(0))
    summer.add(torch.from_numpy(vectors[:2]), torch.from_numpy(examples[:2]))
    summer.add(torch.from_numpy(vectors[2:]), torch.from_numpy(examples[2:]))
    mine = summer.mean()
    # Flower: each bank quantizes its weighted vector; the server dequantizes the sum (secaggplus_workflow)
    ratios = [round(e / 1000.0 * params.quantization_range) for e in examples]
    total = sum(
        quantize([v * (r / params.quantization_range)], 8.0, params.quantization_range)[0].astype(np.int64)
        for v, r in zip(vectors, ratios, strict=True)
    )
    theirs = dequantize([total], 8.0, params.quantization_range)[0] - 4 * 8.0
    theirs *= params.quantization_range / sum(ratios)
    exact = (vectors * examples[:, None]).sum(0) / examples.sum()
    bound = params.max_error(5)
    assert np.abs(mine - exact).max() < bound and np.abs(theirs - exact).max() < bound
    unweighted = SecureSum(None)
    unweighted.add(torch.from_numpy(vectors), torch.from_numpy(examples))
    np.testing.assert_allclose(unweighted.mean(), exact, rtol=1e-5, atol=1e-6)
