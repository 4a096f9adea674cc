"""The Trainer under 2 gloo ranks (torchrun's environment variables, set by hand) on CPU.

Against one process with the same global batch: equal weights, banks and queues (fp32 tolerance);
across ranks: bit-identical state; rank 0 alone writes checkpoints; a distributed resume continues
bit for bit. All cases run in one spawn (starting processes dominates the cost).
"""
import os

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from gdrd_fast import CRDLoss, RelationalContrastiveLoss
from gdrd_fast.distributed import DistributedCRDLoss, DistributedRelationalContrastiveLoss, to_distributed
from gdrd_fast.models import ArcFaceHead
from gdrd_fast.train import DiscriminativeStage, OptimConfig, Runtime, Trainer, load_checkpoint, seed_everything
from gdrd_fast.train.loop import StepBatchSampler
from train_cases import CLASSES, EMB, N_DATA, Faces

pytestmark = pytest.mark.distributed

BATCH, STEPS, WORLD = 4, 6, 2
KINDS = ("rcd", "crd", "crd_sharded")
SHARDED = ("distill.memory_s.rows", "distill.memory_t.rows")  # crd_sharded: each rank holds half the rows
TOL = dict(rtol=1e-4, atol=1e-5)  # fp32; only the order of sums differs


def _network():
    # BatchNorm only in the frozen parts: CPU has no SyncBatchNorm, and per-rank batch statistics
    # would differ from one process's
    return nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, 2, 1),
                         nn.Flatten(), nn.Linear(8 * 4 * 4, EMB))


def build(kind, output_dir=None, fixed_negatives=False):
    seed_everything(7)  # the same weights in every process
    runtime = Runtime.create("cpu")
    if kind == "rcd":
        distill = RelationalContrastiveLoss(EMB, 8, num_negatives=5, queue_size=8, n_data=N_DATA)
        if fixed_negatives:  # one process draws the same negatives (a resume restarts this generator)
            distill.generator = torch.Generator().manual_seed(11)
    else:
        distill = CRDLoss(EMB, EMB, N_DATA, feat_dim=8, nce_k=7)
    stage = DiscriminativeStage(runtime, _network()[:4], _network()[4:], ArcFaceHead(EMB, CLASSES, s=8.0, m=0.3),
                                teacher=_network(), teacher_classifier=ArcFaceHead(EMB, CLASSES, s=8.0, m=0.3),
                                distill=distill)
    optim = OptimConfig(lr=0.1, epochs=2, milestones=[1], steps=STEPS)
    return Trainer(stage, Faces(), runtime, optim, batch_size=BATCH, seed=3, resolution=4, progress=False,
                   output_dir=output_dir, log_every=0, shard_banks=kind == "crd_sharded")


def _state(trainer):
    return {k: v.clone() for k, v in trainer.stage.state_dict().items()}


def _rank_main(rank, port, out_dir):
    # what torchrun exports to each process it starts; as under torchrun, the store is the launcher's (this
    # test's process), so no rank runs a store server thread that could outlive its teardown
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="True", TORCHELASTIC_RESTART_COUNT="0")
    torch.set_num_threads(1)
    results = {}
    for kind in KINDS:
        like_single = build(kind, fixed_negatives=True)
        assert isinstance(like_single.stage.distill, (DistributedCRDLoss, DistributedRelationalContrastiveLoss))
        terms = like_single.train_steps()
        results[kind] = dict(like_single=_state(like_single), terms=terms)
        straight = build(kind)
        straight.train_steps()
        results[kind]["straight"] = _state(straight)
        first = build(kind, output_dir=os.path.join(out_dir, kind))
        first.train_steps(STEPS // 2)
        results[kind]["saved"] = first.save() is not None
        results[kind]["at_save"] = _state(first)
        results[kind]["dir"] = os.path.join(out_dir, kind)
        torch.distributed.barrier()  # rank 0's file is complete before anyone resumes from it
        torch.manual_seed(1000 + rank)  # a resume must not depend on the RNG it starts from
        resumed = build(kind)
        resumed.resume(os.path.join(out_dir, kind, "stage2.pt"))
        resumed.train_steps()
        results[kind]["resumed"] = _state(resumed)
        torch.distributed.barrier()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("train")
    store = torch.distributed.TCPStore("127.0.0.1", 0, WORLD, is_master=True, wait_for_workers=False)
    mp.spawn(_rank_main, args=(store.port, str(out_dir)), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def _whole(rank_states, name, kind):
    """A state entry as one process holds it: the ranks' halves of a sharded bank concatenated."""
    if kind == "crd_sharded" and name in SHARDED:
        return torch.cat([state[name] for state in rank_states])
    assert torch.equal(rank_states[0][name], rank_states[1][name]), name  # replicated: bit-identical
    return rank_states[0][name]


@pytest.mark.parametrize("kind", KINDS)
def test_two_ranks_train_like_one_process_on_the_global_batch(ranks, kind):
    single = build(kind, fixed_negatives=True)
    initial = _state(single)
    terms = single.train_steps()
    expected = _state(single)
    for name, value in expected.items():
        torch.testing.assert_close(_whole([r[kind]["like_single"] for r in ranks], name, kind), value, **TOL,
                                   msg=name)
    assert not torch.equal(initial["head.5.weight"], expected["head.5.weight"])
    assert not torch.isnan(expected["distill.log_z_t"]), "the contrastive loss must have been active"
    for name in terms:  # the logged terms are the ranks' mean = the global-batch loss
        assert ranks[0][kind]["terms"][name] == ranks[1][kind]["terms"][name]
        assert ranks[0][kind]["terms"][name] == pytest.approx(terms[name], rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_only_rank_0_saves_and_a_distributed_resume_is_exact(ranks, kind):
    assert [r[kind]["saved"] for r in ranks] == [True, False]
    for r in ranks:
        for name, value in r[kind]["straight"].items():
            if not (kind == "crd_sharded" and name in SHARDED):
                assert torch.equal(value, ranks[0][kind]["straight"][name]), name
            assert torch.equal(r[kind]["resumed"][name], value), f"{name} differs after resume"


def test_sharded_checkpoint_keeps_each_rank_rows_apart_and_resumes_in_one_process(ranks):
    assert ranks[0]["crd_sharded"]["like_single"][SHARDED[0]].shape[0] == (N_DATA + 1) // 2
    path = os.path.join(ranks[0]["crd_sharded"]["dir"], "stage2.pt")
    main = load_checkpoint(path)
    assert not set(SHARDED) & set(main["modules"]), "the main file must not hold a rank's slice"
    assert [os.path.exists(f"{path}.rank{r}") for r in range(WORLD + 1)] == [True, True, False]
    single = build("crd")  # one process: the shards are reassembled into whole banks
    single.resume(path)
    at_save = [r["crd_sharded"]["at_save"] for r in ranks]
    for name, value in single.stage.state_dict().items():
        assert torch.equal(value, _whole(at_save, name, "crd_sharded")), name


def test_without_torchrun_the_runtime_is_one_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    runtime = Runtime.create("cpu")
    assert (runtime.rank, runtime.world_size) == (0, 1)
    trainer = build("crd")
    assert trainer.model is trainer.stage and type(trainer.stage.distill) is CRDLoss
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")  # never dialled: one process makes no group
    runtime = Runtime.create("cpu")  # torchrun with one process needs no process group
    assert (runtime.rank, runtime.world_size) == (0, 1) and not torch.distributed.is_initialized()
    with pytest.raises(ValueError, match="divisible by the world size"):
        StepBatchSampler(N_DATA, 5, 0, 0, 1, rank=0, world_size=2)
    with pytest.raises(TypeError, match="no distributed form of Linear"):
        to_distributed(nn.Linear(2, 2))


def test_the_distributed_sampler_slices_one_process_batches():
    single = list(StepBatchSampler(N_DATA, 6, 5, 0, 7))
    per_rank = [list(StepBatchSampler(N_DATA, 6, 5, 0, 7, rank=r, world_size=3)) for r in range(3)]
    assert [sum((p[step] for p in per_rank), []) for step in range(7)] == single


def test_sync_batchnorm_converts_every_batchnorm_and_refuses_cpu():
    from gdrd_fast.distributed.launch import sync_batchnorm
    net = _network()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match="sync_batchnorm needs CUDA"):
        sync_batchnorm(net, torch.device("cpu"))
    assert type(net[1]) is nn.BatchNorm2d, "a refused conversion must change nothing"
    weight = net[1].weight
    converted = sync_batchnorm(net, torch.device("cuda"))  # converting needs no GPU; running it does
    assert type(converted[1]) is nn.SyncBatchNorm and converted[1].weight is weight  # the optimizer's parameter
    assert converted.state_dict().keys() == before.keys()
