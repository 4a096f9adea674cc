"""gdrd_fast.integrations.moco against MoCo's own logits path (tests/lib/moco_style.py): the switching
page's diff applied to MoCo's training step gives MoCo's loss, gradients, queue and Acc@1/Acc@5."""
from __future__ import annotations

import copy
import re
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moco_style import SCRIPT, MoCoStyle, TinyEncoder, accuracy

PAGE = Path(__file__).resolve().parents[2] / "docs" / "switching" / "moco.md"


def page_diff() -> list[str]:
    (block,) = re.findall(r"```diff\n(.*?)```", PAGE.read_text(), flags=re.DOTALL)
    return [line for line in block.splitlines() if line[:1] in "+-"]


def changed_lines(diff: list[str]) -> int:
    """Each run of removed and added lines counts max(removed, added): a rewritten line is one change."""
    runs, count = re.findall(r"-*\+*", "".join(line[0] for line in diff)), 0
    for run in runs:
        count += max(run.count("-"), run.count("+"))
    return count


def apply_diff(script: str, diff: list[str]) -> str:
    """Each removed line (matched without its indentation) gives way to the added lines after it; added
    lines before any removed one (the imports) go first."""
    lines, head, i = [line.strip() for line in script.splitlines()], [], 0
    while i < len(diff) and diff[i][0] == "+":
        head.append(diff[i][1:].strip())
        i += 1
    while i < len(diff):
        assert diff[i][0] == "-", diff[i]
        old = diff[i][1:].strip()
        assert old in lines, f"the page removes {old!r}, which MoCo's step does not have"
        new, i = [], i + 1
        while i < len(diff) and diff[i][0] == "+":
            new.append(diff[i][1:].strip())
            i += 1
        at = lines.index(old)
        lines[at:at + 1] = new
    return "\n".join(head + lines)


class _CrossEntropyHere(torch.nn.CrossEntropyLoss):
    def cuda(self, device=None):  # main_moco.py moves its criterion to the GPU; these tests run anywhere
        return self


def run_step(script: str, namespace: dict) -> dict:
    exec(compile(script, str(PAGE), "exec"), namespace)  # noqa: S102 (MoCo's step, rewritten here)
    return namespace


def _models(dtype, seed=0, dim=16, size=64):
    torch.manual_seed(seed)
    theirs = MoCoStyle(TinyEncoder, dim=dim, K=size, m=0.9, T=0.07).to(dtype)
    return theirs, copy.deepcopy(theirs)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_page_diff_gives_mocos_loss_gradients_queue_and_meters(dtype, tol):
    theirs, ours = _models(dtype)
    peer = dict(nn=types.SimpleNamespace(CrossEntropyLoss=_CrossEntropyHere), accuracy=accuracy,
                args=types.SimpleNamespace(gpu=None))
    theirs_setup, theirs_step = SCRIPT.split("# each step")
    ours_setup, ours_step = apply_diff(SCRIPT, page_diff()).split("# each step")
    ns_theirs = run_step(theirs_setup, dict(peer, model=theirs))
    ns_ours = run_step(ours_setup, dict(peer, model=ours))
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (theirs, ours)]
    gen, meters = torch.Generator().manual_seed(1), []
    for _ in range(12):  # 12 x 8 keys: the queue of 64 wraps
        im_q = torch.randn(8, 12, generator=gen, dtype=dtype)
        images = (im_q, im_q + 0.8 * torch.randn(8, 12, generator=gen, dtype=dtype))
        for opt in optimizers:
            opt.zero_grad()
        a = run_step(theirs_step, dict(ns_theirs, images=images))
        b = run_step(ours_step, dict(ns_ours, images=images))
        a["loss"].backward()
        b["loss"].backward()
        assert abs(float(a["loss"].detach()) - float(b["loss"].detach())) <= tol * float(a["loss"].detach())
        for p_a, p_b in zip(theirs.encoder_q.parameters(), ours.encoder_q.parameters()):
            torch.testing.assert_close(p_b.grad, p_a.grad, rtol=tol, atol=tol)
        assert torch.equal(a["acc1"], b["acc1"]) and torch.equal(a["acc5"], b["acc5"])
        meters.append((float(a["acc1"]), float(a["acc5"])))
        for opt in optimizers:
            opt.step()
        # MoCo's [dim, K] queue, row-major here; the encoders drift by rounding (through the gradients),
        # so the pushed keys agree within tol, not bit for bit
        torch.testing.assert_close(ours.moco_queue.filled(), theirs.queue.t(), rtol=tol, atol=tol)
        assert int(ours.moco_queue.ptr) == int(theirs.queue_ptr)
    # the meters saw hits and misses: Acc@1 and Acc@5 are neither 0 nor 100 throughout, and differ
    assert any(0 < acc1 < acc5 for acc1, acc5 in meters) and any(acc5 < 100 for _, acc5 in meters)


def test_page_claims_the_diffs_number_of_changed_lines():
    diff = page_diff()
    claimed = re.search(r"\*\*(\d+) changed lines\*\*", PAGE.read_text())
    assert claimed, "docs/switching/moco.md states no '**N changed lines**'"
    assert int(claimed.group(1)) == changed_lines(diff) <= 3


def test_fused_queue_loads_an_unfused_checkpoint_and_its_own():
    import gdrd_fast.integrations.moco as fused_moco

    theirs, ours = _models(torch.float32, seed=3)
    theirs.queue.copy_(F.normalize(torch.randn_like(theirs.queue), dim=0))
    theirs.queue_ptr.fill_(40)
    fused_moco.fuse(ours)
    ours.load_state_dict(theirs.state_dict())
    assert torch.equal(ours.moco_queue.filled(), theirs.queue.t()) and int(ours.moco_queue.ptr) == 40
    again = copy.deepcopy(ours)
    again.moco_queue.values.zero_()
    again.load_state_dict(ours.state_dict())
    assert torch.equal(again.moco_queue.values, ours.moco_queue.values)


def test_moco_queue_draws_mocos_initial_queue_from_the_same_generator():
    from gdrd_fast.integrations.moco import moco_queue

    torch.manual_seed(7)
    want = F.normalize(torch.randn(16, 50), dim=0)
    torch.manual_seed(7)
    got = moco_queue(16, 50)
    assert torch.equal(got.filled(), want.t()) and got.is_full() and got.gather
    generated = moco_queue(16, 50, generator=torch.Generator().manual_seed(7))
    assert torch.equal(generated.filled(), want.t())


def test_misuse_is_refused_and_changes_nothing():
    import gdrd_fast.integrations.moco as fused_moco

    plain = torch.nn.Linear(3, 3)
    state = copy.deepcopy(plain.state_dict())
    with pytest.raises(TypeError, match="expected moco/builder.py's MoCo"):
        fused_moco.fuse(plain)
    assert type(plain) is torch.nn.Linear and all(torch.equal(v, state[k]) for k, v in plain.state_dict().items())
    with pytest.raises(TypeError, match="MoCoOutput"):
        fused_moco.MoCoCriterion()(torch.randn(2, 5), torch.zeros(2, dtype=torch.long))
    output = fused_moco.MoCoOutput(torch.tensor(1.0), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="topk"):
        output.topk(2, 0)
    assert output.topk(5, 1, True, True)[1].tolist() == [[0, -1, -1, -1, -1], [-1, -1, -1, 0, -1]]
    assert [float(a) for a in fused_moco.topk_accuracy(output.rank, (1, 5))] == [50.0, 100.0]


def _fused_under_ddp(rank, steps):
    """MoCo built alike on every rank, wrapped in DistributedDataParallel, then fused (main_moco.py's
    order); each rank feeds its own images. Returns (the queue, its pointer, this rank's keys per step)."""
    import gdrd_fast.integrations.moco as fused_moco

    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(MoCoStyle(TinyEncoder, dim=8, K=32, m=0.9, T=0.07))
    criterion = fused_moco.fuse(model)
    keys = []
    for step in range(steps):
        gen = torch.Generator().manual_seed(100 * step + rank)
        im_q, noise = torch.randn(4, 12, generator=gen), torch.randn(4, 12, generator=gen)
        output, target = model(im_q=im_q, im_k=im_q + 0.5 * noise)
        criterion(output, target).backward()
        with torch.no_grad():  # the key encoder as this step's forward left it: the keys it pushed
            keys.append(F.normalize(model.module.encoder_k(im_q + 0.5 * noise), dim=1))
    return model.module.moco_queue.filled().clone(), int(model.module.moco_queue.ptr), torch.stack(keys)


@pytest.mark.distributed
def test_fused_model_inside_ddp_gathers_every_ranks_keys_in_rank_order(tmp_path):
    from gloo_ranks import run_ranks

    (queue_0, ptr_0, keys_0), (queue_1, ptr_1, keys_1) = run_ranks(_fused_under_ddp, (3,), 2, tmp_path)
    assert torch.equal(queue_0, queue_1) and ptr_0 == ptr_1 == 3 * 2 * 4  # 3 steps of 2 ranks x 4 keys
    for step in range(3):  # each step's 8 rows: rank 0's keys, then rank 1's
        torch.testing.assert_close(queue_0[8 * step:8 * step + 8], torch.cat([keys_0[step], keys_1[step]]))
    torch.manual_seed(0)
    initial = MoCoStyle(TinyEncoder, dim=8, K=32, m=0.9, T=0.07).queue.t()
    assert torch.equal(queue_0[24:], initial[24:])  # rows not yet overwritten: MoCo's initial queue
