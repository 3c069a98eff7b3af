"""Tests for extract/manifest.py: class folders, CSV manifests, HAM10000 metadata, ISIC one-hot, errors."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from conftest import SHARED_DATA
from imagefiles import mixed_folder, save

from extract.manifest import Manifest, ManifestError, read_manifest


TINY = np.full((4, 4, 3), 128, dtype=np.uint8)


def img(path: Path) -> Path:
    return save(path, TINY)


def rows(m: Manifest) -> dict[str, tuple[str, str, str]]:
    """image id -> (path, label, group), after checking the lists line up."""
    n = len(m)
    assert len(m.path) == len(m.label) == len(m.group) == n
    assert all(len(values) == n for values in m.meta.values())
    return {i: (p, lab, g) for i, p, lab, g in zip(m.image_id, m.path, m.label, m.group)}


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------- class folders


def test_class_folders_give_labels_and_root_images_are_unlabelled(tmp_path):
    img(tmp_path / "mel" / "m1.jpg")
    img(tmp_path / "mel" / "m2.PNG")  # suffix case does not matter
    img(tmp_path / "nv" / "n1.png")
    img(tmp_path / "nv" / "deeper" / "n2.jpeg")  # nested: label is the top class folder
    img(tmp_path / "loose.jpg")
    (tmp_path / "nv" / "notes.txt").write_text("not an image")
    (tmp_path / "mel" / "scan.dcm").write_bytes(b"DICM")  # not a collected suffix
    m = read_manifest(tmp_path)
    assert m.kind == "folder"
    assert m.root == tmp_path
    assert rows(m) == {
        "loose": ("loose.jpg", "", "loose"),
        "m1": ("mel/m1.jpg", "mel", "m1"),
        "m2": ("mel/m2.PNG", "mel", "m2"),
        "n2": ("nv/deeper/n2.jpeg", "nv", "n2"),
        "n1": ("nv/n1.png", "nv", "n1"),
    }
    assert m.meta == {}
    for row in range(len(m)):
        assert m.file(row).is_file()
        assert m.file(row) == tmp_path / m.path[row]


def test_class_folder_order_is_deterministic(tmp_path):
    for name in ["b.jpg", "a.jpg", "c.jpg"]:
        img(tmp_path / "z" / name)
        img(tmp_path / "y" / name.replace(".", "_y."))
    first = read_manifest(tmp_path)
    assert first.image_id == ["a_y", "b_y", "c_y", "a", "b", "c"]  # folders and files sorted
    assert read_manifest(tmp_path).image_id == first.image_id


def test_colliding_stems_across_folders_keep_the_folder_in_the_id(tmp_path):
    img(tmp_path / "mel" / "a.jpg")
    img(tmp_path / "nv" / "a.png")
    img(tmp_path / "nv" / "b.png")
    m = read_manifest(tmp_path)
    assert rows(m) == {
        "mel/a": ("mel/a.jpg", "mel", "mel/a"),
        "nv/a": ("nv/a.png", "nv", "nv/a"),
        "nv/b": ("nv/b.png", "nv", "nv/b"),
    }
    assert len(set(m.image_id)) == 3


def test_same_stem_twice_in_one_folder_is_a_duplicate_id(tmp_path):
    img(tmp_path / "mel" / "a.jpg")
    img(tmp_path / "mel" / "a.png")
    with pytest.raises(ManifestError, match=r"duplicate image ids: mel/a \(rows 1, 2\)"):
        read_manifest(tmp_path)


def test_mixed_folder_lists_bad_files_too(tmp_path):
    kinds = mixed_folder(tmp_path)
    m = read_manifest(tmp_path)
    assert set(m.image_id) == set(kinds)  # bad files are listed: they fail at load time
    labels = dict(zip(m.image_id, m.label))
    assert labels["cmyk"] == labels["truncated"] == labels["good_mel_0"] == "mel"
    assert labels["sixteen"] == labels["empty"] == labels["rotated_twin"] == "nv"


def test_empty_folder_is_an_error(tmp_path):
    (tmp_path / "mel").mkdir()
    (tmp_path / "mel" / "readme.txt").write_text("no images here")
    with pytest.raises(ManifestError, match="no images found"):
        read_manifest(tmp_path)


# ---------------------------------------------------------------- CSV manifests


def test_csv_with_path_label_lesion_id_and_metadata(tmp_path):
    img(tmp_path / "images" / "a.jpg")
    img(tmp_path / "images" / "b.jpg")
    img(tmp_path / "images" / "c.jpg")
    csv = write(
        tmp_path / "labels.csv",
        "path,label,lesion_id,age,sex,localization\n"
        "images/a.jpg,mel,L1,60.0,male,back\n"
        "images/b.jpg,nv,L1,045,female,\n"
        "images/c.jpg,nv,,NaN,unknown,face\n",
    )
    m = read_manifest(csv)
    assert m.kind == "csv"
    assert m.root == tmp_path  # paths relative to the CSV's folder without --images
    assert rows(m) == {
        "a": ("images/a.jpg", "mel", "L1"),
        "b": ("images/b.jpg", "nv", "L1"),
        "c": ("images/c.jpg", "nv", "c"),  # empty lesion_id: the image is its own group
    }
    # metadata kept as the raw strings, in row order; role columns are not metadata
    assert m.meta == {
        "age": ["60.0", "045", "NaN"],
        "sex": ["male", "female", "unknown"],
        "localization": ["back", "", "face"],
    }
    assert all(m.file(i).is_file() for i in range(len(m)))


def test_csv_with_image_id_and_path_takes_id_from_image_id(tmp_path):
    img(tmp_path / "images" / "file_a.jpg")
    csv = write(tmp_path / "labels.csv", "image_id,path,label\nISIC_1,images/file_a.jpg,mel\n")
    m = read_manifest(csv)
    assert rows(m) == {"ISIC_1": ("images/file_a.jpg", "mel", "ISIC_1")}
    assert m.meta == {}


def test_csv_bare_ids_resolved_under_images_folder(tmp_path):
    images = tmp_path / "pictures"
    img(images / "x1.jpg")
    img(images / "sub" / "x2.jpg")  # nested subfolder, found by the index
    img(images / "x3.png")  # not .jpg
    img(images / "deep" / "er" / "x4.jpeg")
    img(images / "x6.JPG")  # upper-case suffix
    csv = write(tmp_path / "meta" / "list.csv", "image_id\nx1\nx2\nx3\nx4\nx5\nx6\n")
    m = read_manifest(csv, images=images)
    assert m.kind == "csv"
    assert m.root == images
    got = rows(m)
    assert {k: v[0] for k, v in got.items()} == {
        "x1": "x1.jpg",
        "x2": "sub/x2.jpg",
        "x3": "x3.png",
        "x4": "deep/er/x4.jpeg",
        "x5": "x5.jpg",  # missing: kept, fails at load time
        "x6": "x6.JPG",
    }
    assert all(label == "" for _, label, _ in got.values())
    assert [m.file(i).is_file() for i in range(len(m))] == [True, True, True, True, False, True]


def test_csv_image_column_with_suffix_gives_id_without_suffix(tmp_path):
    images = tmp_path / "imgs"
    img(images / "ISIC_0000001.jpg")
    img(images / "part2" / "ISIC_0000002.jpg")
    csv = write(tmp_path / "gt.csv", "image,label\nISIC_0000001.jpg,mel\nISIC_0000002.jpg,nv\n")
    m = read_manifest(csv, images=images)
    assert rows(m) == {
        "ISIC_0000001": ("ISIC_0000001.jpg", "mel", "ISIC_0000001"),
        "ISIC_0000002": ("part2/ISIC_0000002.jpg", "nv", "ISIC_0000002"),
    }


def test_ham_style_columns(tmp_path):
    images = tmp_path / "HAM10000_images"
    img(images / "HAM10000_images_part_1" / "ISIC_0027419.jpg")
    img(images / "HAM10000_images_part_2" / "ISIC_0025030.jpg")
    img(images / "ISIC_0026769.jpg")
    csv = write(
        tmp_path / "HAM10000_metadata.csv",
        "lesion_id,image_id,dx,dx_type,age,sex,localization\n"
        "HAM_0000118,ISIC_0027419,bkl,histo,80.0,male,scalp\n"
        "HAM_0000118,ISIC_0025030,bkl,histo,80.0,male,scalp\n"
        "HAM_0002730,ISIC_0026769,mel,consensus,,female,back\n"
        "HAM_0009999,ISIC_0099999,nv,follow_up,35.0,male,trunk\n",
    )
    m = read_manifest(csv, images=images)
    assert m.kind == "csv"
    assert rows(m) == {
        "ISIC_0027419": ("HAM10000_images_part_1/ISIC_0027419.jpg", "bkl", "HAM_0000118"),
        "ISIC_0025030": ("HAM10000_images_part_2/ISIC_0025030.jpg", "bkl", "HAM_0000118"),
        "ISIC_0026769": ("ISIC_0026769.jpg", "mel", "HAM_0002730"),
        "ISIC_0099999": ("ISIC_0099999.jpg", "nv", "HAM_0009999"),
    }
    assert m.meta == {
        "dx_type": ["histo", "histo", "consensus", "follow_up"],
        "age": ["80.0", "80.0", "", "35.0"],
        "sex": ["male", "male", "female", "male"],
        "localization": ["scalp", "scalp", "back", "trunk"],
    }
    assert [m.file(i).is_file() for i in range(len(m))] == [True, True, True, False]


def test_isic_one_hot_ground_truth(tmp_path):
    images = tmp_path / "ISIC_2019_Training_Input"
    for name in ["ISIC_1", "ISIC_2", "ISIC_3", "ISIC_4"]:
        img(images / f"{name}.jpg")
    csv = write(
        tmp_path / "ISIC_2019_Training_GroundTruth.csv",
        "image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK\n"
        "ISIC_1,0.0,1.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0\n"
        "ISIC_2,1.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0\n"
        "ISIC_3,0,0,0,0,0,0,0,1,0\n"
        "ISIC_4,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,1.0\n",
    )
    m = read_manifest(csv, images=images)
    assert m.kind == "isic-one-hot"
    assert rows(m) == {
        "ISIC_1": ("ISIC_1.jpg", "NV", "ISIC_1"),
        "ISIC_2": ("ISIC_2.jpg", "MEL", "ISIC_2"),
        "ISIC_3": ("ISIC_3.jpg", "SCC", "ISIC_3"),
        "ISIC_4": ("ISIC_4.jpg", "UNK", "ISIC_4"),
    }
    assert m.meta == {}  # class columns are not metadata


def test_numeric_columns_that_are_not_one_hot_stay_a_plain_csv(tmp_path):
    img(tmp_path / "a.jpg")
    img(tmp_path / "b.jpg")
    # two 1s in a row: not one-hot, so the columns are metadata and the label column is used
    csv = write(tmp_path / "gt.csv", "image,label,x,y\na,mel,1.0,1.0\nb,nv,0.0,1.0\n")
    m = read_manifest(csv)
    assert m.kind == "csv"
    assert m.label == ["mel", "nv"]
    assert m.meta == {"x": ["1.0", "0.0"], "y": ["1.0", "1.0"]}


@pytest.mark.parametrize(
    "body",
    ["a,1.0,1.0,0.0\nb,0.0,1.0,0.0\n", "a,0,0,0\nb,0,1,0\n", "a,0.5,0.5,0\nb,0,1,0\n"],
    ids=["two-ones", "all-zeros", "fractions"],
)
def test_image_csv_with_only_numeric_columns_is_one_hot_only_with_exactly_one_1(tmp_path, body):
    img(tmp_path / "a.jpg")
    img(tmp_path / "b.jpg")
    m = read_manifest(write(tmp_path / "gt.csv", "image,MEL,NV,BCC\n" + body))
    assert m.kind == "csv"  # a row that is not exactly one 1.0 means this is not a one-hot file
    assert m.label == ["", ""]
    assert list(m.meta) == ["MEL", "NV", "BCC"]


def test_csv_column_names_are_matched_case_insensitively_and_bom_is_ignored(tmp_path):
    img(tmp_path / "imgs" / "x1.jpg")
    csv = tmp_path / "excel.csv"
    csv.write_bytes("\ufeffImage_ID,DX,Patient_ID,Site\nx1,mel,P7,arm\n".encode("utf-8"))
    m = read_manifest(csv, images=tmp_path / "imgs")
    assert rows(m) == {"x1": ("x1.jpg", "mel", "P7")}
    assert m.meta == {"Site": ["arm"]}


# ---------------------------------------------------------------- manifest errors


def test_duplicate_ids_in_csv_are_named(tmp_path):
    img(tmp_path / "x1.jpg")
    img(tmp_path / "x2.jpg")
    csv = write(tmp_path / "dup.csv", "image_id,label\nx1,a\nx2,b\nx1,c\nx2,d\nx3,e\n")
    with pytest.raises(ManifestError, match="2 duplicate image ids") as info:
        read_manifest(csv)
    text = str(info.value)
    assert "x1 (rows 1, 3)" in text and "x2 (rows 2, 4)" in text
    assert "x3" not in text


def test_duplicate_ids_from_different_suffixes_are_an_error(tmp_path):
    csv = write(tmp_path / "dup.csv", "image,label\nISIC_1.jpg,mel\nISIC_1.png,nv\n")
    with pytest.raises(ManifestError, match="duplicate image ids: ISIC_1"):
        read_manifest(csv)


def test_csv_without_image_column_lists_expected_and_found_columns(tmp_path):
    csv = write(tmp_path / "bad.csv", "name,diagnosis\na.jpg,mel\n")
    with pytest.raises(ManifestError, match="no image column") as info:
        read_manifest(csv)
    text = str(info.value)
    for expected in ["path", "image", "image_id", "image_name", "filename", "file"]:
        assert expected in text
    assert "found: name, diagnosis" in text


def test_empty_image_value_is_an_error_with_its_line(tmp_path):
    csv = write(tmp_path / "gap.csv", "image_id,label\nx1,a\n  ,b\n")
    with pytest.raises(ManifestError, match=r"line 3: empty 'image_id'"):
        read_manifest(csv)


def test_missing_images_folder_is_an_error(tmp_path):
    csv = write(tmp_path / "ids.csv", "image_id\nx1\n")
    with pytest.raises(ManifestError, match=r"--images .*nope: no such folder"):
        read_manifest(csv, images=tmp_path / "nope")
    # a file is not a folder either
    with pytest.raises(ManifestError, match="no such folder"):
        read_manifest(csv, images=csv)


def test_missing_data_path_is_an_error(tmp_path):
    with pytest.raises(ManifestError, match=r"--data .*missing\.csv: no such file or folder"):
        read_manifest(tmp_path / "missing.csv")


def test_missing_image_file_is_not_a_manifest_error(tmp_path):
    csv = write(tmp_path / "labels.csv", "path,label\nimages/gone.jpg,mel\n")
    m = read_manifest(csv)
    assert m.image_id == ["gone"]
    assert m.path == ["images/gone.jpg"]
    assert m.label == ["mel"]
    assert not m.file(0).exists()


# ---------------------------------------------------------------- the real data sets


def _shared(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data not available: {path}")
    return path


def test_real_ham10000_metadata_with_images_folder():
    csv = _shared("HAM10000_metadata.csv")
    images = _shared("ham10000_mel_nv_150")
    m = read_manifest(csv, images=images)
    assert m.kind == "csv"
    assert len(m) == 10015
    assert len(set(m.image_id)) == 10015
    assert len(set(m.group)) == 7470
    assert set(m.label) == {"akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"}
    assert Counter(m.label)["nv"] == 6705 and Counter(m.label)["mel"] == 1113
    assert list(m.meta) == ["dx_type", "age", "sex", "localization"]
    assert all(g.startswith("HAM_") for g in m.group)
    found = [i for i in range(len(m)) if m.file(i).is_file()]
    assert len(found) == 2000
    assert all(m.path[i].startswith("images/") for i in found)
    assert {m.label[i] for i in found} == {"mel", "nv"}


def test_real_ham10000_mel_nv_150_labels_csv():
    csv = _shared("ham10000_mel_nv_150", "labels.csv")
    m = read_manifest(csv)
    assert m.kind == "csv"
    assert m.root == csv.parent
    assert len(m) == 2000
    assert Counter(m.label) == {"mel": 1000, "nv": 1000}
    assert len(set(m.group)) == 1563
    assert list(m.meta) == ["dx_type", "age", "sex", "localization"]
    assert all(m.path[i] == f"images/{m.image_id[i]}.jpg" for i in range(len(m)))
    assert all(m.file(i).is_file() for i in range(0, len(m), 97))


# ---------------------------------------------------------------- never another file of the same name


def test_an_explicit_path_is_never_searched_for_by_name(tmp_path):
    """With --images one folder too high, `images/ISIC_1.jpg` is missing: not another set's ISIC_1.jpg."""
    top = tmp_path / "top"
    img(top / "a_other_set" / "ISIC_1.jpg")  # first in a walk of `top`
    img(top / "a_other_set" / "ISIC_2.jpg")
    img(top / "mine" / "images" / "ISIC_1.jpg")
    img(top / "mine" / "images" / "ISIC_2.jpg")
    rows = "ISIC_1,images/ISIC_1.jpg,mel\nISIC_2,images/ISIC_2.jpg,nv\n"
    rows = "ISIC_1,images/ISIC_1.jpg,mel\nISIC_2,images/ISIC_2.jpg,nv\n"
    csv = write(top / "mine" / "labels.csv", "image_id,path,label\n" + rows)
    m = read_manifest(csv, images=top)
    assert m.path == ["images/ISIC_1.jpg", "images/ISIC_2.jpg"]
    assert not any(m.file(i).exists() for i in range(len(m)))  # missing files, listed as such when loaded
    right = read_manifest(csv)  # the CSV's own folder: found
    assert all(right.file(i) == top / "mine" / "images" / f"ISIC_{i + 1}.jpg" for i in range(2))


def test_a_bare_id_matching_several_files_is_an_error_naming_them(tmp_path):
    img(tmp_path / "imgs" / "part_1" / "x1.jpg")
    img(tmp_path / "imgs" / "part_2" / "x1.jpg")
    img(tmp_path / "imgs" / "part_2" / "x2.jpg")
    csv = write(tmp_path / "ids.csv", "image_id,label\nx1,mel\nx2,nv\n")
    with pytest.raises(ManifestError, match="1 image ids match more than one file") as info:
        read_manifest(csv, images=tmp_path / "imgs")
    assert "part_1/x1.jpg" in str(info.value) and "part_2/x1.jpg" in str(info.value)
    img(tmp_path / "flat" / "y.jpg")
    img(tmp_path / "flat" / "y.png")  # two suffixes of one id, side by side
    with pytest.raises(ManifestError, match=r"y matches y\.jpg, y\.png"):
        read_manifest(write(tmp_path / "y.csv", "image_id\ny\n"), images=tmp_path / "flat")
    # the exact file name is not ambiguous
    assert read_manifest(write(tmp_path / "y2.csv", "image\ny.png\n"), images=tmp_path / "flat").path == ["y.png"]
