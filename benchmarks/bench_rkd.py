"""Peak memory and time of RKD's angle loss, forward + backward: naive (N x N x D and N x N x N tensors) vs fast
(Gram, chunked).

    python benchmarks/bench_rkd.py [--device cpu|cuda] [--sizes 256,512,1024] [--dim 256] [--chunk auto] [--repeats 3]

Inputs: random float32 student and teacher features (N, dim), the student requiring grad. Every (implementation, N)
runs in a fresh subprocess, so that one measurement's high-water mark cannot hide the next one's.

Peak memory is the extra memory a forward + backward needs on top of what existed before it:
- CUDA: `torch.cuda.reset_peak_memory_stats()` after setup, then `max_memory_allocated() - memory_allocated()`
  (bytes held by tensors, as the caching allocator counts them).
- CPU: PyTorch keeps no statistics of its CPU allocations and tracemalloc does not see them, so we use the operating
  system's count of resident pages. After importing, allocating the inputs and a warm-up at N = 8 (lazy library
  initialisation is not the loss's memory), the child reads its current RSS (/proc/self/statm); after one forward +
  backward it reads its peak RSS (`resource.getrusage(...).ru_maxrss`, a high-water mark). Peak minus current is the
  extra resident memory of the step: every tensor we allocate is written, so it is resident; freed blocks that the
  allocator keeps for reuse do not add to the peak. The warm-up is tiny, so the high-water mark before the step is the
  current RSS (the child checks this and marks the number '<=' otherwise: then it is only an upper bound).
Time: median of up to --repeats forward + backward runs after the measured one (fewer when they exceed --max-seconds).
The naive loss is skipped when its estimated peak (4 N^3 + 2 N^2 dim floats, measured) exceeds 90% of the available
memory; on Linux its child makes itself the out-of-memory killer's first choice, so an underestimate kills only it.
"""
import argparse, json, os, subprocess, sys, time


def current_rss_bytes():
    "Resident memory of this process now (Linux), or None elsewhere."
    try:
        with open('/proc/self/statm') as f: return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
    except (OSError, ValueError): return None


def peak_rss_bytes():
    import resource
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == 'darwin' else r * 1024  # kilobytes on Linux, bytes on macOS


def child(impl, n, dim, chunk, device, repeats, max_seconds):
    "Measure one (implementation, N) and print a JSON line."
    try:  # if memory runs out, this process is the one to go, not a neighbour
        with open('/proc/self/oom_score_adj', 'w') as f: f.write('1000')
    except OSError: pass
    import torch
    from sslkd.rkd import rkd_angle_loss, rkd_angle_loss_naive
    dev = torch.device(device)
    loss = rkd_angle_loss_naive if impl == 'naive' else (lambda s, t: rkd_angle_loss(s, t, chunk_size=chunk))
    g = torch.Generator().manual_seed(0)
    s = torch.randn(n, dim, generator=g).to(dev).requires_grad_()
    t = torch.randn(n, dim, generator=g).to(dev)
    sync = torch.cuda.synchronize if dev.type == 'cuda' else (lambda: None)
    def step():
        s.grad = None
        loss(s, t).backward()
        sync()
    loss(s[:8].detach().requires_grad_(), t[:8]).backward()  # warm-up: library initialisation is not the loss's memory
    s.grad = None; sync()
    if dev.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(dev); base = torch.cuda.memory_allocated(dev)
    else:
        base, hwm_before = current_rss_bytes(), peak_rss_bytes()
        if base is None: base = hwm_before
    t0 = time.perf_counter(); step(); first = time.perf_counter() - t0
    if dev.type == 'cuda': peak, upper_bound = torch.cuda.max_memory_allocated(dev) - base, False
    else:
        hwm = peak_rss_bytes()
        # high-water mark not exceeded: the step's peak is at most this
        peak, upper_bound = hwm - base, hwm <= hwm_before
    times = []
    while len(times) < repeats and (not times or first + sum(times) < max_seconds):
        t0 = time.perf_counter(); step(); times.append(time.perf_counter() - t0)
    times.sort()
    print(json.dumps(dict(peak_mb=peak / 2**20, upper_bound=upper_bound, ms=1e3 * times[len(times) // 2],
                          runs=len(times))))


def available_bytes(device):
    if device.startswith('cuda'):
        import torch
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        with open('/proc/meminfo') as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith('MemAvailable'))
    except (OSError, StopIteration): return float('inf')


def measure(impl, n, a):
    if impl == 'naive':
        need = 4 * (4 * n**3 + 2 * n**2 * a.dim)
        if need > 0.9 * available_bytes(a.device):
            return dict(skipped=f"needs ~{need / 2**30:.1f} GiB")
    cmd = [sys.executable, os.path.abspath(__file__), '--child', impl, str(n), '--dim', str(a.dim), '--chunk', a.chunk,
           '--device', a.device, '--repeats', str(a.repeats), '--max-seconds', str(a.max_seconds)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        return dict(skipped=f"failed (exit {p.returncode}): {(p.stderr.strip().splitlines() or [''])[-1][:60]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def fmt_mb(r): return f"{'<=' if r.get('upper_bound') else ''}{r['peak_mb']:.1f}" if 'peak_mb' in r else '-'


def main(a):
    sizes = [int(x) for x in a.sizes.split(',')]
    print(f"RKD angle loss, forward + backward, float32, dim {a.dim}, device {a.device}, chunk {a.chunk}, "
          f"{os.environ.get('OMP_NUM_THREADS', 'default')} threads (OMP_NUM_THREADS)")
    print(f"{'N':>6} {'naive MB':>10} {'fast MB':>9} {'mem ratio':>10} {'naive ms':>10} {'fast ms':>9} "
          f"{'fast/naive time':>16}")
    rows = []
    for n in sizes:
        nv, fs = measure('naive', n, a), measure('fast', n, a)
        both = 'peak_mb' in nv and 'peak_mb' in fs
        ratio = f"{nv['peak_mb'] / max(fs['peak_mb'], 1e-3):.1f}x" if both else '-'
        tratio = f"{fs['ms'] / nv['ms']:.2f}" if both else '-'
        print(f"{n:>6} {fmt_mb(nv):>10} {fmt_mb(fs):>9} {ratio:>10} {nv.get('ms', float('nan')):>10.0f} "
              f"{fs.get('ms', float('nan')):>9.0f} {tratio:>16}"
              + (f"   naive {nv['skipped']}" if 'skipped' in nv else '')
              + (f"   fast {fs['skipped']}" if 'skipped' in fs else ''), flush=True)
        rows.append(dict(n=n, naive=nv, fast=fs))
    return rows


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', default='cpu'); p.add_argument('--sizes', default='256,512,1024')
    p.add_argument('--dim', type=int, default=256)
    p.add_argument('--chunk', default='auto', help="anchors per chunk of the fast loss, or 'auto' (its default)")
    p.add_argument('--repeats', type=int, default=3); p.add_argument('--max-seconds', type=float, default=60.)
    p.add_argument('--child', nargs=2, metavar=('IMPL', 'N'), help=argparse.SUPPRESS)
    return p.parse_args(argv)


if __name__ == '__main__':
    a = parse()
    if a.child:
        chunk = None if a.chunk == 'auto' else int(a.chunk)
        child(a.child[0], int(a.child[1]), a.dim, chunk, a.device, a.repeats, a.max_seconds)
    else: main(a)
