"""The two classification tasks: class names, age-bin edges, and what an age bin means in years.

These facts travel with every artifact (the dataset manifest, the compiled IR's JSON),
so the edge runner reads them from the model instead of repeating them.
"""
from typing import Dict, List, Sequence

# Decade bins of the reference project: 0-9, 10-19, ..., 70-79, 80+.
AGE_BIN_EDGES = [0, 10, 20, 30, 40, 50, 60, 70, 80]
AGE_LABELS = [f"{lo}-{hi - 1}" for lo, hi in zip(AGE_BIN_EDGES, AGE_BIN_EDGES[1:])] + ["80+"]
# Representative age of each bin for the expected-age MAE; 80+ uses 85, about the mean
# age of UTKFace faces over 80.
AGE_BIN_CENTRES = [lo + 4.5 for lo in AGE_BIN_EDGES[:-1]] + [85.0]
GENDER_LABELS = ["Male", "Female"]  # UTKFace: 0 male, 1 female
MAX_AGE = 116

# Adience's eight age groups (Levi & Hassner 2015) as the fold files write them; the last, "(60, 100)", is 60+.
ADIENCE_AGE_GROUPS = [(0, 2), (4, 6), (8, 12), (15, 20), (25, 32), (38, 43), (48, 53), (60, 100)]
ADIENCE_AGE_LABELS = [f"{lo}-{hi}" for lo, hi in ADIENCE_AGE_GROUPS[:-1]] + ["60+"]
ADIENCE_AGE_EDGES = [lo for lo, _ in ADIENCE_AGE_GROUPS]
ADIENCE_AGE_CENTRES = [(lo + hi) / 2 for lo, hi in ADIENCE_AGE_GROUPS]

# Each age label set by name: its labels, the first year of each class, and the age that stands for each
# class in an expected-age MAE. A dataset manifest names its set; the registry (caffekit/models.py) says which
# source uses which.
AGE_SCHEMES: Dict[str, dict] = {
    "decades": {"labels": AGE_LABELS, "edges": AGE_BIN_EDGES, "centres": AGE_BIN_CENTRES},
    "adience": {"labels": ADIENCE_AGE_LABELS, "edges": ADIENCE_AGE_EDGES, "centres": ADIENCE_AGE_CENTRES},
}


def age_to_bin(age: int) -> int:
    if not 0 <= age <= MAX_AGE:
        raise ValueError(f"age {age} outside 0..{MAX_AGE}")
    return min(age // 10, len(AGE_LABELS) - 1)


TASKS: Dict[str, dict] = {
    "age": {"net": "age_net", "labels": AGE_LABELS, "age_bin_edges": AGE_BIN_EDGES,
            "age_bin_centres": AGE_BIN_CENTRES},
    "gender": {"net": "gender_net", "labels": GENDER_LABELS},
}


def labels(task: str) -> List[str]:
    return TASKS[task]["labels"]


def age_scheme(labels: Sequence[str]) -> dict:
    """The age label set whose labels are ``labels`` (raises KeyError for labels of no known set)."""
    for name, scheme in AGE_SCHEMES.items():
        if list(labels) == scheme["labels"]:
            return {"name": name, **scheme}
    raise KeyError(f"no age label set has the labels {list(labels)}")
