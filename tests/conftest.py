import pytest, torch
from PIL import Image


@pytest.fixture(autouse=True)
def one_thread():
    "Tiny models run ~10x faster on one thread when the 2 cores are shared (thread-pool contention); restored after."
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def folder(tmp_path):
    "A tiny image-folder dataset: 3 classes of coloured squares at random places, train/ and test/."
    g = torch.Generator().manual_seed(0)
    for split, n in (('train', 12), ('test', 4)):
        for c, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
            d = tmp_path / 'imgs' / split / f'class{c}'; d.mkdir(parents=True)
            for i in range(n):
                im = Image.new('RGB', (20, 20), (0, 0, 0))
                x, y = torch.randint(0, 10, (2,), generator=g).tolist()
                im.paste(colour, (x, y, x + 10, y + 10)); im.save(d / f'{i}.png')
    return tmp_path / 'imgs'
