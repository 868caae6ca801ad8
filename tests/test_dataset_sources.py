"""The build from Adience and IMDB-WIKI (dataset/adience.py, dataset/imdb_wiki.py) on generated folders in the real
formats: every messy row mapped or skipped as documented, FOLD=k testing on fold k's users, class counts, and
byte-identical records from two builds."""
import collections
import datetime
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from caffekit import formats, models, tasks
from caffekit.errors import KitError
from dataset import adience, imdb_wiki
from dataset.build import build
from dataset.lmdb_io import read_records

import source_fixtures

SIZE = 16
JOINT = 12


@pytest.fixture(scope="module")
def adience_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("adience")
    return root, source_fixtures.write_adience(root)


@pytest.fixture(scope="module")
def adience_built(adience_dir, tmp_path_factory):
    root, _ = adience_dir
    out = tmp_path_factory.mktemp("adience_built") / "data"
    return out, build(root, out, source="adience", fold=1, size=SIZE, joint_size=JOINT, seed=2, progress=False)


@pytest.fixture(scope="module")
def imdb_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("imdb-wiki")
    return root, source_fixtures.write_imdb_wiki(root)


@pytest.fixture(scope="module")
def imdb_built(imdb_dir, tmp_path_factory):
    root, _ = imdb_dir
    out = tmp_path_factory.mktemp("imdb_built") / "data"
    return out, build(root, out, source="imdb-wiki", size=SIZE, joint_size=JOINT, test_fraction=0.25, seed=2,
                      progress=False)


def records(out, name):
    return [(key.decode(), formats.parse_datum(value)) for key, value in read_records(out / "lmdb" / name)]


def source_name(key):
    return key.split("_", 1)[1].split("~aug")[0]


# ---------------------------------------------------------------- Adience
@pytest.mark.parametrize("text, group, years", [
    ("(0, 2)", 0, 1), ("(60, 100)", 7, 80), ("(25, 32)", 4, 28),
    ("35", 5, 35), ("(25, 23)", 4, 24), ("(27, 32)", 4, 29), ("(38, 42)", 5, 40), ("(38, 48)", 5, 43),
    ("(8, 23)", 3, 15), ("3", 0, 3), ("13", 2, 13), ("14", 3, 14), ("57", 6, 57), ("101", 7, 101), ("0", 0, 0),
])
def test_adience_age_values_map_to_groups_by_the_documented_rule(text, group, years):
    assert adience.age_group(text) == (group, years, "")


@pytest.mark.parametrize("text, words", [("None", "age unknown"), ("", "age unknown"), ("  ", "age unknown"),
                                         ("(25, )", "not a range"), ("2-4", "not a range")])
def test_adience_unusable_ages_are_skipped_with_a_reason(text, words):
    group, years, reason = adience.age_group(text)
    assert group is None and years is None and words in reason


def test_adience_gender_m_f_kept_u_and_empty_skipped():
    assert adience.gender_label("m") == (0, "") and adience.gender_label("f") == (1, "")
    assert "unknown" in adience.gender_label("u")[1] and "unknown" in adience.gender_label(" ")[1]
    assert adience.gender_label("x")[0] is None


def test_adience_every_messy_row_is_mapped_or_skipped_as_documented(adience_dir, adience_built):
    _, expected = adience_dir
    out, manifest = adience_built
    reasons = {entry["file"]: entry["reason"] for entry in manifest["skipped"]}
    for name, words in expected["skipped"].items():
        assert words in reasons[name], name
    assert set(reasons) == set(expected["skipped"])
    labels = {}
    for lmdb_name in ("age_train_lmdb", "age_test_lmdb"):
        for key, datum in records(out, lmdb_name):
            labels[source_name(key)] = datum.label
    assert labels == {name: face["age_class"] for name, face in expected["faces"].items()}
    values = manifest["labels"]["rules"]["age_values"]
    assert values["35"] == {"group": "38-43", "rows": 1} and values["(25, 23)"]["group"] == "25-32"
    assert manifest["labels"]["age"] == tasks.ADIENCE_AGE_LABELS == manifest["classes"]["age"]["labels"]
    assert manifest["labels"]["age_scheme"] == "adience"
    assert manifest["skipped_by_reason"]["gender unknown (u or empty)"] == 2


def test_adience_fold_k_is_the_test_split_and_its_users_only(adience_dir, adience_built, tmp_path):
    root, expected = adience_dir
    for fold in (1, 3):
        out = tmp_path / f"fold{fold}"
        manifest = build(root, out, source="adience", fold=fold, size=SIZE, joint_size=0, seed=2, progress=False)
        test = set((out / "splits" / "test.txt").read_text().split())
        train = set((out / "splits" / "train.txt").read_text().split())
        assert test == expected["folds"][fold]
        assert {name.split("/")[0] for name in test} == expected["users"][fold]
        assert not {name.split("/")[0] for name in train} & expected["users"][fold]  # subject-disjoint
        assert train == set(expected["faces"]) - test
        assert manifest["config"]["fold"] == fold and manifest["split"]["train_folds"] == sorted({0, 1, 2, 3, 4} - {fold})
        assert {source_name(key) for key, _ in records(out, "gender_test_lmdb")} == test


def test_adience_class_counts_match_the_lmdbs_and_the_fixture(adience_dir, adience_built):
    _, expected = adience_dir
    out, manifest = adience_built
    test_names = expected["folds"][1]
    for task, n_classes in (("age", 8), ("gender", 2)):
        key = "age_class" if task == "age" else "gender"
        want_train = collections.Counter(face[key] for name, face in expected["faces"].items() if name not in test_names)
        want_test = collections.Counter(face[key] for name, face in expected["faces"].items() if name in test_names)
        table = manifest["classes"][task]
        assert table["train"] == [want_train[c] for c in range(n_classes)]
        assert table["test"] == [want_test[c] for c in range(n_classes)]
        train_labels = collections.Counter(d.label for _, d in records(out, f"{task}_train_lmdb"))
        assert [train_labels[c] for c in range(n_classes)] == table["train_oversampled"]
        assert len(set(table["train_oversampled"])) == 1


def test_adience_joint_lmdbs_take_the_midpoint_and_say_so(adience_dir, adience_built):
    _, expected = adience_dir
    out, manifest = adience_built
    years = {source_name(key): datum.label for key, datum in records(out, "joint_test_lmdb")}
    for name, label in years.items():
        text = expected["faces"][name]["age_text"]
        assert label == adience.age_group(text)[1]
    assert "midpoint" in manifest["labels"]["rules"]["age_years"]


def test_adience_build_is_deterministic(adience_dir, adience_built, tmp_path):
    root, _ = adience_dir
    out, manifest = adience_built
    again = build(root, tmp_path / "again", source="adience", fold=1, size=SIZE, joint_size=JOINT, seed=2,
                  workers=1, progress=False)
    assert again["outputs"] == manifest["outputs"]
    for name in ("age_train_lmdb", "gender_test_lmdb", "joint_train_lmdb"):
        assert list(read_records(out / "lmdb" / name)) == list(read_records(tmp_path / "again" / "lmdb" / name))
    for name in ("mean.binaryproto", "age_test.csv", "splits/test.txt"):
        assert (out / name).read_bytes() == (tmp_path / "again" / name).read_bytes()


def test_adience_errors_name_the_file(adience_dir, tmp_path):
    root, _ = adience_dir
    with pytest.raises(KitError, match="fold 5: adience has folds 0..4"):
        build(root, tmp_path / "x", source="adience", fold=5, progress=False)
    with pytest.raises(KitError, match="utkface has no folds"):
        build(root, tmp_path / "x", fold=1, progress=False)
    with pytest.raises(KitError, match="no race labels"):
        build(root, tmp_path / "x", source="adience", race="asian", progress=False)
    broken = tmp_path / "broken"
    (broken / "aligned").mkdir(parents=True)
    with pytest.raises(KitError, match=r"fold_0_data\.txt: Adience fold file not found"):
        build(broken, tmp_path / "x", source="adience", progress=False)
    (broken / "fold_0_data.txt").write_text("user\tage\n")
    with pytest.raises(KitError, match=r"fold_0_data\.txt: the first line is not the header"):
        build(broken, tmp_path / "x", source="adience", progress=False)
    assert not (tmp_path / "x").exists()


def test_adience_age_net_fits_eight_classes():
    """The registry's age labels per source, and the net resized to them (what training has to call)."""
    assert models.source_age_labels("adience") == tuple(tasks.ADIENCE_AGE_LABELS)
    assert models.source_age_labels("utkface") == tuple(tasks.AGE_LABELS) == models.source_age_labels("imdb-wiki")
    entry = models.with_age_labels("age", tasks.ADIENCE_AGE_LABELS)
    for name in ("deploy.prototxt", "train_val.prototxt"):
        net = models.fit_net(formats.read_net(f"caffe_models/age_net/{name}"), entry)
        fc8 = [layer for layer in list(net.layer) + list(net.layers) if layer.name == "fc8"]
        assert [layer.inner_product_param.num_output for layer in fc8] == [8]
    assert models.head_metadata(entry.heads[0])["age_bin_centres"] == tasks.ADIENCE_AGE_CENTRES
    assert models.with_age_labels("joint", tasks.ADIENCE_AGE_LABELS) == models.model("joint")  # fixed decade bins
    assert models.with_age_labels("gender", tasks.ADIENCE_AGE_LABELS) == models.model("gender")


def test_dataset_age_labels_come_from_the_manifest(adience_built, tmp_path):
    out, _ = adience_built
    assert models.dataset_age_labels(out) == tuple(tasks.ADIENCE_AGE_LABELS)
    assert models.for_dataset("age", out).heads[0].labels == tuple(tasks.ADIENCE_AGE_LABELS)
    assert models.dataset_age_labels(tmp_path) == tuple(tasks.AGE_LABELS)  # no manifest: the decades
    (tmp_path / "manifest.json").write_text(json.dumps({"classes": {"age": {"labels": ["a", "b"]}}}))
    with pytest.raises(KitError, match="manifest.json: no known age labels"):
        models.dataset_age_labels(tmp_path)


def test_cli_builds_adience_fold(adience_dir, tmp_path):
    root, expected = adience_dir
    out = tmp_path / "cli out"
    result = subprocess.run([sys.executable, "-m", "dataset.build", "--source", "adience", "--input", str(root),
                             "--fold", "4", "--out", str(out), "--size", "16", "--joint-size", "0"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "(test: fold 4)" in result.stdout and "gender unknown" in result.stdout
    assert set((out / "splits" / "test.txt").read_text().split()) == expected["folds"][4]
    bad = subprocess.run([sys.executable, "-m", "dataset.build", "--input", str(root), "--min-face-score", "2",
                          "--out", str(tmp_path / "bad")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "imdb-wiki filter" in bad.stderr


# ---------------------------------------------------------------- IMDB-WIKI
def test_matlab_day_numbers_and_the_mid_year_age():
    assert imdb_wiki.birth_date(723671.0) == datetime.date(1981, 5, 5)  # wiki.mat's 10000217_1981-05-05_2009.jpg
    assert imdb_wiki.age_at_mid_year(datetime.date(1981, 5, 5), 2009) == 28
    assert imdb_wiki.age_at_mid_year(datetime.date(1981, 7, 1), 2009) == 28
    assert imdb_wiki.age_at_mid_year(datetime.date(1981, 7, 2), 2009) == 27
    for dob in (0.0, 12.0, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            imdb_wiki.birth_date(dob)


def test_mat_is_read_in_the_loadmat_layout(imdb_dir):
    import scipy.io

    root, _ = imdb_dir
    raw = scipy.io.loadmat(str(root / "wiki_crop" / "wiki.mat"))["wiki"][0, 0]
    assert raw["full_path"].shape[0] == 1 and raw["full_path"][0][0][0].endswith(".jpg")  # the real file's shape
    fields = imdb_wiki.read_mat(root / "wiki_crop" / "wiki.mat", "wiki")
    assert fields["full_path"][0] == str(raw["full_path"][0][0][0])
    assert imdb_wiki.mat_path(root, "imdb") == root / "imdb.mat"  # beside the crop folder works too


def test_imdb_wiki_filters_skip_with_reasons_and_labels_map(imdb_dir, imdb_built):
    _, expected = imdb_dir
    out, manifest = imdb_built
    reasons = collections.defaultdict(list)
    for entry in manifest["skipped"]:
        reasons[entry["file"]].append(entry["reason"])
    for name, words in expected["skipped"].items():
        assert reasons[name] and words in reasons[name][0], name
    for name in expected["twice"]:
        assert reasons[name] == [imdb_wiki.TWICE]  # the first listing is used, the second skipped
    assert set(reasons) == set(expected["skipped"]) | set(expected["twice"])
    by_reason = manifest["skipped_by_reason"]
    assert by_reason[imdb_wiki.BAD_AGE] == 4 and by_reason["blank image (all one colour)"] == 4
    assert sum(by_reason.values()) == len(manifest["skipped"])
    faces = {}
    for key, datum in records(out, "joint_train_lmdb") + records(out, "joint_test_lmdb"):
        faces[source_name(key)] = datum.label
    genders = {source_name(key): datum.label for key, datum in records(out, "gender_train_lmdb")
               + records(out, "gender_test_lmdb")}
    assert faces == {name: face["age"] for name, face in expected["faces"].items()}
    assert genders == {name: face["gender"] for name, face in expected["faces"].items()}
    assert manifest["labels"]["age_scheme"] == "decades" and manifest["config"]["race"] == "all"
    assert manifest["labels"]["rules"]["filters"]["min_face_score"] == 1.0


def test_imdb_wiki_filter_flags(imdb_dir, tmp_path):
    root, _ = imdb_dir
    manifest = build(root, tmp_path / "loose", source="imdb-wiki", size=SIZE, joint_size=0, test_fraction=0.25,
                     progress=False, source_options={"min_face_score": 0.1, "allow_second_face": True,
                                                     "ages": (0, 110), "databases": ["wiki"]})
    kept = set((tmp_path / "loose" / "splits" / "train.txt").read_text().split()) | \
        set((tmp_path / "loose" / "splits" / "test.txt").read_text().split())
    assert {"wiki_crop/06/b.jpg", "wiki_crop/06/c.jpg", "wiki_crop/06/d.jpg"} <= kept
    assert "wiki_crop/06/e.jpg" not in kept and not any(name.startswith("imdb_crop/") for name in kept)
    assert manifest["source"]["files"] == manifest["source"]["wiki"]


def test_imdb_wiki_build_is_deterministic(imdb_dir, imdb_built, tmp_path):
    root, _ = imdb_dir
    out, manifest = imdb_built
    again = build(root, tmp_path / "again", source="imdb-wiki", size=SIZE, joint_size=JOINT, test_fraction=0.25,
                  seed=2, workers=1, progress=False)
    assert again["outputs"] == manifest["outputs"]
    assert list(read_records(out / "lmdb" / "age_train_lmdb")) == \
        list(read_records(tmp_path / "again" / "lmdb" / "age_train_lmdb"))


def test_imdb_wiki_errors_name_the_file(tmp_path):
    (tmp_path / "wiki_crop").mkdir()
    with pytest.raises(KitError, match="neither imdb_crop/imdb.mat nor wiki_crop/wiki.mat"):
        build(tmp_path, tmp_path / "x", source="imdb-wiki", progress=False)
    (tmp_path / "wiki_crop" / "wiki.mat").write_bytes(b"not a mat file")
    with pytest.raises(KitError, match=r"wiki\.mat: not an IMDB-WIKI \.mat"):
        build(tmp_path, tmp_path / "x", source="imdb-wiki", progress=False)
    np_struct = {"dob": np.zeros((1, 2))}
    import scipy.io
    scipy.io.savemat(str(tmp_path / "wiki_crop" / "wiki.mat"), {"wiki": np_struct})
    with pytest.raises(KitError, match=r"wiki\.mat: not an IMDB-WIKI \.mat"):
        build(tmp_path, tmp_path / "x", source="imdb-wiki", progress=False)


# ---------------------------------------------------------------- make
def make_words(*args):
    import shlex
    result = subprocess.run(["make", "--no-print-directory", "-n", *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return shlex.split(result.stdout)


def test_make_dataset_passes_source_and_fold_and_race_only_for_utkface():
    words = make_words("dataset", "SOURCE=adience", "FOLD=3", "SOURCE_DIR=my adience")
    assert words[words.index("--source") + 1] == "adience" and words[words.index("--fold") + 1] == "3"
    assert words[words.index("--input") + 1] == "my adience"
    assert "--race" not in words and "data/pretrain" not in words  # no race labels, no UTKFace pre-training set
    words = make_words("dataset")
    assert words[words.index("--source") + 1] == "utkface" and "--fold" not in words
    assert words[words.index("--input") + 1] == "UTKFace" and words[words.index("--race") + 1] == "asian"


def test_make_rejects_unknown_source_fold_and_joint_plan():
    for bad in ("SOURCE=celeba", "FOLD=7", "JOINT_PLAN=balanced"):
        result = subprocess.run(["make", "-n", "dataset", bad], capture_output=True, text=True, timeout=60)
        assert result.returncode != 0 and bad.split("=")[0] in result.stderr


# ---------------------------------------------------------------- the fold summary
def write_fold_report(folder, net, centre, crop10, one_off=None):
    path = folder / f"{net}_net" / "eval" / "report.json"
    path.parent.mkdir(parents=True)
    protocols = {}
    for protocol, value in (("centre", centre), ("10crop", crop10)):
        protocols[protocol] = {"accuracy": value, **({"one_off_accuracy": one_off} if one_off is not None else {})}
    path.write_text(json.dumps({"net": f"{net}_net", "protocols": protocols}))


def test_evaluate_folds_reports_mean_and_sample_std(tmp_path):
    sys.path.insert(0, "scripts")
    import evaluate_folds

    ages, one_offs, genders = [0.45, 0.50, 0.55, 0.48, 0.52], [0.83, 0.85, 0.86, 0.84, 0.87], [0.85] * 5
    folds = []
    for k in range(5):
        folds.append(tmp_path / f"adience_fold_{k}")
        write_fold_report(folds[-1], "age", ages[k], ages[k] + 0.01, one_offs[k])
        write_fold_report(folds[-1], "gender", genders[k], genders[k])
    out = tmp_path / "summary.json"
    assert evaluate_folds.main([*map(str, folds), "--out", str(out)]) == 0
    summary = json.loads(out.read_text())["summary"]
    assert summary["centre"]["age exact"]["mean"] == pytest.approx(np.mean(ages))
    assert summary["centre"]["age exact"]["std"] == pytest.approx(np.std(ages, ddof=1))
    assert summary["centre"]["age 1-off"]["mean"] == pytest.approx(np.mean(one_offs))
    assert summary["10crop"]["age exact"]["mean"] == pytest.approx(np.mean(ages) + 0.01)
    assert summary["centre"]["gender"] == {"mean": pytest.approx(0.85), "std": pytest.approx(0.0),
                                           "stderr": pytest.approx(0.0), "folds": 5}
    (folds[2] / "gender_net" / "eval" / "report.json").unlink()
    with pytest.raises(SystemExit) as exit_info:
        evaluate_folds.main([*map(str, folds)])
    assert exit_info.value.code == 2


@pytest.mark.slow
def test_adience_age_net_trains_evaluates_and_compiles_with_its_eight_groups(adience_dir, tmp_path):
    """Training resizes fc8 to the dataset's classes and writes the matching deploy; evaluation and the IR's JSON
    carry the Adience groups, so the edge runner prints them."""
    out = tmp_path / "data"
    build(adience_dir[0], out, source="adience", fold=1, size=256, joint_size=0, seed=2, progress=False)
    repo = Path(__file__).resolve().parents[1]
    models_dir = tmp_path / "models"

    def step(*args):
        result = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, cwd=repo)
        assert result.returncode == 0, result.stderr[-2000:]
        return result

    step("scripts/train.py", "--net", "age", "--backend", "torch", "--data-dir", out, "--models-dir", models_dir,
         "--max-iter", "1", "--no-progress")
    deploy = formats.read_net(models_dir / "age_net" / "deploy.prototxt")
    (fc8,) = [layer for layer in deploy.layer if layer.name == "fc8"]
    assert fc8.inner_product_param.num_output == 8
    evaluated = step("scripts/evaluate.py", "--net", "age", "--data-dir", out, "--models-dir", models_dir,
                     "--no-progress")
    assert "accuracy" in evaluated.stdout
    report = json.loads((models_dir / "age_net" / "eval" / "report.json").read_text())
    assert report["classes"] == list(tasks.ADIENCE_AGE_LABELS)
    step("scripts/compile_ir.py", "--net", "age", "--data-dir", out, "--models-dir", models_dir, "--precision", "FP32")
    meta = json.loads((models_dir / "ir" / "age_net" / "FP32" / "age_net.json").read_text())
    assert meta["outputs"][0]["labels"] == list(tasks.ADIENCE_AGE_LABELS) and meta["outputs"][0]["size"] == 8
