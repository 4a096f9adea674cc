"""ArcFace margin head: the margin math on hand-built angles, both branches, ignored labels, gradients."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from gdrd_fast.models import ArcFaceHead


def head_with_classes_at(angles, s=64.0, m=0.5, easy_margin=False):
    head = ArcFaceHead(2, len(angles), s=s, m=m, easy_margin=easy_margin).double()
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[math.cos(a), math.sin(a)] for a in angles], dtype=torch.float64) * 3.0)
    return head


def at(angle, norm=2.0):
    return [norm * math.cos(angle), norm * math.sin(angle)]


def test_margin_on_a_hand_case():
    s, m = 64.0, 0.5
    head = head_with_classes_at([0.0, math.pi / 2, math.pi], s, m)
    # row 0: 0.3 rad from class 0; row 1: 3.0 rad from class 0 (theta + m > pi); row 2: label -1
    emb = torch.tensor([at(0.3), at(3.0), at(1.0)], dtype=torch.float64)
    labels = torch.tensor([0, 0, -1])
    margin, plain = head(emb, labels)

    cos = torch.tensor([[math.cos(0.3), math.cos(0.3 - math.pi / 2), math.cos(0.3 - math.pi)],
                        [math.cos(3.0), math.cos(3.0 - math.pi / 2), math.cos(3.0 - math.pi)],
                        [math.cos(1.0), math.cos(1.0 - math.pi / 2), math.cos(1.0 - math.pi)]], dtype=torch.float64)
    torch.testing.assert_close(plain, s * cos)
    expected = cos.clone()
    expected[0, 0] = math.cos(0.3 + m)
    expected[1, 0] = math.cos(3.0) - m * math.sin(m)  # past pi - m: the linear fallback, not cos(3.5)
    torch.testing.assert_close(margin, s * expected)


def test_easy_margin_only_where_cosine_is_positive():
    head = head_with_classes_at([0.0, math.pi / 2], m=0.4, easy_margin=True)
    emb = torch.tensor([at(0.2), at(2.0)], dtype=torch.float64)
    margin, plain = head(emb, torch.tensor([0, 0]))
    assert margin[0, 0].item() == pytest.approx(64 * math.cos(0.6))
    assert margin[1, 0].item() == pytest.approx(64 * math.cos(2.0))  # cos < 0: left alone
    torch.testing.assert_close(margin[:, 1], plain[:, 1])


def test_gradients_and_loss_against_float64_autograd():
    head = ArcFaceHead(7, 11, s=8.0, m=0.5).double()
    emb = torch.randn(9, 7, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (9,))
    labels[3] = -1
    grad_out = torch.randn(9, 11, dtype=torch.float64)  # != 1, so the backward's scaling is checked

    def weighted_margin_logits(e, w):
        return (functional_call(head, {"weight": w}, (e, labels)).margin * grad_out).sum()

    assert torch.autograd.gradcheck(weighted_margin_logits, (emb, head.weight))
    margin, _ = head(emb, labels)
    keep = labels != -1
    torch.testing.assert_close(head.loss(emb, labels), F.cross_entropy(margin[keep], labels[keep]))


def test_float32_embeddings_and_bad_labels():
    head = ArcFaceHead(16, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        margin, plain = head(torch.randn(4, 16, dtype=torch.bfloat16), torch.tensor([0, 1, 2, 3]))
    assert margin.dtype == plain.dtype == torch.float32
    with pytest.raises(ValueError, match="labels must lie in"):
        head(torch.randn(2, 16), torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="labels must lie in"):
        head(torch.randn(2, 16), torch.tensor([0, -2]))
    with pytest.raises(ValueError, match="labels must be an integer tensor"):
        head(torch.randn(2, 16), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="embeddings must be"):
        head(torch.randn(2, 15), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="m < pi/2"):
        ArcFaceHead(16, 5, m=2.0)
