"""Tests for sslkd.data and sslkd.formats: IDX, CIFAR and image-folder readers, search order, checksums, safe
extraction, DeviceLoader. The download of the real files from a local HTTP mirror is in test_download.py."""
import dataclasses, gzip, hashlib, io, os, pickle, struct, tarfile, time, urllib.error, urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

import sslkd.data as D
import sslkd.formats as F
from sslkd.data import (DataError, ImageData, DeviceLoader, read_idx, parse_idx, write_idx, write_cifar_archive,
                        load_fashion_mnist, load_cifar, load_image_folder, load_dataset, safe_extract, channel_stats)

DEBIAN = Path('/usr/share/datasets/fashion-mnist')
HAVE_FASHION = all((DEBIAN / f'{f.name}.gz').is_file() for fs in D.FASHION_FILES.values() for f in fs)
sha = lambda b: hashlib.sha256(b).hexdigest()


@pytest.fixture(autouse=True)
def own_home(monkeypatch, tmp_path):
    "No test reads or writes the user's ~/.cache/sslkd or follows their $SSLKD_DATA or mirror."
    monkeypatch.setenv('HOME', str(tmp_path / 'home'))
    monkeypatch.delenv('SSLKD_DATA', raising=False)
    monkeypatch.delenv('SSLKD_FASHION_MIRROR', raising=False)


# ---------------------------------------------------------------- ImageData
def test_imagedata_validates_and_moves():
    d = ImageData(torch.zeros(3, 1, 2, 2, dtype=torch.uint8), torch.tensor([0, 1, 0]), ['a', 'b'], [0.5], (0.2,))
    assert len(d) == 3 and d.mean == (0.5,) and d.std == (0.2,) and 'n=3' in repr(d)
    assert d.to('cpu').x.data_ptr() == d.x.data_ptr()
    u8, i64 = torch.zeros(3, 1, 2, 2, dtype=torch.uint8), torch.zeros(3, dtype=torch.long)
    with pytest.raises(DataError, match='uint8'): ImageData(torch.zeros(3, 1, 2, 2), i64, [], (0.,), (1.,))
    with pytest.raises(DataError, match='int64'): ImageData(u8, torch.zeros(3), [], (0.,), (1.,))
    with pytest.raises(DataError, match='per channel'):
        ImageData(torch.zeros(3, 3, 2, 2, dtype=torch.uint8), torch.zeros(3, dtype=torch.long), [], (0.,), (1.,))


def test_channel_stats_exact():
    x = torch.tensor([0, 255, 0, 255], dtype=torch.uint8).reshape(4, 1, 1, 1).repeat(1, 2, 3, 3)
    x[:, 1] = 51
    m, s = channel_stats(x, chunk=3)
    assert m == pytest.approx((0.5, 0.2)) and s == pytest.approx((0.5, 1 / 255), abs=1e-7)  # constant: one grey level


# ---------------------------------------------------------------- IDX
def test_idx_exact_bytes_and_round_trip(tmp_path):
    t = torch.tensor([[1, 2, 3], [4, 5, 255]], dtype=torch.uint8)
    raw = write_idx(tmp_path / 'a.idx', t).read_bytes()
    assert raw == bytes([0, 0, 8, 2, 0, 0, 0, 2, 0, 0, 0, 3, 1, 2, 3, 4, 5, 255])
    gz = write_idx(tmp_path / 'a.idx.gz', t)
    assert gz.read_bytes()[:2] == b'\x1f\x8b' and gzip.decompress(gz.read_bytes()) == raw
    for p in ('a.idx', 'a.idx.gz'):
        got = read_idx(tmp_path / p)
        assert got.dtype == torch.uint8 and torch.equal(got, t)
    for other in (torch.randn(2, 3, 4), torch.arange(-5, 5, dtype=torch.int32), torch.arange(-3, 3, dtype=torch.int16)):
        assert torch.equal(read_idx(write_idx(tmp_path / 'b.idx.gz', other)), other)
    # sniffed by content, not by name: a gzipped file without .gz and a plain one named .gz
    (tmp_path / 'noext').write_bytes(gzip.compress(raw)); (tmp_path / 'plain.gz').write_bytes(raw)
    assert torch.equal(read_idx(tmp_path / 'noext'), t) and torch.equal(read_idx(tmp_path / 'plain.gz'), t)


@pytest.mark.parametrize('mangle, msg', [
    (lambda b: b[:-1], 'truncated'),
    (lambda b: b[:10], 'truncated'),                    # header cut short
    (lambda b: b + b'\x00', 'longer than its header'),
    (lambda b: b'\x01' + b[1:], 'magic'),
    (lambda b: b[:2] + b'\x07' + b[3:], 'magic'),        # unknown type code
    (lambda b: b'', 'too short'),
    (lambda b: b'<html>404</html>', 'magic'),
])
def test_idx_bad_files_raise_clear_errors(tmp_path, mangle, msg):
    raw = write_idx(tmp_path / 'ok.idx', torch.zeros(4, 3, 3, dtype=torch.uint8)).read_bytes()
    bad = tmp_path / 'bad-idx3-ubyte'
    bad.write_bytes(mangle(raw))
    with pytest.raises(DataError, match=msg) as e: read_idx(bad)
    assert str(bad) in str(e.value) and 'Delete it and re-run' in str(e.value)


def test_truncated_and_corrupt_gzip(tmp_path):
    gz = write_idx(tmp_path / 'x.gz', torch.zeros(100, 28, 28, dtype=torch.uint8)).read_bytes()
    (tmp_path / 'cut.gz').write_bytes(gz[:len(gz) // 2])
    with pytest.raises(DataError, match='not a valid gzip') as e: read_idx(tmp_path / 'cut.gz')
    assert str(tmp_path / 'cut.gz') in str(e.value) and isinstance(e.value.__cause__, (EOFError, OSError))
    (tmp_path / 'junk.gz').write_bytes(b'\x1f\x8b' + b'\xff' * 50)
    with pytest.raises(DataError, match='truncated or corrupt'): read_idx(tmp_path / 'junk.gz')
    with pytest.raises(DataError, match='cannot read'): read_idx(tmp_path / 'missing.gz')


# ---------------------------------------------------------------- Fashion-MNIST with tiny fake files
def fake_fashion(folder, n_train=12, n_test=5, gz=True, seed=0):
    "Write tiny Fashion-MNIST-named IDX files; return {split: (x, y)} and the IdxFile table that matches them."
    g = torch.Generator().manual_seed(seed)
    data, table = {}, {}
    for split, prefix, n in (('train', 'train', n_train), ('test', 't10k', n_test)):
        x = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=g)
        y = torch.randint(0, 10, (n,), generator=g).to(torch.uint8)
        files = []
        for kind, t in (('images-idx3', x), ('labels-idx1', y)):
            name = f'{prefix}-{kind}-ubyte'
            p = write_idx(Path(folder) / (name + ('.gz' if gz else '')), t)
            content = gzip.decompress(p.read_bytes()) if gz else p.read_bytes()
            files.append(D.IdxFile(name, sha(p.read_bytes()), sha(content)))
        data[split], table[split] = (x, y), tuple(files)
    return data, table


@pytest.fixture
def no_debian(monkeypatch, tmp_path):
    "Hide the real Debian files and the user's cache so tests see only what they write."
    monkeypatch.setattr(D, 'DEBIAN_FASHION_DIR', tmp_path / 'no-debian')
    monkeypatch.setenv('SSLKD_DATA', str(tmp_path / 'default-cache'))


@pytest.mark.parametrize('gz', [True, False])
def test_fashion_from_data_dir(tmp_path, monkeypatch, no_debian, gz):
    data, table = fake_fashion(tmp_path / 'fm', gz=gz)
    monkeypatch.setattr(D, 'FASHION_FILES', table)
    for split in ('train', 'test'):
        d = load_fashion_mnist(split, data_dir=tmp_path / 'fm', download=False)
        assert d.x.shape == (len(data[split][0]), 1, 28, 28) and d.x.dtype == torch.uint8 and d.y.dtype == torch.int64
        assert torch.equal(d.x[:, 0], data[split][0]) and torch.equal(d.y, data[split][1].long())
        assert d.classes == D.FASHION_CLASSES and d.mean == D.FASHION_MEAN
    with pytest.raises(DataError, match='unknown split'): load_fashion_mnist('val', data_dir=tmp_path / 'fm')


def test_fashion_subfolder_and_missing(tmp_path, monkeypatch, no_debian):
    data, table = fake_fashion(tmp_path / 'root' / 'fashion-mnist')
    monkeypatch.setattr(D, 'FASHION_FILES', table)
    assert torch.equal(load_fashion_mnist('test', data_dir=tmp_path / 'root', download=False).y, data['test'][1].long())
    with pytest.raises(DataError, match='apt-get install dataset-fashion-mnist') as e:
        load_fashion_mnist('test', data_dir=tmp_path / 'empty', download=False)
    assert 't10k-images-idx3-ubyte' in str(e.value) and 'data_dir' in str(e.value)


def test_fashion_content_checksum_mismatch(tmp_path, monkeypatch, no_debian):
    fake_fashion(tmp_path / 'fm')  # real FASHION_FILES checksums: the fake content cannot match
    with pytest.raises(DataError, match='sha256') as e:
        load_fashion_mnist('test', data_dir=tmp_path / 'fm', download=False)
    assert D.FASHION_FILES['test'][0].sha256 in str(e.value) and 'delete' in str(e.value)


def test_fashion_mismatched_counts_and_label_range(tmp_path, monkeypatch, no_debian):
    folder = tmp_path / 'fm'
    x = torch.zeros(4, 28, 28, dtype=torch.uint8)
    for y, msg in ((torch.zeros(3, dtype=torch.uint8), '4 images but .* 3 labels'),
                   (torch.tensor([0, 1, 10, 2], dtype=torch.uint8), 'out of range')):
        xi, yi = write_idx(folder / 't10k-images-idx3-ubyte', x), write_idx(folder / 't10k-labels-idx1-ubyte', y)
        table = dict(D.FASHION_FILES, test=tuple(D.IdxFile(p.name, '', sha(p.read_bytes())) for p in (xi, yi)))
        monkeypatch.setattr(D, 'FASHION_FILES', table)
        with pytest.raises(DataError, match=msg): load_fashion_mnist('test', data_dir=folder, download=False)


def serve(monkeypatch, folder):
    "Simulate the download mirror with a file:// URL pointing at `folder`, set the documented way."
    monkeypatch.setenv('SSLKD_FASHION_MIRROR', Path(folder).as_uri())


def test_fashion_simulated_download(tmp_path, monkeypatch, no_debian):
    data, table = fake_fashion(tmp_path / 'server')
    monkeypatch.setattr(D, 'FASHION_FILES', table); serve(monkeypatch, tmp_path / 'server')
    d = load_fashion_mnist('train', data_dir=tmp_path / 'dl', download=True)
    assert torch.equal(d.x[:, 0], data['train'][0])
    got = sorted(p.name for p in (tmp_path / 'dl' / 'fashion-mnist').iterdir())
    assert got == ['train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz']  # no temp files left
    # the default data dir ($SSLKD_DATA) is used when data_dir is None
    assert torch.equal(load_fashion_mnist('test').y, data['test'][1].long())
    assert (tmp_path / 'default-cache' / 'fashion-mnist' / 't10k-labels-idx1-ubyte.gz').is_file()


def test_fashion_download_checksum_mismatch(tmp_path, monkeypatch, no_debian):
    fake_fashion(tmp_path / 'server'); serve(monkeypatch, tmp_path / 'server')
    with pytest.raises(DataError, match='checksum mismatch') as e:
        load_fashion_mnist('test', data_dir=tmp_path / 'dl', download=True)
    msg = str(e.value)
    assert D.FASHION_FILES['test'][0].gz_sha256 in msg and 't10k-images-idx3-ubyte.gz' in msg
    assert 'copy the four files' in msg and len(msg.splitlines()) == 1
    assert not (tmp_path / 'dl' / 'fashion-mnist').exists() or not any((tmp_path / 'dl' / 'fashion-mnist').iterdir())


def test_download_failure_is_clear(tmp_path, monkeypatch, no_debian):
    def offline(*a, **k): raise urllib.error.URLError('no network')
    monkeypatch.setattr(urllib.request, 'urlopen', offline)
    with pytest.raises(DataError, match='all mirrors failed') as e:
        load_fashion_mnist('test', data_dir=tmp_path / 'dl', download=True)
    msg = str(e.value)
    for m in D.FASHION_MIRRORS: assert m + 't10k-images-idx3-ubyte.gz: URLError' in msg
    assert str(tmp_path / 'dl' / 'fashion-mnist' / 't10k-images-idx3-ubyte.gz') in msg and 'no network' in msg
    # where it looked, in order, and every fix
    looked = [tmp_path / p for p in ('dl', 'default-cache', 'no-debian', 'home/.cache/sslkd')]
    assert [msg.index(f'{d}, ') for d in looked] == sorted(msg.index(f'{d}, ') for d in looked)
    for fix in ('network access', '$SSLKD_FASHION_MIRROR', 'data_dir=', 'apt-get install dataset-fashion-mnist'):
        assert fix in msg
    assert len(msg.splitlines()) == 1 and isinstance(e.value, RuntimeError)
    assert not any((tmp_path / 'dl').rglob('*.part'))


def test_fashion_search_order(tmp_path, monkeypatch):
    "data_dir, then $SSLKD_DATA, then the Debian folder, then the cache: each copy wins over the ones after it."
    places = {'data_dir': tmp_path / 'mine', 'env': tmp_path / 'env' / 'fashion-mnist', 'debian': tmp_path / 'debian',
              'cache': tmp_path / 'home' / '.cache' / 'sslkd'}
    fakes = {k: fake_fashion(p, n_test=3 + i, seed=i) for i, (k, p) in enumerate(places.items())}
    monkeypatch.setattr(D, 'DEBIAN_FASHION_DIR', places['debian'])
    monkeypatch.setenv('SSLKD_DATA', str(tmp_path / 'env'))
    for k, p in places.items():
        data, table = fakes[k]
        monkeypatch.setattr(D, 'FASHION_FILES', table)
        got = load_dataset('fashion_mnist', 'test', data_dir=tmp_path / 'mine', download=False)
        assert torch.equal(got.y, data['test'][1].long()), k
        for f in p.iterdir(): f.unlink()  # now the next place in the order must be used
    with pytest.raises(DataError, match='downloading is off'):
        load_fashion_mnist('test', data_dir=tmp_path / 'mine', download=False)


def test_fashion_mirrors_env(monkeypatch):
    assert D.fashion_mirrors() == D.FASHION_MIRRORS
    monkeypatch.setenv('SSLKD_FASHION_MIRROR', ' http://a.example/x, https://b.example/y/ ')
    assert D.fashion_mirrors() == ['http://a.example/x/', 'https://b.example/y/']
    monkeypatch.setenv('SSLKD_FASHION_MIRROR', '')
    assert D.fashion_mirrors() == D.FASHION_MIRRORS


def test_download_url_atomic(tmp_path, monkeypatch):
    src = tmp_path / 'src.bin'; src.write_bytes(os.urandom(3_000_000))
    good = sha(src.read_bytes())
    dest = D.download_url(src.as_uri(), tmp_path / 'd' / 'f.bin', good)
    assert dest.read_bytes() == src.read_bytes()

    class Broken(io.BytesIO):  # connection dies half way
        def read(self, n=-1):
            if self.tell() > 1000: raise ConnectionResetError('reset by peer')
            return super().read(min(n, 600))
        def __enter__(self): return self
        def __exit__(self, *a): return False
    monkeypatch.setattr(urllib.request, 'urlopen', lambda url, timeout=None: Broken(b'x' * 5000))
    with pytest.raises(DataError, match='reset by peer') as e:
        D.download_url('https://example.org/f.bin', tmp_path / 'd' / 'g.bin', good)
    assert 'https://example.org/f.bin' in str(e.value) and good in str(e.value)
    assert sorted(p.name for p in (tmp_path / 'd').iterdir()) == ['f.bin']


# ---------------------------------------------------------------- CIFAR
def tiny_cifar(name, n_train=15, n_test=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = D.CIFAR_SPECS[name].num_classes
    mk = lambda n: (torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
                    torch.randint(0, k, (n,), generator=g))
    return mk(n_train), mk(n_test), [f'{name}-c{i}' for i in range(k)]


def patch_spec(monkeypatch, name, **kw):
    monkeypatch.setitem(D.CIFAR_SPECS, name, dataclasses.replace(D.CIFAR_SPECS[name], **kw))


@pytest.mark.parametrize('name, members', [
    ('cifar10', ['batches.meta'] + [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']),
    ('cifar100', ['meta', 'test', 'train'])])
def test_cifar_round_trip(tmp_path, monkeypatch, name, members):
    tr, te, classes = tiny_cifar(name)
    arc = write_cifar_archive(tmp_path / D.CIFAR_SPECS[name].archive, tr, te, name=name, classes=classes)
    with tarfile.open(arc) as tf:
        folder = D.CIFAR_SPECS[name].folder
        assert sorted(tf.getnames()) == sorted(f'{folder}/{m}' for m in members)
        spec = D.CIFAR_SPECS[name]
        d = pickle.load(tf.extractfile(f'{folder}/{spec.splits["test"][0]}'), encoding='latin1')
        assert d['data'].shape == (len(te[0]), 3072) and d['data'].dtype == np.uint8
        assert np.array_equal(d['data'], te[0].reshape(len(te[0]), -1).numpy()) and d[spec.label_key] == te[1].tolist()
    patch_spec(monkeypatch, name, sha256=sha(arc.read_bytes()))
    for split, (x, y) in (('train', tr), ('test', te)):
        out = load_cifar(name, split, data_dir=tmp_path, download=False)
        assert out.x.shape == (len(x), 3, 32, 32) and out.x.dtype == torch.uint8 and out.y.dtype == torch.int64
        assert torch.equal(out.x, x) and torch.equal(out.y, y) and out.classes == classes
        assert out.mean == D.CIFAR_SPECS[name].mean
    assert (tmp_path / D.CIFAR_SPECS[name].folder).is_dir()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith('.extract')]
    assert torch.equal(load_dataset(name, 'test', data_dir=tmp_path).x, te[0])


def test_cifar_channel_major_layout(tmp_path):
    "data rows are R plane, G plane, B plane: check against a hand-built pickle."
    spec = D.CIFAR_SPECS['cifar10']
    folder = tmp_path / spec.folder; folder.mkdir()
    row = np.concatenate([np.full(1024, 10), np.full(1024, 20), np.arange(1024) % 256]).astype(np.uint8)
    for f in spec.splits['train']:
        (folder / f).write_bytes(pickle.dumps({'data': row[None], 'labels': [3]}, protocol=2))
    (folder / spec.meta).write_bytes(pickle.dumps({'label_names': list('abcdefghij')}, protocol=2))
    d = load_cifar('cifar10', 'train', data_dir=tmp_path)
    assert d.x.shape == (5, 3, 32, 32)
    assert (d.x[:, 0] == 10).all() and (d.x[:, 1] == 20).all() and d.x[0, 2, 1, 0] == 32 and d.x[0, 2, 0, 5] == 5
    assert d.y.tolist() == [3] * 5 and d.classes == list('abcdefghij')


def test_cifar_simulated_download_and_checksum(tmp_path, monkeypatch):
    tr, te, classes = tiny_cifar('cifar10')
    arc = write_cifar_archive(tmp_path / 'server' / 'cifar-10-python.tar.gz', tr, te, classes=classes)
    patch_spec(monkeypatch, 'cifar10', url=arc.as_uri())
    with pytest.raises(DataError, match='checksum mismatch') as e: load_cifar('cifar10', data_dir=tmp_path / 'dl')
    assert D.CIFAR_SPECS['cifar10'].sha256 in str(e.value) and not (tmp_path / 'dl' / 'cifar-10-python.tar.gz').exists()
    patch_spec(monkeypatch, 'cifar10', sha256=sha(arc.read_bytes()))
    assert torch.equal(load_cifar('cifar10', 'test', data_dir=tmp_path / 'dl').x, te[0])
    assert (tmp_path / 'dl' / 'cifar-10-python.tar.gz').is_file()


def test_cifar_local_archive_checked_and_missing(tmp_path, monkeypatch):
    tr, te, _ = tiny_cifar('cifar100')
    write_cifar_archive(tmp_path / 'cifar-100-python.tar.gz', tr, te, name='cifar100')
    with pytest.raises(DataError, match=D.CIFAR_SPECS['cifar100'].sha256) as e:
        load_cifar('cifar100', data_dir=tmp_path)
    assert 'Delete' in str(e.value) and 'cifar-100-python.tar.gz' in str(e.value)
    with pytest.raises(DataError, match='downloading is off') as e:
        load_cifar('cifar10', data_dir=tmp_path / 'none', download=False)
    assert D.CIFAR_SPECS['cifar10'].url in str(e.value)
    with pytest.raises(DataError, match="cifar10', 'cifar100"): load_cifar('cifar1000')
    with pytest.raises(DataError, match='unknown split'): load_cifar('cifar10', 'val', data_dir=tmp_path)


def test_cifar_corrupt_archive(tmp_path, monkeypatch):
    tr, te, _ = tiny_cifar('cifar10')
    good = write_cifar_archive(tmp_path / 'good.tar.gz', tr, te).read_bytes()
    arc = tmp_path / 'cifar-10-python.tar.gz'; arc.write_bytes(good[:len(good) // 2])
    patch_spec(monkeypatch, 'cifar10', sha256=sha(arc.read_bytes()))
    with pytest.raises(DataError, match='truncated or corrupt') as e: load_cifar('cifar10', data_dir=tmp_path)
    assert str(arc) in str(e.value) and e.value.__cause__ is not None
    assert not (tmp_path / 'cifar-10-batches-py').exists()  # nothing half-extracted left looking complete


def test_cifar_corrupt_or_missing_batch(tmp_path):
    tr, te, _ = tiny_cifar('cifar10')
    safe_extract(write_cifar_archive(tmp_path / 'a.tar.gz', tr, te), tmp_path)
    folder = tmp_path / 'cifar-10-batches-py'
    (folder / 'data_batch_3').write_bytes(b'\x80\x02}q\x00(X')  # cut-off pickle
    with pytest.raises(DataError, match='cannot unpickle') as e: load_cifar('cifar10', data_dir=tmp_path)
    assert 'data_batch_3' in str(e.value) and 'Delete the folder' in str(e.value)
    (folder / 'data_batch_3').unlink()
    with pytest.raises(DataError, match='missing CIFAR file'): load_cifar('cifar10', data_dir=tmp_path)
    (folder / 'data_batch_3').write_bytes(pickle.dumps({'data': np.zeros((2, 100), np.uint8), 'labels': [0, 1]}))
    with pytest.raises(DataError, match=r'\(N, 3072\)'): load_cifar('cifar10', data_dir=tmp_path)
    (folder / 'data_batch_3').write_bytes(pickle.dumps({'data': np.zeros((2, 3072), np.uint8), 'labels': [0]}))
    with pytest.raises(DataError, match='2 images but 1 labels'): load_cifar('cifar10', data_dir=tmp_path)
    (folder / 'data_batch_3').write_bytes(pickle.dumps({'data': np.zeros((1, 3072), np.uint8), 'labels': [10]}))
    with pytest.raises(DataError, match='10 classes'): load_cifar('cifar10', data_dir=tmp_path)


class Evil:
    def __reduce__(self): return (os.system, ('touch /tmp/sslkd-evil-pickle-ran',))


def test_pickle_cannot_run_code(tmp_path):
    tr, te, _ = tiny_cifar('cifar10')
    safe_extract(write_cifar_archive(tmp_path / 'a.tar.gz', tr, te), tmp_path)
    (tmp_path / 'cifar-10-batches-py' / 'test_batch').write_bytes(pickle.dumps({'data': Evil(), 'labels': []}))
    Path('/tmp/sslkd-evil-pickle-ran').unlink(missing_ok=True)
    with pytest.raises(DataError, match='refusing to load'): load_cifar('cifar10', 'test', data_dir=tmp_path)
    assert not Path('/tmp/sslkd-evil-pickle-ran').exists()


# ---------------------------------------------------------------- safe extraction
def tar_with(path, *members):
    with tarfile.open(path, 'w:gz') as tf:
        for info, data in members: tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def file_member(name, data=b'x'):
    i = tarfile.TarInfo(name); i.size = len(data); return i, data


def link_member(name, target, hard=False):
    i = tarfile.TarInfo(name)
    i.type, i.linkname = (tarfile.LNKTYPE if hard else tarfile.SYMTYPE), target
    return i, None


@pytest.mark.parametrize('bad', [
    lambda t: file_member('../evil'),
    lambda t: file_member('ok/../../evil'),
    lambda t: file_member(str(t / 'abs-evil')),
    lambda t: link_member('ok/link', '../../outside'),
    lambda t: link_member('ok/link', '/etc/passwd'),
    lambda t: link_member('ok/hard', '/etc/passwd', hard=True),
])
def test_safe_extract_refuses_escapes(tmp_path, bad):
    arc = tar_with(tmp_path / 'evil.tar.gz', file_member('ok/first.txt'), bad(tmp_path), file_member('ok/last.txt'))
    dest = tmp_path / 'dest'
    with pytest.raises(DataError, match='refusing to extract'): safe_extract(arc, dest)
    assert not any((tmp_path / n).exists() for n in ('evil', 'abs-evil', 'outside'))
    assert list(dest.iterdir()) == []  # checked before anything was written


def test_safe_extract_refuses_device_and_accepts_plain(tmp_path):
    dev = tarfile.TarInfo('ok/dev'); dev.type = tarfile.CHRTYPE
    with pytest.raises(DataError, match='not a regular file'):
        safe_extract(tar_with(tmp_path / 'd.tar.gz', (dev, None)), tmp_path / 'o1')
    plain = tar_with(tmp_path / 'p.tar.gz', file_member('top/a.txt', b'A'), file_member('top/sub/b.txt', b'B'))
    out = safe_extract(plain, tmp_path / 'o2')
    assert (out / 'top' / 'a.txt').read_bytes() == b'A' and (out / 'top' / 'sub' / 'b.txt').read_bytes() == b'B'


# ---------------------------------------------------------------- image folders
def make_folder(root, n=2, size=(8, 8), mode='RGB', classes=('cat', 'dog'), seed=0):
    from PIL import Image
    rng = np.random.default_rng(seed)
    arrays = []
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            shape = (size[1], size[0], 3) if mode == 'RGB' else (size[1], size[0])
            a = rng.integers(0, 256, shape, dtype=np.uint8)
            Image.fromarray(a, mode).save(root / c / f'{i:02d}.png'); arrays.append(a)
    return arrays


def test_image_folder_round_trip_and_stats(tmp_path):
    arrays = make_folder(tmp_path / 'imgs' / 'train', n=3)
    make_folder(tmp_path / 'imgs' / 'test', n=1, seed=1)
    (tmp_path / 'imgs' / 'train' / 'cat' / 'notes.txt').write_text('not an image')
    d = load_image_folder(tmp_path / 'imgs', 'train', size=8, cache_dir=tmp_path / 'cache')
    assert d.x.shape == (6, 3, 8, 8) and d.x.dtype == torch.uint8 and d.classes == ['cat', 'dog']
    assert d.y.tolist() == [0, 0, 0, 1, 1, 1]
    assert np.array_equal(d.x.permute(0, 2, 3, 1).numpy(), np.stack(arrays))
    ref = d.x.double().div(255).transpose(0, 1).reshape(3, -1)
    assert d.mean == pytest.approx(ref.mean(1).tolist()) and d.std == pytest.approx(ref.std(1, unbiased=False).tolist())
    t = load_image_folder(tmp_path / 'imgs', 'test', size=8, cache_dir=tmp_path / 'cache')
    assert len(t) == 2 and t.mean == d.mean  # test split carries the train statistics


def test_image_folder_resize_grey_and_splits(tmp_path):
    make_folder(tmp_path / 'g', n=2, size=(20, 10), mode='L')
    d = load_image_folder(tmp_path / 'g', size=4, cache_dir=tmp_path / 'c')   # no train/ sub-folder: PATH is train
    assert d.x.shape == (4, 1, 4, 4) and len(d.mean) == 1
    assert load_image_folder(tmp_path / 'g', size=(4, 6), mode='RGB', cache_dir=tmp_path / 'c').x.shape == (4, 3, 4, 6)
    with pytest.raises(DataError, match="no test/ sub-folder") as e:
        load_image_folder(tmp_path / 'g', 'test', cache_dir=tmp_path / 'c')
    assert "split='train'" in str(e.value)
    (tmp_path / 'empty').mkdir()
    for name, msg in (('empty', 'no class sub-folders'), ('nope', 'does not exist')):
        with pytest.raises(DataError, match=msg): load_image_folder(tmp_path / name, cache_dir=tmp_path / 'c')


def test_image_folder_centre_crop(tmp_path):
    from PIL import Image
    a = np.zeros((4, 12, 3), np.uint8); a[:, 4:8] = 200  # wide image: the centre square is the bright band
    (tmp_path / 'f' / 'c').mkdir(parents=True); Image.fromarray(a).save(tmp_path / 'f' / 'c' / 'a.png')
    d = load_image_folder(tmp_path / 'f', size=4, cache_dir=tmp_path / 'c')
    assert (d.x == 200).all()


def test_image_folder_cache_reused_and_invalidated(tmp_path, monkeypatch):
    make_folder(tmp_path / 'f', n=2)
    first = load_image_folder(tmp_path / 'f', size=8, cache_dir=tmp_path / 'cache')
    caches = list((tmp_path / 'cache').glob('*.pt'))
    assert len(caches) == 1
    assert torch.load(caches[0], weights_only=True)['x'].equal(first.x)
    reads = []
    real = F._read_image
    monkeypatch.setattr(F, '_read_image', lambda *a: reads.append(a[0]) or real(*a))
    assert torch.equal(load_image_folder(tmp_path / 'f', size=8, cache_dir=tmp_path / 'cache').x, first.x)
    assert reads == []  # served from the cache
    # edit a file (new content, new mtime): re-read
    from PIL import Image
    p = tmp_path / 'f' / 'dog' / '01.png'
    Image.fromarray(np.full((8, 8, 3), 7, np.uint8)).save(p)
    os.utime(p, ns=(time.time_ns() + 10**9, time.time_ns() + 10**9))
    d = load_image_folder(tmp_path / 'f', size=8, cache_dir=tmp_path / 'cache')
    assert len(reads) == 4 and (d.x[3] == 7).all()
    # add a file: re-read, one more image
    Image.fromarray(np.full((8, 8, 3), 9, np.uint8)).save(tmp_path / 'f' / 'cat' / '99.png')
    d = load_image_folder(tmp_path / 'f', size=8, cache_dir=tmp_path / 'cache')
    assert len(d) == 5 and (d.x[2] == 9).all() and d.y.tolist() == [0, 0, 0, 1, 1]
    assert len(list((tmp_path / 'cache').glob('*.pt'))) == 1  # overwritten, not accumulated
    # a corrupt cache is rebuilt, not fatal
    caches[0].write_bytes(b'garbage')
    assert len(load_image_folder(tmp_path / 'f', size=8, cache_dir=tmp_path / 'cache')) == 5


def test_image_folder_unreadable_image(tmp_path):
    make_folder(tmp_path / 'f', n=1)
    (tmp_path / 'f' / 'cat' / 'broken.png').write_bytes(b'not a png')
    with pytest.raises(DataError, match='broken.png'): load_image_folder(tmp_path / 'f', cache_dir=tmp_path / 'c')


# ---------------------------------------------------------------- registry
def test_load_dataset_registry(tmp_path):
    make_folder(tmp_path / 'f', n=1, size=(32, 32))
    d = load_dataset(f'folder:{tmp_path / "f"}', data_dir=tmp_path / 'c')
    assert d.x.shape == (2, 3, 32, 32)
    with pytest.raises(DataError, match='fashion_mnist, cifar10, cifar100') as e: load_dataset('mnist')
    assert 'folder:PATH' in str(e.value)
    assert set(D.DATASETS) == {'fashion_mnist', 'cifar10', 'cifar100'}


# ---------------------------------------------------------------- DeviceLoader
def batches(dl): return [(x.clone(), None if y is None else y.clone()) for x, y in dl]


def test_loader_yields_uint8_batches_on_device():
    x = torch.randint(0, 256, (50, 1, 4, 4), dtype=torch.uint8)
    d = ImageData(x, torch.arange(50) % 10, list('abcdefghij'), (0.5,), (0.2,))
    dl = DeviceLoader(d, batch_size=16, seed=0)
    out = batches(dl)
    assert len(dl) == len(out) == 3
    for x, y in out:
        assert x.shape == (16, 1, 4, 4) and x.dtype == torch.uint8 and y.dtype == torch.int64 and x.device == d.x.device
        for xi, yi in zip(x, y): assert yi == (d.x == xi).flatten(1).all(1).nonzero()[0, 0] % 10  # pairs stay together


def test_loader_every_sample_once_without_drop_last():
    for n, bs in ((100, 7), (64, 8), (5, 10)):
        dl = DeviceLoader(torch.arange(n)[:, None], torch.arange(n), batch_size=bs, drop_last=False, seed=3)
        out = batches(dl)
        assert len(out) == len(dl) == -(-n // bs)
        assert sorted(torch.cat([y for _, y in out]).tolist()) == list(range(n))
        assert all(torch.equal(x[:, 0], y) for x, y in out)


def test_loader_drop_last():
    dl = DeviceLoader(torch.arange(100), torch.arange(100), batch_size=30, drop_last=True)
    out = batches(dl)
    assert len(dl) == len(out) == 3 and all(len(y) == 30 for _, y in out)
    assert len(set(torch.cat([y for _, y in out]).tolist())) == 90
    with pytest.raises(ValueError, match='drop_last=False'): DeviceLoader(torch.arange(10), batch_size=11)


def test_loader_seeded_repeatable_and_epochs_differ():
    x = torch.arange(200)
    a, b = DeviceLoader(x, batch_size=20, seed=7), DeviceLoader(x, batch_size=20, seed=7)
    ea0, ea1 = batches(a), batches(a)
    eb0 = batches(b)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(ea0, eb0))                 # runs repeat
    assert not torch.equal(torch.cat([p[0] for p in ea0]), torch.cat([p[0] for p in ea1]))  # epochs differ
    b.set_epoch(1)
    assert all(torch.equal(p[0], q[0]) for p, q in zip(ea1, batches(b)))          # set_epoch reproduces epoch 1
    c = DeviceLoader(x, batch_size=20, seed=8)
    assert not torch.equal(batches(c)[0][0], ea0[0][0])                            # seed matters
    assert batches(DeviceLoader(x, batch_size=20, shuffle=False))[0][0].tolist() == list(range(20))
    assert batches(DeviceLoader(x, batch_size=20))[0][1] is None                   # raw tensor, no labels


@pytest.mark.parametrize('n, world, bs, drop_last',
                         [(11, 2, 2, True), (11, 2, 2, False), (100, 3, 8, True), (100, 3, 8, False), (7, 4, 3, False)])
def test_loader_two_ranks_disjoint_equal_steps(n, world, bs, drop_last):
    shards = []
    for rank in range(world):
        dl = DeviceLoader(torch.arange(n), torch.arange(n), batch_size=bs, drop_last=drop_last, seed=1, rank=rank,
                          world_size=world)
        dl.set_epoch(4)
        out = batches(dl)
        assert len(out) == len(dl)
        shards.append(torch.cat([y for _, y in out]).tolist())
    assert len({len(s) for s in shards}) == 1                           # equal step and sample counts
    steps = {len(batches(DeviceLoader(torch.arange(n), batch_size=bs, drop_last=drop_last, rank=r, world_size=world)))
             for r in range(world)}
    assert len(steps) == 1
    allidx = sum(shards, [])
    if drop_last:
        assert len(allidx) == len(set(allidx)) == (n // world // bs) * bs * world  # disjoint; truncated, full batches
    else:
        assert set(allidx) == set(range(n))                             # padded: every sample covered ...
        assert len(allidx) == -(-n // world) * world                    # ... repeating only the padding


def test_loader_rank_checks():
    with pytest.raises(ValueError, match='rank 2'): DeviceLoader(torch.arange(10), batch_size=2, rank=2, world_size=2)
    with pytest.raises(ValueError, match='10 samples but y has 9'): DeviceLoader(torch.arange(10), torch.arange(9))


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_loader_cuda():
    d = ImageData(torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8), torch.arange(64), [], (0, 0, 0), (1, 1, 1))
    dl = DeviceLoader(d, batch_size=16, device='cuda', seed=0)
    x, y = next(iter(dl))
    assert x.is_cuda and y.is_cuda and x.dtype == torch.uint8
    dl.set_epoch(0)
    cpu = DeviceLoader(d, batch_size=16, seed=0)
    assert torch.equal(next(iter(cpu))[1], y.cpu())  # same order on CPU and GPU


# ---------------------------------------------------------------- real Fashion-MNIST
needs_fashion = pytest.mark.skipif(not HAVE_FASHION, reason=f'Fashion-MNIST not installed in {DEBIAN}')


@needs_fashion
def test_real_fashion_mnist():
    tr, te = load_fashion_mnist('train', download=False), load_fashion_mnist('test', download=False)
    assert tr.x.shape == (60000, 1, 28, 28) and te.x.shape == (10000, 1, 28, 28)
    assert tr.x.dtype == te.x.dtype == torch.uint8 and tr.y.dtype == torch.int64
    assert torch.bincount(tr.y).tolist() == [6000] * 10 and torch.bincount(te.y).tolist() == [1000] * 10
    assert len(tr.classes) == 10 and tr.classes[0] == 'T-shirt/top' and tr.classes[9] == 'Ankle boot'
    (m,), (s,) = channel_stats(tr.x)
    assert (m, s) == pytest.approx(D.FASHION_MEAN + D.FASHION_STD, abs=1e-6)
    assert torch.equal(load_dataset('fashion-mnist', 'test', download=False).x, te.x)


def test_a_channel_that_never_varies_is_not_divided_by_zero():
    "Solid-colour images (one channel constant) once made NaN features; the std is floored at one grey level."
    from sslkd.data import channel_stats
    x = torch.zeros(4, 3, 8, 8, dtype=torch.uint8); x[:, 0] = 255; x[:2, 1] = 100
    mean, std = channel_stats(x)
    assert std[0] == std[2] == 1 / 255 and std[1] > 0.1 and mean[0] == 1.0
