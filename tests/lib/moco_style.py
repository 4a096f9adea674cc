"""MoCo's model and training step as moco/builder.py and main_moco.py (facebookresearch/moco@132aea9) run
them, re-written here from their logic (no MoCo code is copied): the peer side of tests/lib/test_moco.py."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TinyEncoder(nn.Module):
    """Stands in for a torchvision ResNet: built as base_encoder(num_classes=dim), with a `fc` head."""

    def __init__(self, num_classes: int, width: int = 12, hidden: int = 24):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(width, hidden), nn.Tanh())
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x):
        return self.fc(self.body(x))


class MoCoStyle(nn.Module):
    """Query and momentum key encoders, and a [dim, K] queue of unit columns with a write pointer.

    In one process MoCo's batch shuffle is the identity and its all-gather returns the batch itself."""

    def __init__(self, base_encoder, dim=128, K=65536, m=0.999, T=0.07, mlp=False):
        super().__init__()
        self.K, self.m, self.T = K, m, T
        self.encoder_q, self.encoder_k = base_encoder(num_classes=dim), base_encoder(num_classes=dim)
        if mlp:  # an extra hidden layer before each head
            for encoder in (self.encoder_q, self.encoder_k):
                hidden = encoder.fc.weight.shape[1]
                encoder.fc = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), encoder.fc)
        for p_q, p_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            p_k.data.copy_(p_q.data)
            p_k.requires_grad = False
        # the queue is drawn column-wise, [dim, K], and each column (one key) made a unit vector
        self.register_buffer("queue", F.normalize(torch.randn(dim, K), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def _momentum_update_key_encoder(self):
        for p_q, p_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            p_k.data = p_k.data * self.m + p_q.data * (1.0 - self.m)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys):
        n, start = keys.shape[0], int(self.queue_ptr)
        assert self.K % n == 0
        self.queue[:, start:start + n] = keys.T
        self.queue_ptr[0] = (start + n) % self.K

    @torch.no_grad()
    def _batch_shuffle_ddp(self, x):
        return x, torch.arange(x.shape[0])

    @torch.no_grad()
    def _batch_unshuffle_ddp(self, x, idx_unshuffle):
        return x[idx_unshuffle]

    def forward(self, im_q, im_k):
        q = F.normalize(self.encoder_q(im_q), dim=1)
        with torch.no_grad():
            self._momentum_update_key_encoder()
            im_k, restore = self._batch_shuffle_ddp(im_k)
            k = self._batch_unshuffle_ddp(F.normalize(self.encoder_k(im_k), dim=1), restore)
        # column 0: the key's logit; columns 1..K: the queue's, all over T
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ self.queue.clone().detach()], 1) / self.T
        targets = torch.zeros(logits.shape[0], dtype=torch.long)
        self._dequeue_and_enqueue(k)
        return logits, targets


def accuracy(output, target, topk=(1,)):
    """main_moco.py's meter input: per k, the percentage of rows whose target is among the top k."""
    with torch.no_grad():
        _, best = output.topk(max(topk), 1, True, True)
        hit = best.t() == target.view(1, -1)
        return [hit[:k].reshape(-1).float().sum(0, keepdim=True) * (100.0 / target.size(0)) for k in topk]


# main_moco.py's lines that the switching page's diff touches, and the training step that uses them
SCRIPT = """\
criterion = nn.CrossEntropyLoss().cuda(args.gpu)
# each step
output, target = model(im_q=images[0], im_k=images[1])
loss = criterion(output, target)
acc1, acc5 = accuracy(output, target, topk=(1, 5))
"""
