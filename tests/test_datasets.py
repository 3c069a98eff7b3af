"""The field's data sets read as they are published: ISIC 2019 (ground truth joined with its metadata),
ISIC 2020 train.csv, PAD-UFES-20, Fitzpatrick17k and DDI, each over a few real images under the names
those sets give them, with groups and skin type, age, sex and site in common names."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from conftest import TINY

from extract.manifest import Manifest, ManifestError, read_manifest
from features.store import FeatureStore

HAM = "ham10000_mel_nv_150"


def images(shared_data: Path, folder: Path, names: list[str]) -> Path:
    """Real images (HAM10000, 150 px) copied into `folder` under the names a data set gives them."""
    sources = sorted((shared_data / HAM / "images").glob("*.jpg"))[: len(names)]
    folder.mkdir(parents=True, exist_ok=True)
    for source, name in zip(sources, names):
        shutil.copyfile(source, folder / name)
    return folder


def table(path: Path, header: str, *lines: str) -> Path:
    """A CSV written exactly as published: `header` and rows as comma-separated text."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([header, *lines]) + "\n", encoding="utf-8")
    return path


def by_id(m: Manifest, column: str) -> dict[str, str]:
    """image id -> one column (`label`, `group`, `path` or a metadata name), after checking lengths."""
    assert all(len(values) == len(m) for values in [m.path, m.label, m.group, *m.meta.values()])
    values = m.meta[column] if column in m.meta else getattr(m, column)
    return dict(zip(m.image_id, values))


def test_isic_2019_ground_truth_is_joined_with_the_metadata_next_to_it(tmp_path, shared_data, caplog):
    ids = ["ISIC_0000000", "ISIC_0000001", "ISIC_0000002", "ISIC_0000003"]
    images(shared_data, tmp_path / "ISIC_2019_Training_Input", [f"{i}.jpg" for i in ids])
    truth = table(
        tmp_path / "ISIC_2019_Training_GroundTruth.csv",
        "image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK",
        "ISIC_0000000,0.0,1.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0",
        "ISIC_0000001,1.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0",
        "ISIC_0000002,0.0,0.0,0.0,0.0,0.0,0.0,0.0,1.0,0.0",
        "ISIC_0000003,0.0,0.0,1.0,0.0,0.0,0.0,0.0,0.0,0.0",
    )
    table(tmp_path / "notes.csv", "image,comment", "ISIC_0000000,not metadata")  # sorts after; never joined
    table(
        tmp_path / "ISIC_2019_Training_Metadata.csv",
        "image,age_approx,anatom_site_general,lesion_id,sex",
        "ISIC_0000000,55.0,anterior torso,BCN_0000001,female",
        "ISIC_0000001,30.0,upper extremity,BCN_0000001,male",
        "ISIC_0000002,,,,",  # blank lesion id: the image is its own group
        "ISIC_9999999,70.0,head/neck,BCN_0000009,male",  # a row of an image not in the ground truth
    )  # ISIC_0000003 has no row at all
    with caplog.at_level(logging.WARNING, logger="extract"):
        m = read_manifest(truth)
    assert m.kind == "isic-one-hot + ISIC 2019 metadata (ISIC_2019_Training_Metadata.csv)"
    assert "1 of 4 images have no row in" in caplog.text
    # labels are the class columns as published, as the one-hot reader has always stored them
    assert by_id(m, "label") == dict(zip(ids, ["NV", "MEL", "SCC", "BCC"]))
    assert by_id(m, "group") == dict(zip(ids, ["BCN_0000001", "BCN_0000001", "ISIC_0000002", "ISIC_0000003"]))
    assert by_id(m, "age") == dict(zip(ids, ["55.0", "30.0", "", ""]))
    assert by_id(m, "site") == dict(zip(ids, ["anterior torso", "upper extremity", "", ""]))
    assert by_id(m, "sex") == dict(zip(ids, ["female", "male", "", ""]))
    assert sorted(m.meta) == ["age", "sex", "site"]
    assert all(m.file(row).is_file() for row in range(len(m)))


def test_isic_2019_metadata_columns_in_a_manifest_of_ones_own_keep_its_labels(tmp_path, shared_data):
    images(shared_data, tmp_path, ["a.jpg"])
    m = read_manifest(
        table(tmp_path / "mine.csv", "image,label,age_approx,anatom_site_general,sex", "a,mel,40,back,male")
    )
    assert m.kind == "csv" and m.label == ["mel"] and m.meta["age_approx"] == ["40"]


def test_isic_2020_train_csv(tmp_path, shared_data):
    ids = ["ISIC_2637011", "ISIC_0015719", "ISIC_0052212", "ISIC_0068279"]
    images(shared_data, tmp_path / "jpeg" / "train", [f"{i}.jpg" for i in ids])
    train = table(
        tmp_path / "train.csv",
        "image_name,patient_id,sex,age_approx,anatom_site_general_challenge,diagnosis,benign_malignant,target",
        "ISIC_2637011,IP_7279968,male,45.0,head/neck,unknown,benign,0",
        "ISIC_0015719,IP_3075186,female,45.0,upper extremity,unknown,benign,0",
        "ISIC_0052212,IP_7279968,male,50.0,lower extremity,melanoma,malignant,1",
        "ISIC_0068279,,,,,nevus,benign,0",
    )
    m = read_manifest(train)
    assert m.kind == "ISIC 2020"
    assert by_id(m, "label") == dict(zip(ids, ["benign", "benign", "malignant", "benign"]))
    assert by_id(m, "group") == dict(zip(ids, ["IP_7279968", "IP_3075186", "IP_7279968", "ISIC_0068279"]))
    assert by_id(m, "age") == dict(zip(ids, ["45.0", "45.0", "50.0", ""]))
    assert by_id(m, "sex") == dict(zip(ids, ["male", "female", "male", ""]))
    assert by_id(m, "site") == dict(zip(ids, ["head/neck", "upper extremity", "lower extremity", ""]))
    assert by_id(m, "diagnosis")["ISIC_0052212"] == "melanoma"  # unmapped columns stay, under their names
    assert set(m.meta) == {"age", "sex", "site", "diagnosis", "benign_malignant"}
    assert by_id(m, "path")["ISIC_0015719"] == "jpeg/train/ISIC_0015719.jpg"

    test = table(
        tmp_path / "test.csv",
        "image_name,patient_id,sex,age_approx,anatom_site_general_challenge",
        "ISIC_2637011,IP_1,female,40.0,torso",
    )
    assert read_manifest(test).label == [""]  # the test set's CSV reads as unlabelled

    bad = table(
        tmp_path / "bad.csv", train.read_text().splitlines()[0], "ISIC_2637011,IP_1,male,45.0,torso,nevus,benign,2"
    )
    with pytest.raises(ManifestError, match=r"bad\.csv, line 2: target '2' is not one of 1, 0"):
        read_manifest(bad)


def test_pad_ufes_20_metadata_csv(tmp_path, shared_data):
    files = ["PAT_46_881_939.png", "PAT_46_882_940.png", "PAT_1516_1765_530.png"]
    images(shared_data, tmp_path / "images", files)  # JPEG bytes under .png names: decoded by content
    header = (
        "patient_id,lesion_id,smoke,drink,background_father,background_mother,age,pesticide,gender,"
        "skin_cancer_history,cancer_history,has_piped_water,has_sewage_system,fitspatrick,region,diameter_1,"
        "diameter_2,diagnostic,itch,grew,hurt,changed,bleed,elevation,img_id,biopsed"
    )
    metadata = table(
        tmp_path / "metadata.csv",
        header,
        "PAT_46,881,False,False,POMERANIA,POMERANIA,55,False,FEMALE,True,True,True,True,3.0,NECK,6.0,5.0,BCC,"
        "True,True,False,True,True,True,PAT_46_881_939.png,True",
        "PAT_46,882,False,False,POMERANIA,POMERANIA,55,False,FEMALE,True,True,True,True,3.0,FACE,5.0,5.0,SCC,"
        "True,True,False,True,True,True,PAT_46_882_940.png,True",
        "PAT_1516,1765,,,,,8,,,,,,,,ARM,,,NEV,False,False,False,False,False,False,PAT_1516_1765_530.png,False",
    )
    m = read_manifest(metadata)
    ids = [f.removesuffix(".png") for f in files]
    assert m.kind == "PAD-UFES-20"
    assert by_id(m, "label") == dict(zip(ids, ["BCC", "SCC", "NEV"]))  # as published
    assert by_id(m, "group") == dict(zip(ids, ["PAT_46", "PAT_46", "PAT_1516"]))  # by patient
    assert by_id(m, "lesion_id") == dict(zip(ids, ["881", "882", "1765"]))
    assert by_id(m, "fitzpatrick") == dict(zip(ids, ["3", "3", ""]))
    assert by_id(m, "age") == dict(zip(ids, ["55", "55", "8"]))
    assert by_id(m, "sex") == dict(zip(ids, ["female", "female", ""]))
    assert by_id(m, "site") == dict(zip(ids, ["NECK", "FACE", "ARM"]))
    assert by_id(m, "smoke") == dict(zip(ids, ["False", "False", ""]))
    assert by_id(m, "path") == {i: f"images/{f}" for i, f in zip(ids, files)}
    assert not {"fitspatrick", "gender", "region", "patient_id", "diagnostic", "img_id"} & set(m.meta)


def test_fitzpatrick17k_csv(tmp_path, shared_data):
    hashes = [
        "5e82a45bc5d78bd24ae9202d194423f8",
        "fa2911a9b13b6f8af79cb700937cc14f",
        "d0e4b3b6f3a0f8c1e2d3c4b5a6978899",
    ]
    images(shared_data, tmp_path / "data" / "finalfitz17k", [f"{h}.jpg" for h in hashes])
    m = read_manifest(
        table(
            tmp_path / "data" / "fitzpatrick17k.csv",
            "md5hash,fitzpatrick_scale,fitzpatrick_centaur,label,nine_partition_label,three_partition_label,qc,url,"
            "url_alphanumeric",
            f"{hashes[0]},3,3,drug induced pigmentary changes,inflammatory,non-neoplastic,,https://x/a.jpg,httpsxajpg",
            f"{hashes[1]},-1,-1,melanoma,malignant melanoma,malignant,1 Diagnostic,https://x/b.jpg,httpsxbjpg",
            f"{hashes[2]},6,5,basal cell carcinoma,malignant epidermal,malignant,,https://x/c.jpg,httpsxcjpg",
        )
    )
    assert m.kind == "Fitzpatrick17k"
    assert m.label == ["drug induced pigmentary changes", "melanoma", "basal cell carcinoma"]
    assert m.group == hashes  # no patient ids published: each image its own group
    assert m.meta["fitzpatrick"] == ["3", "", "6"]  # -1 is unknown
    assert m.meta["fitzpatrick_centaur"] == ["3", "", "5"]
    assert m.meta["three_partition_label"] == ["non-neoplastic", "malignant", "malignant"]
    assert m.path == [f"finalfitz17k/{h}.jpg" for h in hashes]


def test_ddi_metadata_csv(tmp_path, shared_data):
    images(shared_data, tmp_path, ["000001.png", "000002.png", "000003.png"])
    m = read_manifest(
        table(
            tmp_path / "ddi_metadata.csv",
            "DDI_ID,DDI_file,skin_tone,malignant,disease",
            "1,000001.png,56,True,melanoma-in-situ",
            "2,000002.png,12,False,verruca-vulgaris",
            "3,000003.png,34,False,seborrheic-keratosis",
        )
    )
    assert m.kind == "DDI"
    assert m.image_id == ["000001", "000002", "000003"]
    assert m.label == ["malignant", "benign", "benign"]
    assert m.group == m.image_id
    assert m.meta["fitzpatrick"] == ["56", "12", "34"]  # bands I-II, III-IV, V-VI as published
    assert m.meta["disease"] == ["melanoma-in-situ", "verruca-vulgaris", "seborrheic-keratosis"]
    assert m.meta["DDI_ID"] == ["1", "2", "3"]

    bad = table(tmp_path / "bad.csv", "DDI_ID,DDI_file,skin_tone,malignant,disease", "1,000001.png,56,maybe,x")
    with pytest.raises(ManifestError, match=r"bad\.csv, line 2: malignant 'maybe' is not one of true, false"):
        read_manifest(bad)


def test_extract_of_fitzpatrick17k_stores_skin_type_and_groups(tmp_path, shared_data, cli):
    hashes = [f"{k:032x}" for k in range(1, 5)]
    images(shared_data, tmp_path / "fitz", [f"{h}.jpg" for h in hashes])
    data = table(
        tmp_path / "fitz" / "fitzpatrick17k.csv",
        "md5hash,fitzpatrick_scale,fitzpatrick_centaur,label,nine_partition_label,three_partition_label,qc,url,"
        "url_alphanumeric",
        *(f"{h},{t},{t},psoriasis,inflammatory,non-neoplastic,,,," for h, t in zip(hashes, ["1", "-1", "6", "2"])),
    )
    out = tmp_path / "s.h5"
    code, stdout, stderr = cli(
        *("extract", "--data", data, "--backbone", TINY, "--weights", "none", "--precision", "fp32"),
        *("--workers", "0", "--runtime", "torch", "--device", "cpu", "--out", out),
    )
    assert code == 0, stderr
    store = FeatureStore(out)
    assert list(store.column("image_id")) == hashes
    assert list(store.column("group")) == hashes
    assert list(store.column("meta/fitzpatrick")) == ["1.0", "", "6.0", "2.0"]  # a number column, -1 blank
    assert list(store.column("label")) == ["psoriasis"] * 4
    assert store.embeddings(TINY).shape[0] == 4
