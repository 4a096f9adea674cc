"""CrossBatchNTXentLoss against the installed pytorch-metric-learning, in the cases PML's own tests of
CrossBatchMemory and NTXentLoss cover (sanity, enqueue_mask, miners, indices_tuple, float16), written
here in our own words: loss, dtype, gradients and the memory's state, step for step."""
from __future__ import annotations

import pytest
import torch

from gdrd_fast.integrations.metric_learning import CrossBatchNTXentLoss

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
pml_miners = pytest.importorskip("pytorch_metric_learning.miners")

EMBED, MEMORY, BATCH, TEMPERATURE = 12, 40, 10, 0.07
# per dtype: how far apart two correct results may be (float16: PML computes in float16, we in float32)
TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 4e-3}


def _pair(miner=None):
    theirs = pml_losses.CrossBatchMemory(pml_losses.NTXentLoss(temperature=TEMPERATURE), EMBED,
                                         memory_size=MEMORY, miner=miner)
    return theirs, CrossBatchNTXentLoss(EMBED, MEMORY, TEMPERATURE, miner=miner)


def _same_step(theirs, ours, dtype, embeddings, labels, **kw):
    x_theirs = embeddings.to(dtype).requires_grad_(True)
    x_ours = embeddings.to(dtype).requires_grad_(True)
    want, got = theirs(x_theirs, labels, **kw), ours(x_ours, labels, **kw)
    assert got.dtype == want.dtype == dtype
    tol = TOL[dtype]
    assert abs(float(got.detach()) - float(want.detach())) <= tol * max(1.0, abs(float(want.detach())))
    (g_want,), (g_got,) = torch.autograd.grad(want, x_theirs), torch.autograd.grad(got, x_ours)
    assert g_got.dtype == dtype
    torch.testing.assert_close(g_got.float(), g_want.float(), rtol=tol, atol=tol)
    # the memory's state, as CrossBatchMemory's attributes
    assert ours.memory_size == theirs.memory_size and ours.queue_idx == theirs.queue_idx
    assert ours.has_been_filled == theirs.has_been_filled
    assert torch.equal(ours.curr_batch_idx, theirs.curr_batch_idx)
    assert torch.equal(ours.embedding_memory, theirs.embedding_memory)
    filled = slice(None) if theirs.has_been_filled else slice(0, theirs.queue_idx)
    assert torch.equal(ours.label_memory[filled], theirs.label_memory[filled])
    return float(want.detach())


def _steps(n, seed, classes=4):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(BATCH, EMBED, generator=g, dtype=torch.float64), torch.randint(classes, (BATCH,), generator=g))
            for _ in range(n)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_sanity_a_batch_sized_memory_is_plain_ntxent_and_enqueue_mask_is_ntxent_against_the_keys(dtype):
    """The first step with memory_size = B is NTXentLoss on the batch; with enqueue_mask, NTXentLoss of
    the unmasked rows against the masked ones (ref_emb), which is MoCo inside PML."""
    x, labels = _steps(1, 11)[0]
    ours = CrossBatchNTXentLoss(EMBED, BATCH, TEMPERATURE)
    want = pml_losses.NTXentLoss(temperature=TEMPERATURE)(x.to(dtype), labels)
    got = ours(x.to(dtype), labels)
    assert got.dtype == dtype and abs(float(got) - float(want)) <= TOL[dtype] * float(want)
    mask = torch.arange(BATCH) % 2 == 0
    ours.reset_queue()
    want = pml_losses.NTXentLoss(temperature=TEMPERATURE)(x[~mask].to(dtype), labels[~mask],
                                                          ref_emb=x[mask].to(dtype), ref_labels=labels[mask])
    got = ours(x.to(dtype), labels, enqueue_mask=mask)
    assert abs(float(got) - float(want)) <= TOL[dtype] * float(want)
    assert torch.equal(ours.embedding_memory[:int(mask.sum())], x[mask].to(dtype))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("case", ["all pairs", "enqueue_mask", "pair miner", "triplet miner", "indices_tuple"])
def test_steps_match_cross_batch_memory(case, dtype):
    """Eight steps, the memory wrapping, in each of PML's cases."""
    miner = {"pair miner": pml_miners.MultiSimilarityMiner(0.1),
             "triplet miner": pml_miners.TripletMarginMiner(0.2)}.get(case)
    theirs, ours = _pair(miner)
    g = torch.Generator().manual_seed(3)
    for step, (x, labels) in enumerate(_steps(8, 5)):
        kw = {}
        if case == "enqueue_mask":
            kw["enqueue_mask"] = torch.rand(BATCH, generator=g) < 0.5
        if case == "indices_tuple" and step:  # pairs added to all pairs: PML counts them twice
            kw["indices_tuple"] = tuple(torch.randint(n, (6,), generator=g) for n in (BATCH, ours.queue_idx or MEMORY,
                                                                                    BATCH, ours.queue_idx or MEMORY))
        _same_step(theirs, ours, dtype, x, labels, **kw)


def test_float16_keeps_pmls_floor_on_each_pair():
    """PML's -log(p + tiny) floors each pair at float16's tiny (6.1e-5): with many negatives the loss is
    visibly below the unfloored one, and ours follows PML, not the unfloored value."""
    theirs, ours = _pair()
    losses = [_same_step(theirs, ours, torch.float16, x * 4, torch.zeros(BATCH, dtype=torch.long) + i)
              for i, (x, _) in enumerate(_steps(5, 8))]
    exact = CrossBatchNTXentLoss(EMBED, MEMORY, TEMPERATURE)
    for i, (x, _) in enumerate(_steps(5, 8)):
        unfloored = float(exact((x * 4).to(torch.float16).double(), torch.zeros(BATCH, dtype=torch.long) + i))
    assert unfloored > losses[-1] * 1.01  # the floor acts on this data, and we matched PML through it


def test_state_is_views_and_reset_queue_empties_it():
    theirs, ours = _pair()
    x, labels = _steps(1, 2)[0]
    ours(x, labels)
    view = ours.embedding_memory
    assert view.data_ptr() == ours.memory.values.data_ptr() and ours.label_memory is ours.memory.labels
    ours.memory.values[0, 0] = 7.0
    assert float(view[0, 0]) == 7.0
    ours.reset_queue()
    theirs.reset_queue()
    assert ours.queue_idx == 0 and not ours.has_been_filled and ours.memory.num_filled() == 0
    for x, labels in _steps(3, 4):  # after a reset both start over alike
        _same_step(theirs, ours, torch.float64, x, labels)


@pytest.mark.parametrize("enqueue", [False, True])
def test_enqueue_mask_with_nothing_to_enqueue_or_nothing_to_score(enqueue):
    """All rows masked: only enqueued, loss 0; none masked: scored against the memory alone. (Before the
    memory has wrapped, PML takes an empty enqueue for a wrap and scores its unwritten zero rows too, as
    label 0; we score the written rows only, so the comparison starts from a full memory.)"""
    theirs, ours = _pair()
    steps = _steps(7, 9)
    for x, labels in steps[:5]:  # 50 rows: the memory of 40 has wrapped
        _same_step(theirs, ours, torch.float64, x, labels)
    for x, labels in steps[5:]:
        _same_step(theirs, ours, torch.float64, x, labels, enqueue_mask=torch.full((BATCH,), enqueue))


def test_refused_calls_change_nothing():
    ours = CrossBatchNTXentLoss(EMBED, MEMORY, TEMPERATURE)
    x, labels = _steps(1, 6)[0]
    ours(x, labels)
    state = {k: v.clone() for k, v in ours.state_dict().items()}
    index = (torch.tensor([0]), torch.tensor([1]), torch.tensor([0]), torch.tensor([2]))
    with pytest.raises(ValueError, match="mutually exclusive"):
        ours(x, labels, indices_tuple=index, enqueue_mask=torch.ones(BATCH, dtype=torch.bool))
    with pytest.raises(ValueError, match="enqueue_mask must be a bool"):
        ours(x, labels, enqueue_mask=torch.ones(BATCH))
    with pytest.raises(ValueError, match="memory_size=40"):
        ours(torch.randn(41, EMBED, dtype=torch.float64), torch.zeros(41, dtype=torch.long))
    assert all(torch.equal(v, state[k]) for k, v in ours.state_dict().items())
