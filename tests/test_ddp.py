"DDP on CPU (gloo): 2 processes with batch B/2 each take the same steps as 1 process with batch B."
import json, os, signal, socket, time, warnings
from contextlib import contextmanager
from pathlib import Path
import torch, torch.distributed as dist, torch.multiprocessing as mp
from sslkd.data import ImageData
from sslkd.augment import normalize
from sslkd.vit import ViT
from sslkd.dino import DINO, DINOConfig
from sslkd.train import TrainConfig, fit
from sslkd.resnet import small_cnn
from sslkd.guard import Interrupted
from sslkd.device import leave_distributed

STATS = ((0.5,), (0.25,))
CFG = dict(epochs=1, lr=1e-3, progress=False, eval_every=0, device="cpu")  # 64 images / batch 16: 4 steps


class MirrorViews:
    "Deterministic views (the image and its mirror): random per-rank augmentations could never match one process."
    n_global = 2
    def __call__(self, x, g):
        x = normalize(x, *STATS)
        return [x, x.flip(-1)]


def make(seed):
    torch.manual_seed(seed)
    vit = ViT(img_size=16, patch_size=2, in_chans=1, embed_dim=32, depth=2, num_heads=2)
    m = DINO(vit, 16, 1, *STATS, DINOConfig(out_dim=64, hidden_dim=32, bottleneck_dim=16, n_local=0))
    m.augment = MirrorViews()
    return m


def images(n=64):
    x = torch.randint(0, 256, (n, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return ImageData(x, torch.zeros(n, dtype=torch.long), ['a'], *STATS)


@contextmanager
def process_group(rank, world, port):
    "This spawned process as rank `rank` of a gloo group on this machine, one thread, destroyed on exit."
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.set_num_threads(1)
    warnings.simplefilter('ignore')
    dist.init_process_group('gloo', rank=rank, world_size=world)
    finished = False
    try:
        yield
        finished = True
    finally: leave_distributed(finished)  # a rank leaving while its peer still exchanges is aborted by gloo


def worker(rank, world, port, path):
    with process_group(rank, world, port):
        m = make(seed=rank)  # rank 1 starts from other weights: DDP must start it from rank 0's
        fit(m, images(), TrainConfig(batch_size=16 // world, **CFG))
        if rank == 0: torch.save(m.state_dict(), path)


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0)); return s.getsockname()[1]


def test_two_ranks_match_one_process(tmp_path):
    path = tmp_path / 'ddp.pt'
    mp.spawn(worker, args=(2, free_port(), str(path)), nprocs=2, join=True)
    ddp = torch.load(path, weights_only=True)
    one = make(seed=0)
    fit(one, images(), TrainConfig(batch_size=16, **CFG))
    ref = one.state_dict()
    assert ddp.keys() == ref.keys()
    moved = max((ref[k].float() - make(seed=0).state_dict()[k].float()).abs().max().item() for k in ref)
    assert moved > 1e-3  # the weights did change, so agreeing below means something
    diff = max((ddp[k].float() - ref[k].float()).abs().max().item() for k in ref)
    print(f"largest difference, 2 ranks x batch 8 vs 1 process x batch 16, after 4 steps: {diff:.3g}")
    assert diff < 1e-5, f"2 ranks x batch 8 differ from 1 process x batch 16 by {diff}"


class SlowRankViews(MirrorViews):
    "Rank 1 is slower: the ranks' clocks disagree, and the time budget's decisions must still be taken together."
    def __call__(self, x, g):
        if dist.get_rank() == 1: time.sleep(0.005)
        return super().__call__(x, g)


def budget_worker(rank, world, port, folder):
    with process_group(rank, world, port):
        m = make(seed=0); m.augment = SlowRankViews()
        res = fit(m, images(256), TrainConfig(batch_size=8, **{**CFG, 'minutes': 0.03}),
                  out=Path(folder) if rank == 0 else None)
        torch.save({'steps': res['steps'], 'total_steps': res['total_steps']}, Path(folder) / f'rank{rank}.pt')


def test_time_budget_decisions_are_the_same_on_every_rank(tmp_path):
    """Planning, the two re-plans and the stop at the budget use the slowest rank's time: no rank waits for another
    forever."""
    mp.spawn(budget_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f'rank{r}.pt', weights_only=True) for r in (0, 1))
    assert r0 == r1 and r0['steps'] > 0
    events = [json.loads(l).get('event') for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
    assert events.count('replan') == 2


class NoisyViews(MirrorViews):
    "Views with noise from each rank's own generator: an exact resume must restore every rank's generator."
    def __call__(self, x, g):
        a, b = super().__call__(x, g)
        return [a + 0.2 * torch.randn(a.shape, generator=g), b]


class StopsOnSignal(DINO):
    "Sends SIGTERM to its own process after step `stop_at` (every rank at the same step, as torchrun forwards it)."
    stop_at = None
    def after_step(self, step, total_steps):
        super().after_step(step, total_steps)
        if step == self.stop_at: os.kill(os.getpid(), signal.SIGTERM)


def with_batchnorm(seed):
    "DINO on a small CNN: each rank keeps its own BatchNorm statistics (its own shard), which resume must keep."
    torch.manual_seed(seed)
    m = StopsOnSignal(small_cnn(1), 16, 1, *STATS, DINOConfig(out_dim=64, hidden_dim=32, bottleneck_dim=16, n_local=0))
    m.augment = NoisyViews()
    return m


def resume_worker(rank, world, port, folder, stop_at):
    with process_group(rank, world, port):
        out, cfg = Path(folder), TrainConfig(batch_size=8, log_every=1, **{**CFG, 'epochs': 2})
        m = with_batchnorm(0)
        if stop_at is not None:
            m.stop_at = stop_at
            try: fit(m, images(), cfg, out=out)
            except Interrupted as e: assert e.code == 143
            else: raise AssertionError('the run did not stop on SIGTERM')
            dist.barrier()  # rank 0 has written the checkpoint (a real job restarts after every process ended)
            m = with_batchnorm(0)
            fit(m, images(), cfg, out=out, resume=True)
        else: fit(m, images(), cfg, out=out)
        torch.save(m.state_dict(), out / f'rank{rank}.pt')


def test_a_resume_under_torchrun_restores_every_rank(tmp_path):
    "Stopped by SIGTERM mid-epoch and resumed, 2 ranks end exactly where 2 uninterrupted ranks end, rank 1 included."
    for name, stop_at in (('straight', None), ('stopped', 2)):
        mp.spawn(resume_worker, args=(2, free_port(), str(tmp_path / name), stop_at), nprocs=2, join=True)
    for rank in (0, 1):
        a, b = (torch.load(tmp_path / name / f'rank{rank}.pt', weights_only=True) for name in ('straight', 'stopped'))
        diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
        assert diff < 1e-5, f"rank {rank}: the resumed run differs by {diff}"
