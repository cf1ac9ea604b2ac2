"""Image folders: files of more than 8 bits are scaled (not clipped) to 0..255, 8-bit files read as before, small or
one-class folders warn, and the per-class counts are printed on a first read only."""
import warnings
import numpy as np
import pytest
import torch
from PIL import Image

from sslkd.data import load_image_folder
from sslkd.formats import read_image_folder, _read_image


def save_pgm16(path, a):
    "A 16-bit PGM (maxval 65535): PIL opens it as mode I, so the 16-bit scale must come from how it is stored."
    h, w = a.shape
    path.write_bytes(f'P5\n{w} {h}\n65535\n'.encode() + a.astype('>u2').tobytes())


def read(path, mode=None):
    "The image at `path` as read for a folder, at its own size (so no crop or resize mixes pixels)."
    with Image.open(path) as im: w, h = im.size
    return _read_image(path, (h, w), mode)


@pytest.mark.parametrize('ext', ['png', 'tif', 'pgm'])
def test_16bit_ramp_is_scaled_not_clipped(tmp_path, ext):
    a = (np.arange(256, dtype=np.uint16) * 257).reshape(16, 16)  # 0, 257, ..., 65535
    p = tmp_path / f'ramp.{ext}'
    save_pgm16(p, a) if ext == 'pgm' else Image.fromarray(a).save(p)
    x, grey = read(p)
    assert grey and x.shape == (3, 16, 16)
    assert x[0].flatten().tolist() == list(range(256))  # 0..255, not 0 then solid 255
    assert torch.equal(x[0], x[1]) and torch.equal(x[0], x[2])
    assert read(p, 'L')[0].flatten().tolist() == list(range(256))


@pytest.mark.parametrize('ext', ['png', 'tif', 'pgm'])
def test_16bit_mid_grey_is_128(tmp_path, ext):
    a = np.full((4, 4), 32896, np.uint16)
    p = tmp_path / f'grey.{ext}'
    save_pgm16(p, a) if ext == 'pgm' else Image.fromarray(a).save(p)
    assert (read(p)[0] == 128).all()


def test_16bit_values_round_to_nearest(tmp_path):
    a = np.random.default_rng(0).integers(0, 65536, (8, 8)).astype(np.uint16)
    Image.fromarray(a).save(tmp_path / 'r.png')
    assert np.array_equal(read(tmp_path / 'r.png', 'L')[0][0].numpy(), np.round(a / 257).astype(np.uint8))


def test_float_and_32bit_tiffs_scale_by_their_own_range(tmp_path):
    f = np.linspace(-1.0, 3.0, 16, dtype=np.float32).reshape(4, 4)
    Image.fromarray(f).save(tmp_path / 'f.tif')
    assert Image.open(tmp_path / 'f.tif').mode == 'F'
    x = read(tmp_path / 'f.tif', 'L')[0][0]
    assert np.array_equal(x.numpy(), np.round((f + 1) / 4 * 255).astype(np.uint8))
    assert x.min() == 0 and x.max() == 255
    i = (np.arange(16, dtype=np.int32) * 100_000 + 7).reshape(4, 4)  # 7 .. 1_500_007: far beyond 16 bits
    Image.fromarray(i).save(tmp_path / 'i.tif')
    assert Image.open(tmp_path / 'i.tif').mode == 'I'
    assert read(tmp_path / 'i.tif', 'L')[0][0].flatten().tolist() == [17 * k for k in range(16)]


def test_float_nan_constant_and_inf(tmp_path):
    Image.fromarray(np.array([[0.5, np.nan], [1.5, np.inf]], np.float32)).save(tmp_path / 'n.tif')
    assert read(tmp_path / 'n.tif', 'L')[0][0].tolist() == [[0, 0], [255, 255]]
    Image.fromarray(np.full((2, 2), 7.5, np.float32)).save(tmp_path / 'c.tif')
    assert (read(tmp_path / 'c.tif', 'L')[0] == 0).all()  # no range to stretch: black, documented


@pytest.mark.parametrize('pil_mode', ['1', 'L', 'P', 'LA', 'RGB', 'RGBA', 'CMYK'])
@pytest.mark.parametrize('mode', [None, 'L', 'RGB'])
def test_8bit_modes_read_exactly_as_pil_converts_them(tmp_path, pil_mode, mode):
    rng = np.random.default_rng(1)
    im = Image.fromarray(rng.integers(0, 256, (6, 10, 4), dtype=np.uint8), 'RGBA')
    im = (im if 'A' in pil_mode else im.convert('RGB')).convert(pil_mode)  # P from RGBA would carry transparency
    p = tmp_path / f'img.{"tif" if pil_mode == "CMYK" else "png"}'
    im.save(p)
    x, grey = _read_image(p, (6, 10), mode)
    want = np.asarray(Image.open(p).convert(mode or 'RGB'), dtype=np.uint8).reshape(6, 10, -1)
    assert np.array_equal(x.permute(1, 2, 0).numpy(), want)  # RGBA and LA: alpha dropped
    assert grey == (pil_mode in ('1', 'L', 'LA'))


def make_classes(root, counts, depth=8):
    "ROOT/<class>/<i>.png for each class: count, grey, 8- or 16-bit."
    for c, n in counts.items():
        (root / c).mkdir(parents=True)
        for i in range(n):
            a = np.full((4, 4), 1000 * i if depth == 16 else 7 * i % 256, np.uint16 if depth == 16 else np.uint8)
            Image.fromarray(a).save(root / c / f'{i}.png')


def test_16bit_folder_loads_as_one_scaled_channel(tmp_path):
    make_classes(tmp_path / 'f', {'a': 10, 'b': 10}, depth=16)
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # ten images per class: no warning
        d = load_image_folder(tmp_path / 'f', size=4, cache_dir=tmp_path / 'c')
    assert d.x.shape == (20, 1, 4, 4)
    assert d.x[:10, 0, 0, 0].tolist() == [round(1000 * i / 257) for i in range(10)]


def test_one_class_folder_warns(tmp_path):
    make_classes(tmp_path / 'f', {'cat': 30})
    with pytest.warns(UserWarning, match=r"has one class \(cat, 30 images\).*100%.*own sub-folder") as w:
        load_image_folder(tmp_path / 'f', size=4, cache_dir=tmp_path / 'c')
    assert len(w) == 1 and '\n' not in str(w[0].message)


def test_few_images_class_warns_naming_class_and_count(tmp_path):
    make_classes(tmp_path / 'f', {'cat': 12, 'dog': 10, 'fox': 7})
    with pytest.warns(UserWarning, match=r"fewer than 10 images \(fox 7\).*add images to them or remove them") as w:
        load_image_folder(tmp_path / 'f', size=4, cache_dir=tmp_path / 'c')
    assert len(w) == 1 and 'dog' not in str(w[0].message)
    many = {f'c{i}': 3 for i in range(8)}
    make_classes(tmp_path / 'g', many)
    with pytest.warns(UserWarning, match=r"\(c0 3, c1 3, c2 3, c3 3, c4 3 and 3 more\)"):
        load_image_folder(tmp_path / 'g', size=4, cache_dir=tmp_path / 'c')


def test_test_split_warns_for_itself_only(tmp_path):
    make_classes(tmp_path / 'f' / 'train', {'a': 10, 'b': 10})
    make_classes(tmp_path / 'f' / 'test', {'a': 10, 'b': 2})
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        load_image_folder(tmp_path / 'f', 'train', size=4, cache_dir=tmp_path / 'c')
    with pytest.warns(UserWarning, match=r"f/test has classes with fewer than 10 images \(b 2\)") as w:
        load_image_folder(tmp_path / 'f', 'test', size=4, cache_dir=tmp_path / 'c')
    assert len(w) == 1


def test_counts_printed_on_first_read_not_from_cache(tmp_path, capsys):
    make_classes(tmp_path / 'f', {'cat': 12, 'dog': 10})
    read_image_folder(tmp_path / 'f', size=4, cache_dir=tmp_path / 'c')
    out = capsys.readouterr().out
    assert out == f"read 22 images of 2 classes from {tmp_path / 'f'}: cat 12, dog 10\n"
    read_image_folder(tmp_path / 'f', size=4, cache_dir=tmp_path / 'c')
    assert capsys.readouterr().out == ''  # from the cache
    read_image_folder(tmp_path / 'f', size=4, cache_dir=None)
    assert 'cat 12, dog 10' in capsys.readouterr().out  # no cache: every read is a first read


def test_counts_line_summarises_many_classes(tmp_path, capsys):
    make_classes(tmp_path / 'f', {f'k{i:02d}': 1 + i % 3 for i in range(12)})
    read_image_folder(tmp_path / 'f', size=4)
    out = capsys.readouterr().out.strip()
    assert out.endswith('k00 1, k01 2, k02 3, k03 1, k04 2, k05 3, k06 1, k07 2, 4 more (1 to 3 each)')
    assert out.startswith('read 24 images of 12 classes from ')
