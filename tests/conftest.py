import pytest, torch


@pytest.fixture(autouse=True)
def one_thread():
    "Tiny models run ~10x faster on one thread when the 2 cores are shared (thread-pool contention); restored after."
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
