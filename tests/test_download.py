"""Fashion-MNIST's download path end to end, without the network: the real files served from a local HTTP mirror.

Debian's package (`apt-get install dataset-fashion-mnist`) re-packed the upstream .gz files without their original
file name and timestamp; the deflate streams are the upstream ones. Putting the upstream gzip header back rebuilds the
exact bytes the official mirrors serve, which must match torchvision's md5 and then our pinned `gz_sha256`. Those
rebuilt files are what the local mirror serves."""
import functools, gzip, hashlib, http.server, os, struct, threading, time
from pathlib import Path

import pytest
import torch

import sslkd.data as D
from sslkd.data import DataError, load_dataset, sha256_file

DEBIAN = Path('/usr/share/datasets/fashion-mnist')
FILES = [f for fs in D.FASHION_FILES.values() for f in fs]
HAVE_FASHION = all((DEBIAN / f'{f.name}.gz').is_file() for f in FILES)
needs_fashion = pytest.mark.skipif(not HAVE_FASHION, reason=f'Fashion-MNIST not installed in {DEBIAN}')
sha = lambda b: hashlib.sha256(b).hexdigest()

TORCHVISION_MD5 = {'train-images-idx3-ubyte': '8d4fb7e6c68d591d4c3dfef9ec88bf0d',
                   'train-labels-idx1-ubyte': '25c81989df183df01b3e8a0aad5dffbe',
                   't10k-images-idx3-ubyte': 'bef4ecab320f06d8554ea6380940ec79',
                   't10k-labels-idx1-ubyte': 'bb300cfdad3c16e7a12a480ee83cd310'}
UPSTREAM_MTIME = {'train': 1504176606, 't10k': 1504176627}  # gzip header times of the upstream files (Aug 2017)


def upstream_bytes(f):
    "The upstream .gz bytes of one Fashion-MNIST file, rebuilt from Debian's copy (skip if that is not possible)."
    gz = (DEBIAN / f'{f.name}.gz').read_bytes()
    if gz[3] != 0: pytest.skip('not the Debian repack: cannot rebuild the upstream bytes')
    mtime = struct.pack('<I', UPSTREAM_MTIME[f.name.split('-')[0]])
    upstream = b'\x1f\x8b\x08\x08' + mtime + b'\x00\x03' + f.name.encode() + b'\x00' + gz[10:]
    if hashlib.md5(upstream).hexdigest() != TORCHVISION_MD5[f.name]:
        pytest.skip('Debian copy differs from the upstream deflate stream')
    return upstream


@needs_fashion
@pytest.mark.parametrize('f', FILES, ids=lambda f: f.name)
def test_real_fashion_checksums(f):
    "Content sha256 of Debian's files, and the upstream .gz sha256 of the rebuilt upstream bytes."
    assert sha(gzip.decompress((DEBIAN / f'{f.name}.gz').read_bytes())) == f.sha256
    assert sha(upstream_bytes(f)) == f.gz_sha256


class Mirror:
    "A local HTTP mirror of one folder, in a thread; records the paths it was asked for."
    def __init__(self, folder):
        requests = self.requests = []

        class Handler(http.server.SimpleHTTPRequestHandler):
            timeout = 30  # a stuck client cannot hold the server forever
            def log_message(self, *a): pass
            def do_GET(self):
                requests.append(self.path)
                super().do_GET()

        self.server = http.server.ThreadingHTTPServer(('127.0.0.1', 0),
                                                      functools.partial(Handler, directory=str(folder)))
        self.url = f'http://127.0.0.1:{self.server.server_address[1]}/'
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={'poll_interval': 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown(); self.server.server_close(); self.thread.join(timeout=10)


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    "Nothing on disk (no Debian folder, empty cache, no $SSLKD_DATA, no proxy); a local mirror, set the documented way."
    monkeypatch.setattr(D, 'DEBIAN_FASHION_DIR', tmp_path / 'no-debian')
    monkeypatch.setenv('HOME', str(tmp_path / 'home'))
    monkeypatch.delenv('SSLKD_DATA', raising=False)
    for v in ('no_proxy', 'NO_PROXY'): monkeypatch.setenv(v, '*')
    (tmp_path / 'served').mkdir()
    m = Mirror(tmp_path / 'served')
    monkeypatch.setenv('SSLKD_FASHION_MIRROR', m.url)
    yield m
    m.close()


@needs_fashion
def test_download_from_local_mirror(tmp_path, mirror):
    for f in FILES: (tmp_path / 'served' / f'{f.name}.gz').write_bytes(upstream_bytes(f))
    t0 = time.time()
    train, test = load_dataset('fashion_mnist', 'train'), load_dataset('fashion_mnist', 'test')
    took = time.time() - t0
    assert train.x.shape == (60000, 1, 28, 28) and test.x.shape == (10000, 1, 28, 28)
    assert torch.bincount(train.y).tolist() == [6000] * 10 and torch.bincount(test.y).tolist() == [1000] * 10
    assert sorted(mirror.requests) == sorted(f'/{f.name}.gz' for f in FILES)  # each file fetched once
    # downloaded into the cache (no data_dir, no $SSLKD_DATA), checked, and nothing else left there
    cache = tmp_path / 'home' / '.cache' / 'sslkd' / 'fashion-mnist'
    assert sorted(p.name for p in cache.iterdir()) == sorted(f'{f.name}.gz' for f in FILES)
    for f in FILES: assert sha256_file(cache / f'{f.name}.gz') == f.gz_sha256
    # a second load reads the downloaded copy: the server sees no request, and works without it
    mirror.close()
    again = load_dataset('fashion_mnist', 'test')
    assert len(mirror.requests) == 4 and torch.equal(again.x, test.x) and torch.equal(again.y, test.y)
    print(f'downloaded and loaded both splits in {took:.2f}s')


def test_damaged_file_is_refused(tmp_path, mirror):
    "A mirror serving a damaged file: a clear DataError and no file, whole or partial, left behind."
    f = D.FASHION_FILES['test'][0]
    (tmp_path / 'served' / f'{f.name}.gz').write_bytes(os.urandom(3_000_000))  # several 1 MB chunks before the check
    with pytest.raises(DataError) as e: load_dataset('fashion_mnist', 'test', data_dir=tmp_path / 'mine')
    msg = str(e.value)
    assert 'checksum mismatch' in msg and f.gz_sha256 in msg and f'{mirror.url}{f.name}.gz' in msg
    assert str(tmp_path / 'mine') in msg and 'SSLKD_FASHION_MIRROR' in msg and len(msg.splitlines()) == 1
    assert mirror.requests == [f'/{f.name}.gz']
    assert [p for p in (tmp_path / 'mine').rglob('*') if p.is_file()] == []


def test_missing_file_and_dead_mirror(tmp_path, mirror, monkeypatch):
    "A 404 from one mirror and a refused connection from the next are both named; nothing is left behind."
    dead = Mirror(tmp_path)
    dead.close()  # its port is now closed: connections are refused
    monkeypatch.setenv('SSLKD_FASHION_MIRROR', f'{mirror.url} {dead.url}')
    with pytest.raises(DataError, match='all mirrors failed') as e: load_dataset('fashion_mnist', 'test')
    msg = str(e.value)
    assert 'HTTP Error 404' in msg and 'Connection refused' in msg and dead.url in msg
    assert [p for p in (tmp_path / 'home').rglob('*') if p.is_file()] == []
