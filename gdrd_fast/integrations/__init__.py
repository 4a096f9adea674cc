"""Drop-in adapters for code that already does knowledge distillation elsewhere.

repdistiller: CRDLoss(opt) and RepDistiller criterion state (used by gdrd_fast.CRDLoss itself);
torchdistill: gdrd_fast's losses registered in torchdistill's loss registry (needs torchdistill);
metric_learning: CrossBatchNTXentLoss, pytorch-metric-learning's CrossBatchMemory(NTXentLoss);
moco: fuse(model), MoCo's builder on the fused InfoNCE with its Acc@1/Acc@5 meters kept.
See docs/switching/ for one page per project.
"""
