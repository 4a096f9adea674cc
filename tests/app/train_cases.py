"""The tiny labelled image set shared by the trainer tests (single process and distributed)."""
import torch

N_DATA, CLASSES, SIZE, EMB = 18, 5, 16, 16


class Faces(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(1)
        self.images = torch.rand(N_DATA, 3, SIZE, SIZE, generator=g) * 2 - 1
        self.labels = torch.arange(N_DATA) % CLASSES

    def __len__(self):
        return N_DATA

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i]), i
