"""The paper-scale modules at their real sizes (docs/method/models.md), one step of each stage on CPU:
IResNet-18 student (112x112), PGDiff encoder teacher (448x448 -> 512x14x14), IResNet-50 ArcFace teacher,
ArcFace head over CASIA-WebFace's 10,575 identities."""
import pytest
import torch
import torch.nn.functional as F

from gdrd_fast import FeatureRegressionLoss
from gdrd_fast.models import ArcFaceHead, build_discriminative_teacher, build_generative_teacher, build_student

BATCH, CASIA_IDS, KD_T = 2, 10575, 4.0


def lr_face(batch, size=16):
    hr = torch.rand(batch, 3, 112, 112) * 2 - 1
    lr = F.interpolate(hr, size=(size, size), mode="bilinear", align_corners=False)
    return hr, F.interpolate(lr, size=(112, 112), mode="bilinear", align_corners=False)


def changed(params, before):
    return [not torch.equal(p, b) for p, b in zip(params, before)]


@pytest.mark.slow
def test_stage1_generative_distillation_step_at_paper_size():
    student = build_student("r18")
    teacher = build_generative_teacher("pgdiff").eval().requires_grad_(False)
    _, x_lr = lr_face(BATCH)
    x_teacher = F.interpolate(x_lr, size=(448, 448), mode="bicubic", align_corners=False)
    with torch.no_grad():
        target = teacher(x_teacher)
    assert target.shape == (BATCH, 512, 14, 14) == (BATCH, teacher.out_channels, 448 // teacher.stride, 14)

    feature = student.backbone(x_lr)
    assert feature.shape == (BATCH, 256, 14, 14)
    regression = FeatureRegressionLoss(student.backbone.out_channels, teacher.out_channels)
    params = list(student.backbone.parameters()) + list(regression.parameters())
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)
    loss = regression(feature, target)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    trainable = [p.requires_grad for p in params]
    assert changed(params, before) == trainable  # every trainable tensor moved, the fixed BN scale did not
    assert all(p.grad is None for p in student.head.parameters())


@pytest.mark.slow
def test_stage2_discriminative_distillation_step_at_paper_size():
    student = build_student("r18")
    student.backbone.eval().requires_grad_(False)  # frozen after stage 1, BN statistics included
    teacher = build_discriminative_teacher("r50").eval().requires_grad_(False)
    student_cls, teacher_cls = ArcFaceHead(512, CASIA_IDS), ArcFaceHead(512, CASIA_IDS).requires_grad_(False)
    x_hr, x_lr = lr_face(BATCH)
    labels = torch.randint(0, CASIA_IDS, (BATCH,))
    with torch.no_grad():
        e_t = teacher(x_hr)
        z_t = teacher_cls(e_t, labels).plain
        feature = student.backbone(x_lr)
    e_s = student.head(feature)
    assert e_t.shape == e_s.shape == (BATCH, 512)
    logits = student_cls(e_s, labels)
    assert logits.margin.shape == logits.plain.shape == (BATCH, CASIA_IDS)
    l_cls = F.cross_entropy(logits.margin, labels)
    l_kd = KD_T ** 2 * F.kl_div(F.log_softmax(logits.plain / KD_T, 1), F.log_softmax(z_t / KD_T, 1),
                               log_target=True, reduction="batchmean")
    params = [p for p in list(student.head.parameters()) + list(student_cls.parameters()) if p.requires_grad]
    before = [p.detach().clone() for p in params]
    backbone_before = [p.detach().clone() for p in student.backbone.parameters()]
    (l_cls + 0.5 * l_kd).backward()
    torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4).step()
    assert all(changed(params, before))
    assert not any(changed(list(student.backbone.parameters()), backbone_before))
