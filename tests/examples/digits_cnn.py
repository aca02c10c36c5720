# digits_cnn.py: a small CNN on scikit-learn's bundled 8x8 digits, for `efmuon ... --model digits_cnn:make`
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits

from efmuon.common.usermodel import UserModel


class CNN(nn.Module):
    def __init__(self, channels: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 3, padding=1)             # 8x8 -> pooled 4x4
        self.conv2 = nn.Conv2d(channels, 2 * channels, 3, padding=1)  # 4x4 -> pooled 2x2
        self.head = nn.Linear(2 * channels * 2 * 2, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.head(x.flatten(1))


def make(seed, workers, options):
    """efmuon calls this on the server, on every worker and in `efmuon simulate` (under a seeded RNG)."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8) in [0, 1]
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    val, train = perm[:360], perm[360:]
    shards = train.tensor_split(workers)  # client j trains on shards[j]
    batch_size = int(options.get("batch_size", 64))

    def batch(j, k):  # client j's batch of round k: a function of (j, k) alone
        g = torch.Generator().manual_seed(seed * 1_000_003 + j * 10_007 + k)
        idx = shards[j][torch.randint(len(shards[j]), (batch_size,), generator=g)]
        return x[idx], y[idx]

    def loss(model, b):
        return F.cross_entropy(model(b[0]), b[1])

    def loss_on(idx):
        return lambda model: float(F.cross_entropy(model(x[idx]), y[idx]))

    return UserModel(model=CNN(int(options.get("channels", 8))), loss=loss, batch=batch,
                     train_eval_loss=loss_on(train), eval_loss=loss_on(val),
                     defaults={"lr": 0.1, "rounds": 60, "lr_mult": {"sign": 8.0, "bias_rms": 0.1}})
