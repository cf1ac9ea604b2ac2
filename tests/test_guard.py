"""A run never loses work, in one process: protected folders, checkpoints inside an epoch, SIGTERM, exact resume.

The subprocess cases (kill -9, two commands into one folder, a full disk) are in test_faults.py."""
import json, os, signal
import pytest, torch
from sslkd.checkpoint import load_checkpoint
from sslkd.guard import FolderLock, RunFolderError, Interrupted
from sslkd.train import TrainConfig, fit, TrainingDiverged, CheckpointError
from test_train import ToyMethod, toy_data, CFG, weights

EVERY_STEP = 1e-9  # minutes: a checkpoint after every step


class Signalled(ToyMethod):
    "Sends itself `signum` after step `at`, as `timeout` or a scheduler would."
    def __init__(self, at, signum=signal.SIGTERM): super().__init__(); self.at, self.signum = at, signum
    def after_step(self, step, total_steps):
        super().after_step(step, total_steps)
        if step == self.at: os.kill(os.getpid(), self.signum)


def straight(tmp_path):
    m = ToyMethod(); fit(m, toy_data(), TrainConfig(**CFG), out=tmp_path / 'straight'); return weights(m)


def step_lines(out): return [json.loads(l)['step'] for l in (out / 'metrics.jsonl').read_text().splitlines()
                             if 'loss' in l and 'epochs_done' not in l]


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_a_checkpoint_and_the_resume_is_exact(tmp_path, signum):
    out = tmp_path / 'run'
    with pytest.raises(Interrupted, match=r'at step 4 of 12; checkpoint saved at .*--resume') as e:
        fit(Signalled(at=3, signum=signum), toy_data(), TrainConfig(**CFG), out=out)  # mid-epoch: 6 steps/epoch
    assert e.value.code == 128 + signum and load_checkpoint(out / 'checkpoint.pt')['step'] == 4
    resumed = ToyMethod(); fit(resumed, toy_data(), TrainConfig(**CFG), out=out, resume=True)
    for k, v in straight(tmp_path).items(): assert torch.equal(v, weights(resumed)[k]), k
    assert step_lines(out) == list(range(0, 12, 2))  # every logged step once: the log was cut back to the checkpoint


def test_checkpoints_inside_an_epoch_resume_exactly(tmp_path):
    out, cfg = tmp_path / 'run', TrainConfig(**CFG, checkpoint_every=EVERY_STEP)
    with pytest.raises(KeyboardInterrupt):  # a crash in step 9 (epoch 1, mid-epoch): the checkpoint is at step 9
        fit(ToyMethod(interrupt_at=9), toy_data(), cfg, out=out)
    assert load_checkpoint(out / 'checkpoint.pt')['step'] == 9
    resumed = ToyMethod(); fit(resumed, toy_data(), cfg, out=out, resume=True)
    for k, v in straight(tmp_path).items(): assert torch.equal(v, weights(resumed)[k]), k


def test_a_folder_with_a_run_is_never_replaced_silently(tmp_path):
    fit(ToyMethod(), toy_data(), TrainConfig(**CFG), out=tmp_path)
    before = load_checkpoint(tmp_path / 'checkpoint.pt')['step']
    with pytest.raises(RunFolderError, match='already holds a run.*--resume.*--overwrite'):
        fit(ToyMethod(), toy_data(), TrainConfig(**{**CFG, 'epochs': 0.2}), out=tmp_path)
    assert load_checkpoint(tmp_path / 'checkpoint.pt')['step'] == before
    fit(ToyMethod(), toy_data(), TrainConfig(**{**CFG, 'epochs': 0.5}), out=tmp_path, overwrite=True)
    assert load_checkpoint(tmp_path / 'checkpoint.pt')['step'] == 3
    with pytest.raises(RunFolderError, match='holds no checkpoint.pt'):
        fit(ToyMethod(), toy_data(), TrainConfig(**CFG), out=tmp_path / 'empty', resume=True)


def test_a_folder_in_use_is_refused_and_debris_is_cleared(tmp_path):
    with FolderLock(tmp_path):
        with pytest.raises(RunFolderError, match=f'in use by another run \\(pid {os.getpid()}'):
            fit(ToyMethod(), toy_data(), TrainConfig(**CFG), out=tmp_path)
    (tmp_path / 'checkpoint.pt.abc123.tmp').write_bytes(b'half a checkpoint')
    fit(ToyMethod(), toy_data(), TrainConfig(**CFG), out=tmp_path)
    assert not list(tmp_path.glob('*.tmp'))


def test_the_nan_advice_can_be_followed(tmp_path):
    with pytest.raises(TrainingDiverged, match=r'--resume and, e.g., a lower --lr'):
        fit(ToyMethod(nan_at=8), toy_data(), TrainConfig(**CFG), out=tmp_path)
    res = fit(ToyMethod(), toy_data(), TrainConfig(**{**CFG, 'lr': 5e-3}), out=tmp_path, resume=True)
    assert res['steps'] == 12
    changed = [h for h in res['history'] if h.get('event') == 'changed']
    assert changed == [{'event': 'changed', 'step': 6, 'changes': ['train.lr: checkpoint 0.01 vs now 0.005']}]
    with pytest.raises(CheckpointError, match='batch_size'):  # what shapes the run still may not change
        fit(ToyMethod(), toy_data(), TrainConfig(**{**CFG, 'batch_size': 8}), out=tmp_path, resume=True)
