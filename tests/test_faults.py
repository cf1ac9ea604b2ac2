"""Fault injection: real `sslkd train` processes killed, stopped, doubled, repeated and starved of disk.

Each case trains DINO on a tiny image folder (36 images, batch 8: 4 steps per epoch, 3 epochs) with a checkpoint
after every step, in a subprocess on one thread so that runs are bitwise repeatable. What must hold: whatever
stopped a run, `--resume` ends with the weights and optimiser state of the run that was never stopped."""
import os, random, re, shutil, signal, subprocess, sys, time
import pytest, torch
from sslkd.checkpoint import load_checkpoint

ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'}


def command(folder, out, *extra, epochs=3):
    return [sys.executable, '-m', 'sslkd', 'train', '--method', 'dino', '--data', f'folder:{folder}', '--arch',
            'vit_nano', '--patch', '8', '--epochs', str(epochs), '--batch-size', '8', '--checkpoint-every', '1e-9',
            '--eval-every', '0', '--no-linear', '--no-progress', '--device', 'cpu', '--out', str(out), *extra]


def run(folder, out, *extra, timeout=300):
    p = subprocess.run(command(folder, out, *extra), env=ENV, capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stderr


def start(folder, out, *extra, epochs=3):
    return subprocess.Popen(command(folder, out, *extra, epochs=epochs), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def wait_for(cond, timeout=120):
    t = time.time()
    while not cond():
        if time.time() - t > timeout: raise TimeoutError
        time.sleep(0.001)


def training(out): return lambda: (out / 'checkpoint.pt').exists()  # at least one step done and saved


def state(out):
    ck = load_checkpoint(out / 'checkpoint.pt')
    return ck['step'], ck['method'], ck['optimizer']['state']


def assert_same_run(a, b):
    (sa, ma, oa), (sb, mb, ob) = state(a), state(b)
    assert sa == sb == 12
    for k in ma: assert torch.equal(ma[k], mb[k]), k
    for i in oa:
        for k in oa[i]: assert torch.equal(oa[i][k], ob[i][k]), (i, k)


def one_line_error(stderr):
    lines = [l for l in stderr.splitlines() if l.startswith('sslkd train: error:')]
    assert len(lines) == 1 and 'Traceback' not in stderr, stderr
    return lines[0]


@pytest.fixture(scope='module')
def straight(tmp_path_factory):
    "The run that was never stopped, and the image folder: made once for the module."
    root = tmp_path_factory.mktemp('faults')
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for split, n in (('train', 12), ('test', 4)):
        for c, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
            d = root / 'imgs' / split / f'class{c}'; d.mkdir(parents=True)
            for i in range(n):
                im = Image.new('RGB', (32, 32), (0, 0, 0))
                x, y = torch.randint(0, 16, (2,), generator=g).tolist()
                im.paste(colour, (x, y, x + 16, y + 16)); im.save(d / f'{i}.png')
    code, err = run(root / 'imgs', root / 'straight')
    assert code == 0, err
    return root / 'imgs', root / 'straight'


def resume_until_done(folder, out):
    "Resume until the run ends: a kill before the first checkpoint leaves nothing to resume, so that run starts over."
    for _ in range(5):
        code, err = run(folder, out, '--resume') if (out / 'checkpoint.pt').exists() else run(folder, out)
        if code == 0: return err
    raise AssertionError(err)


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_kill_9_at_a_random_moment_then_resume(straight, tmp_path, seed):
    folder, ref = straight
    p = start(folder, tmp_path / 'run')
    wait_for(training(tmp_path / 'run'))
    time.sleep(random.Random(seed).uniform(0, 1.0))
    p.kill(); p.wait()
    resume_until_done(folder, tmp_path / 'run')
    assert_same_run(ref, tmp_path / 'run')


def test_kill_9_during_a_checkpoint_write_then_resume(straight, tmp_path):
    folder, ref, out = *straight, tmp_path / 'run'
    p = start(folder, out)
    wait_for(lambda: any(out.glob('checkpoint.pt.*.tmp')))  # a write has begun
    p.kill(); p.wait()
    load_checkpoint(out / 'checkpoint.pt') if (out / 'checkpoint.pt').exists() else None  # whole, or none yet
    resume_until_done(folder, out)
    assert not list(out.glob('*.tmp'))  # the half-written file was cleared
    assert_same_run(ref, out)


def test_sigterm_saves_says_where_and_resumes(straight, tmp_path):
    folder, ref, out = *straight, tmp_path / 'run'
    p = start(folder, out)
    wait_for(training(out))
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    if p.returncode == 0: pytest.skip('the run ended before the signal arrived')
    assert p.returncode == 143, err
    assert re.search(r'stopped by SIGTERM at step \d+ of 12; checkpoint saved at .*--resume', err), err
    code, err = run(folder, out, '--resume')
    assert code == 0, err
    assert_same_run(ref, out)


def test_a_finished_run_is_not_replaced(straight, tmp_path):
    folder, ref = straight
    shutil.copytree(ref, tmp_path / 'run')
    code, err = run(folder, tmp_path / 'run')
    assert code == 2 and 'already holds a run' in one_line_error(err)
    assert_same_run(ref, tmp_path / 'run')  # untouched
    code, err = run(folder, tmp_path / 'fresh', '--resume')
    assert code == 2 and 'holds no checkpoint.pt' in one_line_error(err)


def test_two_runs_into_one_folder(straight, tmp_path):
    folder, out = straight[0], tmp_path / 'run'
    first = start(folder, out, epochs=300)  # long enough to be running when the second one starts
    try:
        wait_for(training(out))
        code, err = run(folder, out, '--resume')  # even a resume may not write where a run is writing
        assert code == 2 and f'is in use by another run (pid {first.pid}' in one_line_error(err)
        assert first.poll() is None  # the first one is still training, undisturbed
    finally: first.kill(); first.wait()


def test_a_full_disk_keeps_the_last_good_checkpoint(straight, tmp_path):
    if os.geteuid() != 0: pytest.skip('mounting a small tmpfs needs root')
    disk, size = tmp_path / 'disk', (straight[1] / 'checkpoint.pt').stat().st_size
    disk.mkdir()  # room for one checkpoint and the log, not for a second checkpoint next to it
    if subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={int(1.5 * size)}', 'tmpfs', str(disk)]).returncode:
        pytest.skip('cannot mount a tmpfs here')
    try:
        out = disk / 'run'
        code, err = run(straight[0], out)
        assert code == 2 and 'no space left' in one_line_error(err).lower(), err
        assert 'the last good checkpoint is kept' in err, err
        step = load_checkpoint(out / 'checkpoint.pt')['step']  # the last good one loads
        assert step >= 1 and not list(out.glob('*.tmp'))
    finally:
        subprocess.run(['umount', str(disk)])


def test_a_stalled_rank_ends_the_torchrun_job_within_the_timeout(straight, tmp_path):
    "SIGSTOP on rank 1: rank 0 waits --dist-timeout (here 15 s) in its next collective, then the job ends, saying why."
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '-m', 'sslkd', 'train',
           *command(straight[0], tmp_path / 'run', '--dist-timeout', '0.25', epochs=300)[4:]]
    job = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(training(tmp_path / 'run'))
        ranks = {}
        for pid in subprocess.run(['pgrep', '-P', str(job.pid)], capture_output=True, text=True).stdout.split():
            env = open(f'/proc/{pid}/environ', 'rb').read().split(b'\0')
            ranks[next(e for e in env if e.startswith(b'RANK=')).decode()] = int(pid)
        os.kill(ranks['RANK=1'], signal.SIGSTOP)
        t = time.time()
        _, err = job.communicate(timeout=240)
        waited = time.time() - t
    finally:
        if job.poll() is None: job.kill()
    print(f"job ended {waited:.1f} s after rank 1 stalled (timeout 15 s)")
    assert job.returncode != 0 and waited < 120
    errors = [l for l in err.splitlines() if 'error' in l.lower()]
    assert 'the other processes did not answer within --dist-timeout 0.25 minutes' in err, errors[:8]
