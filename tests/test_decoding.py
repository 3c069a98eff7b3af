"""`extract --decode torch`: JPEGs decoded in batches on the model's device, by the same recipe as Pillow.

The CUDA path is the same code with another device: every test that touches a device runs on each one
this machine has (the CPU here; the CPU and the GPU where there is one).
"""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
import torch
from conftest import TINY
from imagefiles import EXIF_ORIENTATION, csv_data_set, lesion, lesion_set, mixed_folder, save
from PIL import Image, ImageOps

from extract.decoding import AUTO_DECODE, DECODERS, ORIENTATIONS, Encoded, PilDecoder, TorchDecoder, orient
from extract.preprocess import CROP_MODES, Preprocess
from extract.run import ConfigError, ExtractConfig, stored_decode
from features.store import FeatureStore

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def _jpeg_with_orientation(arr: np.ndarray, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95, exif=exif)
    return buf.getvalue()


def test_orient_turns_each_exif_orientation_as_pillow_does():
    stored = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)  # not square
    for orientation in ORIENTATIONS:
        img = Image.fromarray(stored)
        exif = img.getexif()
        exif[EXIF_ORIENTATION] = orientation
        img.info["exif"] = exif.tobytes()
        expected = np.asarray(ImageOps.exif_transpose(img))
        got = orient(torch.from_numpy(stored).permute(2, 0, 1), orientation).permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(got, expected, err_msg=f"orientation {orientation}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("crop_mode", CROP_MODES)
def test_the_tensor_recipe_gives_pillows_pictures(device, crop_mode):
    """Resize (down and up, bilinear and bicubic), crop and pad as tensors: the pictures of
    `Preprocess.to_uint8` up to the resize's rounding."""
    picture = lesion(3, size=(96, 72))
    for resize, crop, interpolation in ((40, 32, "bilinear"), (128, 112, "bicubic"), (48, 56, "bilinear")):
        pct = crop / resize if crop_mode != "center" else None  # crop_pct marks a timm-style recipe
        recipe = Preprocess(resize, crop, MEAN, STD, interpolation, crop_pct=pct, crop_mode=crop_mode)
        expected = recipe.to_uint8(Image.fromarray(picture)).int()
        batch = torch.from_numpy(picture).permute(2, 0, 1)[None].repeat(2, 1, 1, 1).to(device)
        got = recipe.tensor_to_uint8(batch)
        assert got.dtype == torch.uint8 and got.device.type == device
        assert got.shape == (2, *expected.shape), (resize, crop, interpolation)
        diff = (got.cpu().int() - expected).abs()
        assert diff.float().mean() < 1.0 and diff.max() <= 4, (resize, crop, interpolation, diff.max())


def _batch(decoder, n: int, device: str):
    items = [decoder.dataset()[i] for i in range(n)]
    return decoder.finish(decoder.collate(items), torch.device(device))


@pytest.mark.parametrize("device,in_workers", [(d, w) for d in DEVICES for w in (True, False)])
def test_a_batch_with_bad_files_keeps_its_good_images_and_lists_the_bad_with_pillows_reasons(
    tmp_path, device, in_workers
):
    """In the workers (a CPU device's way) or in one batch in the main process (a GPU's, here on each
    device this machine has)."""
    kinds = mixed_folder(tmp_path)  # JPEGs, PNGs (alpha, 16-bit, EXIF), CMYK, truncated, empty, text
    upright = lesion(40, size=(64, 48))
    stored = np.ascontiguousarray(np.rot90(upright, k=1))  # turned a quarter counter-clockwise...
    (tmp_path / "mel" / "exif6.jpg").write_bytes(_jpeg_with_orientation(stored, 6))  # ...and 6 turns it back
    save(tmp_path / "mel" / "upright.jpg", upright, quality=95)
    data = (tmp_path / "mel" / "good_mel_0.jpg").read_bytes()
    (tmp_path / "mel" / "headless.jpg").write_bytes(data[: data.index(b"\xff\xda")] + b"\xff\xd9")
    kinds.update(exif6="good", upright="good", headless="bad")
    files = sorted(p for p in tmp_path.rglob("*.*"))
    names = [p.stem for p in files]
    recipe = Preprocess(40, 32, MEAN, STD)

    on = torch.device(device)
    torch_decoder = TorchDecoder(files, [recipe], on, in_workers=in_workers)
    pil_decoder = PilDecoder(files, [recipe], on)
    by_torch, by_pil = _batch(torch_decoder, len(files), device), _batch(pil_decoder, len(files), device)
    _, _, payload, _ = torch_decoder.dataset()[names.index("upright")]
    assert isinstance(payload, Encoded) != in_workers  # a JPEG is only read when the main process decodes

    assert {names[p] for p in by_torch.positions} == {i for i, k in kinds.items() if k == "good"}
    assert {names[p]: r for p, r in by_torch.failed.items()} == {names[p]: r for p, r in by_pil.failed.items()}
    assert "truncated" in by_torch.failed[names.index("truncated")]
    assert by_torch.positions == by_pil.positions and by_torch.sha256 == by_pil.sha256
    pictures = by_torch.images[0]
    assert pictures.device.type == device and pictures.dtype == torch.uint8
    diff = (pictures.cpu().int() - by_pil.images[0].int()).abs()
    assert diff.float().mean() < 1.0, diff.float().mean()
    row = {names[p]: r for r, p in enumerate(by_torch.positions)}
    turned = (pictures[row["exif6"]].cpu().int() - pictures[row["upright"]].cpu().int()).abs().float().mean()
    assert turned < 4.0  # the EXIF orientation was applied (a wrong turn differs by tens of levels)
    # Pillow decoded the PNGs and the CMYK JPEG; the colour JPEGs went through the batch decoder
    jpegs = {"exif6", "upright", *(f"good_mel_{k}" for k in range(4))}
    assert torch_decoder.fallbacks == sum(1 for name in row if name not in jpegs)


def test_auto_picks_torch_for_a_new_store_and_a_wrong_name_is_refused(tmp_path):
    assert AUTO_DECODE == "torch"
    new = str(tmp_path / "new.h5")
    assert ExtractConfig(backbone=TINY, device="cpu", out=new).resolved().decode == "torch"
    with pytest.raises(ConfigError, match="--decode 'nvjpeg'"):
        ExtractConfig(backbone=TINY, device="cpu", decode="nvjpeg").resolved()


def test_auto_follows_the_decoder_of_the_store_it_extends(tmp_path, cli):
    """Rerunning a command resumes it: a store made with the other decoder (before --decode existed, or
    on another kind of device) is extended with its own, not refused for other settings."""
    manifest = csv_data_set(tmp_path / "data", 6)
    first = tmp_path / "data" / "first.csv"
    first.write_text("".join(manifest.read_text().splitlines(keepends=True)[:4]))
    other = next(d for d in DECODERS if d != AUTO_DECODE)
    out = tmp_path / "store.h5"
    code, _, err = _extract(cli, first, out, "--decode", other)
    assert code == 0, err
    assert stored_decode(out) == other
    assert ExtractConfig(backbone=TINY, device="cpu", out=str(out)).resolved().decode == other
    code, stdout, err = _extract(cli, manifest, out)  # --decode auto
    assert code == 0, err
    assert f"{TINY} 3 in" in stdout  # only the three images not in the store yet
    store = FeatureStore(out)
    assert store.done(TINY).all() and store.backbone_attrs(TINY)["decode"] == other
    assert stored_decode(tmp_path / "none.h5") is None


def _extract(cli, data, out, *extra):
    options = ("--precision", "fp32", "--runtime", "torch", "--workers", "0", "--batch-size", "64")
    return cli("extract", "--data", data, "--backbone", TINY, "--weights", "none", "--out", out, *options, *extra)


def test_the_decoder_is_in_the_fingerprint_and_stores_of_either_agree(tmp_path, cli):
    kinds = mixed_folder(tmp_path / "data")
    code, out, err = _extract(cli, tmp_path / "data", tmp_path / "torch.h5", "--decode", "torch")
    assert code == 0, err
    assert "decode torch" in out
    code, _, err = _extract(cli, tmp_path / "data", tmp_path / "pil.h5", "--decode", "pil")
    assert code == 0, err
    by_torch, by_pil = FeatureStore(tmp_path / "torch.h5"), FeatureStore(tmp_path / "pil.h5")
    assert by_torch.failed() == by_pil.failed() and set(by_torch.failed()) == {
        i for i, k in kinds.items() if k == "bad"
    }
    torch_attrs, pil_attrs = by_torch.backbone_attrs(TINY), by_pil.backbone_attrs(TINY)
    assert torch_attrs["decode"] == "torch" and pil_attrs["decode"] == "pil"
    assert torch_attrs["fingerprint"] != pil_attrs["fingerprint"]
    assert "decode" not in json.loads(pil_attrs["identity"])  # Pillow's stores keep their old fingerprint
    assert json.loads(by_torch.attrs["extract_config"])["decode"] == "torch"
    a, b = by_torch.embeddings(TINY), by_pil.embeddings(TINY)
    assert np.array_equal(by_torch.done(TINY), by_pil.done(TINY))
    done = by_pil.done(TINY)
    error = np.linalg.norm(a[done] - b[done], axis=1) / np.linalg.norm(b[done], axis=1)
    assert error.max() < 0.05, error
    # embeddings decoded one way are never mixed with the other's
    code, _, err = _extract(cli, tmp_path / "data", tmp_path / "pil.h5", "--decode", "torch")
    assert code == 2 and "other settings" in err and "decode" in err
    with pytest.raises(SystemExit) as info:
        _extract(cli, tmp_path / "data", tmp_path / "x.h5", "--decode", "nvjpeg")
    assert info.value.code == 2 and not (tmp_path / "x.h5").exists()


def test_predict_decodes_new_images_as_the_training_store_did(tmp_path, cli):
    manifest = lesion_set(tmp_path / "data", 12)
    for png in (tmp_path / "data" / "img").glob("*.png"):  # as JPEGs: the batch decoder's files
        Image.open(png).save(png.with_suffix(".jpg"), quality=92)
        png.unlink()
    manifest.write_text(manifest.read_text().replace(".png", ".jpg"))
    store = tmp_path / "store.h5"
    code, _, err = _extract(cli, manifest, store, "--decode", "torch")
    assert code == 0, err
    run = tmp_path / "run"
    fit = ("--head", "linear", "--folds", "2", "--trials", "1", "--test-fraction", "0.34", "--allow-small-test")
    code, _, err = cli("fit", "--features", store, "--out", run, *fit)
    assert code == 0, err
    assert json.loads((run / "run.json").read_text())["extraction"][TINY]["decode"] == "torch"
    with open(run / "test_predictions.csv") as handle:
        expected = {row["image"]: row for row in csv.DictReader(handle)}
    images = [tmp_path / "data" / "img" / f"{image_id}.jpg" for image_id in expected]
    out = tmp_path / "preds.csv"
    code, _, err = cli("predict", "--run", run, "--out", out, "--workers", "0", "--images", *images)
    assert code == 0, err  # a store decoded by Pillow would have another fingerprint: refused
    with open(out) as handle:
        got = {row["image"]: row for row in csv.DictReader(handle)}
    assert set(got) == set(expected)
    for image_id, row in expected.items():
        assert float(got[image_id]["mel"]) == pytest.approx(float(row["mel"]), abs=1e-5)
