"""CRDLoss (pair kernels + fused two-bank update) against RepDistiller's formula, in float64."""
import pytest
import torch
import torch.nn.functional as F

from gdrd_fast import CRDLoss, backends, validation

BACKENDS = ["torch", pytest.param("cpu", marks=pytest.mark.skipif(
    backends.cpu_extension() is None, reason="needs the C++ extension gdrd_fast._C")),
    pytest.param("cuda", marks=pytest.mark.cuda)]


def device_of(backend: str) -> str:
    return "cuda" if backend == "cuda" else "cpu"


def repdistiller_step(crd: CRDLoss, bank_s, bank_t, z_s, z_t, f_s, f_t, idx, contrast_idx):
    """RepDistiller's ContrastMemory + NCECriterion, spelled as there: returns loss, new banks and Zs."""
    v_s, v_t = crd.embed_s(f_s), crd.embed_t(f_t)
    b, cols = contrast_idx.shape
    k, n = cols - 1, crd.n_data
    out_s = torch.exp(torch.bmm(bank_t[contrast_idx.view(-1)].view(b, cols, -1), v_s.view(b, -1, 1)) / crd.nce_t)
    out_t = torch.exp(torch.bmm(bank_s[contrast_idx.view(-1)].view(b, cols, -1), v_t.view(b, -1, 1)) / crd.nce_t)
    z_s = (out_s.mean() * n).detach() if z_s is None else z_s
    z_t = (out_t.mean() * n).detach() if z_t is None else z_t
    out_s, out_t = out_s / z_s, out_t / z_t

    def nce(x):
        pn, eps = 1.0 / n, 1e-7
        log_d1 = torch.log(x[:, 0] / (x[:, 0] + k * pn + eps))
        log_d0 = torch.log((k * pn) / (x[:, 1:] + k * pn + eps))
        return -(log_d1.sum(0) + log_d0.reshape(-1, 1).sum(0)) / b

    loss = nce(out_s) + nce(out_t)
    m = crd.memory_s.momentum
    new_s, new_t = bank_s.clone(), bank_t.clone()
    new_s.index_copy_(0, idx, F.normalize(bank_s[idx] * m + v_s.detach() * (1 - m), dim=1))
    new_t.index_copy_(0, idx, F.normalize(bank_t[idx] * m + v_t.detach() * (1 - m), dim=1))
    return loss.squeeze(), new_s, new_t, z_s, z_t


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n_data, nce_k", [(300, 37), (40, 90)])  # gathered kernel; dense path (B(K+1) >= 2N)
def test_crd_loss_matches_repdistiller_float64(backend, n_data, nce_k):
    s_dim, t_dim, feat, b = 13, 17, 9, 6
    crd = CRDLoss(s_dim, t_dim, n_data, feat_dim=feat, nce_k=nce_k, nce_t=0.1, nce_m=0.5,
                  bank_dtype=torch.float64, backend=backend).double().to(device_of(backend))
    bank_s, bank_t = crd.memory_s.rows.clone(), crd.memory_t.rows.clone()
    z_s = z_t = None
    for _step in range(3):  # Z is estimated on step 0 and frozen afterwards
        kw = dict(dtype=torch.float64, device=device_of(backend))
        f_s = torch.randn(b, s_dim, **kw, requires_grad=True)
        f_t = torch.randn(b, t_dim, **kw, requires_grad=True)
        idx = torch.randperm(n_data, device=kw["device"])[:b]
        contrast_idx = torch.cat([idx[:, None], torch.randint(n_data, (b, nce_k), device=kw["device"])], 1)
        ref, bank_s, bank_t, z_s, z_t = repdistiller_step(crd, bank_s, bank_t, z_s, z_t, f_s, f_t, idx, contrast_idx)
        params = [f_s, f_t, *crd.parameters()]
        ref_grads = torch.autograd.grad(ref * 1.7, params)  # grad_output != 1
        loss = crd(f_s, f_t, idx, contrast_idx)
        grads = torch.autograd.grad(loss * 1.7, params)
        torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-10)
        for got, want in zip(grads, ref_grads):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(crd.memory_s.rows, bank_s, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(crd.memory_t.rows, bank_t, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(crd.log_z_s, torch.log(z_s), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(crd.log_z_t, torch.log(z_t), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_crd_loss_failure_mutates_nothing(backend, monkeypatch):
    monkeypatch.setattr(validation, "_checks_on_gpu", True)  # value checks sync, so GPU runs them on request
    device = device_of(backend)
    crd = CRDLoss(8, 8, 50, feat_dim=4, nce_k=5, backend=backend).to(device)
    before = {k: v.clone() for k, v in crd.state_dict().items()}
    f = torch.randn(3, 8, device=device)
    ids = torch.tensor([0, 1, 2], device=device)
    nan_row = torch.tensor([1], device=device)
    with pytest.raises(ValueError, match="idx"):
        crd(f, f, torch.tensor([0, 1, 50], device=device))
    with pytest.raises(ValueError, match="contrast_idx|idx"):
        crd(f, f, ids, torch.randint(50, (3, 6), device=device).index_fill_(1, torch.tensor([3], device=device), 99))
    with pytest.raises(ValueError, match="f_s"):
        crd(f.clone().index_fill_(0, nan_row, float("nan")), f, ids)
    with pytest.raises(ValueError, match="f_t"):
        crd(f, f.clone().index_fill_(0, nan_row, float("nan")), ids)
    with pytest.raises(ValueError, match=r"f_t must have idx.shape\[0\] = 3 rows"):
        crd(f, f[:2], ids)
    for key, value in crd.state_dict().items():
        torch.testing.assert_close(value, before[key], equal_nan=True)


def test_crd_loss_samples_reproducibly_from_generator():
    crd = CRDLoss(8, 8, 50, feat_dim=4, nce_k=5)
    idx = torch.tensor([3, 4])
    crd.generator = torch.Generator().manual_seed(7)
    first = crd.sample_idx(idx)
    crd.generator = torch.Generator().manual_seed(7)
    assert torch.equal(first, crd.sample_idx(idx)) and torch.equal(first[:, 0], idx)
