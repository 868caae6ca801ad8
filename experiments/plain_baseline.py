"""Issue 14's plain PyTorch baseline, rerun on the kit's own split, to tell the recipe from the faces.

The issue measured this recipe on 687 Asian faces that are not in ../shared; the joint net is scored on the
kit's Asian test split. Training it here on every UTKFace face of ../shared except the kit's test (and,
with --hold-out, validation) faces and scoring it on those faces says whether the joint net's gap to the
issue's figures comes from its recipe (two stages, oversampling, prior correction, Caffe's solver) or from
the faces. Not part of the kit: plain PyTorch, no Caffe semantics.

    python experiments/plain_baseline.py --utkface ../shared/data/utkface --score data/splits/test.txt
"""
import argparse
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from caffekit.models import age_bin_matrix, infogain_matrix  # noqa: E402
from caffekit.tasks import age_to_bin  # noqa: E402

YEARS = 101


def parse_name(name):
    """(age, gender, race) from UTKFace's file name, or None where the name is not one."""
    fields = name.split("_")
    try:
        age, gender, race = int(fields[0]), int(fields[1]), int(fields[2])
    except (ValueError, IndexError):
        return None
    return (age, gender, race) if 0 <= age < YEARS and gender in (0, 1) else None


def load(folder, names, size=72):
    images, ages, genders = [], [], []
    for name in names:
        labels = parse_name(name)
        image = cv2.imread(str(folder / name)) if labels else None
        if image is None:
            continue
        images.append(cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA))
        ages.append(labels[0])
        genders.append(labels[1])
    return np.stack(images), np.array(ages), np.array(genders)


def block(cin, cout, stride):
    return nn.ModuleDict({
        "a": nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True)),
        "b": nn.Sequential(nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)),
        "proj": (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                 if stride != 1 or cin != cout else nn.Identity()),
    })


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(True))
        self.blocks = nn.ModuleList([block(32, 32, 1), block(32, 64, 2), block(64, 128, 2), block(128, 256, 2)])
        self.drop = nn.Dropout(0.2)
        self.age, self.gender = nn.Linear(256, YEARS), nn.Linear(256, 2)

    def forward(self, x):
        x = self.stem(x)
        for b in self.blocks:
            x = F.relu(b["b"](b["a"](x)) + b["proj"](x))
        x = self.drop(F.adaptive_avg_pool2d(x, 1).flatten(1))
        return self.age(x), self.gender(x)


def to_tensor(batch, mean):
    return torch.from_numpy((batch.astype(np.float32) - mean) / 64.0).permute(0, 3, 1, 2).contiguous()


def score(net, images, ages, genders, mean):
    net.eval()
    age_prob, gender_prob = [], []
    with torch.no_grad():
        for start in range(0, len(images), 256):
            crops = images[start:start + 256, 4:68, 4:68]
            outs = [net(to_tensor(c, mean)) for c in (crops, crops[:, :, ::-1].copy())]
            age_prob.append(sum(F.softmax(a, 1) for a, _ in outs) / 2)
            gender_prob.append(sum(F.softmax(g, 1) for _, g in outs) / 2)
    age_prob, gender_prob = torch.cat(age_prob).numpy(), torch.cat(gender_prob).numpy()
    bin_prob = age_prob @ age_bin_matrix().T
    true_bins = np.array([age_to_bin(a) for a in ages])
    predicted = bin_prob.argmax(1)
    expected = age_prob @ np.arange(YEARS)
    gender_ok = gender_prob.argmax(1) == genders
    return {"faces": int(len(ages)), "age_exact": float(np.mean(predicted == true_bins)),
            "age_1off": float(np.mean(np.abs(predicted - true_bins) <= 1)),
            "mae_expected": float(np.mean(np.abs(expected - ages))),
            "mae_argmax": float(np.mean(np.abs(age_prob.argmax(1) - ages))),
            "gender": float(np.mean(gender_ok)),
            "gender_under10": float(np.mean(gender_ok[ages < 10])),
            "gender_10plus": float(np.mean(gender_ok[ages >= 10]))}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--utkface", type=Path, required=True)
    parser.add_argument("--score", type=Path, required=True, help="split file of the faces to score on")
    parser.add_argument("--hold-out", type=Path, nargs="*", default=[], help="more split files kept out of training")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("logs/plain_baseline.json"))
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    scored = args.score.read_text().split()
    held = set(scored).union(*(set(p.read_text().split()) for p in args.hold_out))
    train_names = sorted(p.name for p in args.utkface.glob("*.jpg") if p.name not in held)
    train, train_ages, train_genders = load(args.utkface, train_names)
    test, test_ages, test_genders = load(args.utkface, scored)
    mean = train.reshape(-1, 3).mean(0).astype(np.float32)
    print(f"train {len(train)} faces (all races), score {len(test)}", flush=True)

    net, targets = Net(), torch.from_numpy(infogain_matrix(2.0))  # row k: the soft label of age k
    decay = [p for n, p in net.named_parameters() if p.ndim > 1]
    other = [p for n, p in net.named_parameters() if p.ndim <= 1]
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": 5e-4}, {"params": other, "weight_decay": 0}],
                                lr=0.1, momentum=0.9, nesterov=True)
    steps_per_epoch = len(train) // 64
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 0.1, total_steps=args.epochs * steps_per_epoch)
    started = time.time()
    for epoch in range(args.epochs):
        net.train()
        order = rng.permutation(len(train))
        for step in range(steps_per_epoch):
            index = order[step * 64:(step + 1) * 64]
            shifts = rng.integers(0, 9, (len(index), 2))
            batch = np.stack([train[i, dy:dy + 64, dx:dx + 64] for i, (dy, dx) in zip(index, shifts)])
            flip = rng.random(len(index)) < 0.5
            batch[flip] = batch[flip, :, ::-1]
            age_logits, gender_logits = net(to_tensor(batch, mean))
            age_target = targets[torch.from_numpy(train_ages[index])]
            loss = (-(age_target * F.log_softmax(age_logits, 1)).sum(1).mean()
                    + F.cross_entropy(gender_logits, torch.from_numpy(train_genders[index])))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        elapsed = time.time() - started
        print(f"epoch {epoch + 1}/{args.epochs} loss {loss.item():.3f} {elapsed / 60:.1f} min "
              f"({(epoch + 1) * steps_per_epoch * 64 / elapsed:.0f} images/s)", flush=True)
    result = score(net, test, test_ages, test_genders, mean)
    result.update(epochs=args.epochs, seed=args.seed, train_faces=int(len(train)), minutes=(time.time() - started) / 60)
    print(json.dumps(result, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
