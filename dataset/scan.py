"""What a source module's ``scan`` hands the build: the candidate faces and everything the manifest says about them."""
from pathlib import Path
from typing import Dict, List, NamedTuple

from dataset.faces import Face


class Scan(NamedTuple):
    images: Path            # the folder that the faces' names are relative to
    faces: List[Face]       # candidates by their labels; the build checks their images next
    skipped: List[dict]     # {"file": name, "reason": why}, one per record left out by its labels
    counts: Dict[str, int]  # "files": records the source lists; source-specific counts beside it
    age_labels: List[str]   # the age classes (caffekit.tasks.AGE_SCHEMES), recorded in the manifest
    rules: Dict[str, object]  # how labels were read or mapped, for the manifest ("labels")
