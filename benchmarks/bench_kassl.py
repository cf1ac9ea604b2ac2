"""The KASSL table on real Fashion-MNIST, on this machine: `sslkd compare --preset kassl`, then how far
each student gets relative to the teacher and to the baseline.

    python benchmarks/bench_kassl.py [--out runs/kassl] [--seeds 0] [--epochs 10] [--rows 'baseline;student (kassl)']

Rows (the preset): the teacher (wide_cnn trained by BYOL for 30 epochs), the baseline (small_cnn trained by BYOL
alone for the student budget, 10 epochs), the student (the same small_cnn distilled from the teacher by KASSL for
the same epochs: equal student compute), the student with centred targets (not in the KASSL study) and the study's
ablations (no_aug, feature_reduction, both). Every figure is on the test split from the final checkpoint
(kNN k=20 T=0.07 and a linear probe). Budgets are in epochs, so the figures do not depend on the machine's load;
training seconds are printed too. Re-running skips finished runs and resumes stopped ones (the teacher takes about
100 minutes on a 2-core CPU, each student about 20).

`--rows` trains only the rows whose labels start with one of the ';'-separated prefixes (the teacher is always
kept, trained once with the first seed): e.g. more seeds of the baseline and the student alone. The table shows
every finished run under `--out`, with its number of seeds; each student is compared with the baseline trained with the
same seeds (paired: the gap seed by seed, and its mean).
"""
import argparse, json
from pathlib import Path
from sslkd.runner import PRESETS, _slug, run_rows, results_markdown, summarize, write_results, comparison_plots

def finished(rows, out):
    "Every finished run of `rows` under `out`, whatever seeds it was trained with, as `compare` returns them."
    return [{**json.loads((run / 'results.json').read_text())['rows'][0], 'label': row.label, 'run': str(run)}
            for row in rows for run in sorted(out.glob(f'{_slug(row.label)}-s*')) if (run / 'results.json').exists()]

def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', default='runs/kassl'); p.add_argument('--seeds', default='0', help='comma-separated seeds')
    p.add_argument('--epochs', type=float, default=None,
                   help="epochs of the baseline and the students (default: the preset's)")
    p.add_argument('--rows', default=None, help="';'-separated label prefixes of the rows to train (default: all)")
    a = p.parse_args()
    preset, out, seeds = PRESETS['kassl'], Path(a.out), [int(s) for s in a.seeds.split(',')]
    epochs = a.epochs or preset.epochs
    todo = [r for r in preset.rows if r.once or a.rows is None or any(r.label.startswith(w) for w in a.rows.split(';'))]
    if a.rows and len(todo) == sum(r.once for r in preset.rows):
        p.error(f"--rows {a.rows!r} names no row; the rows are: {'; '.join(r.label for r in preset.rows)}")
    run_rows(todo, preset.data, out, seeds, epochs=epochs, common={'progress': False})
    rows = finished(preset.rows, out)
    write_results(out / 'results.json', preset.data, rows)
    md = results_markdown(rows, preset.data, f'student budget {epochs:g} epochs, every finished run')
    (out / 'results.md').write_text(md); print('\n' + md)
    s = summarize(rows)
    teacher, baseline = (next(v for k, v in s.items() if k.startswith(w)) for w in ('teacher', 'baseline'))
    base_of = {r['seed']: r for r in baseline['rows']}
    for label, v in s.items():
        if not label.startswith('student'): continue
        def versus(key):  # paired by seed: a row trained with seed 0 only is compared with the baseline's seed 0
            gaps = {r['seed']: r[key] - base_of[r['seed']][key] for r in v['rows'] if r['seed'] in base_of}
            return (f"{sum(gaps.values()) / len(gaps):+.2f} points over the baseline of the same seeds (" +
                    ', '.join(f's{seed} {gap:+.2f}' for seed, gap in gaps.items()) + ')'
                    if gaps else 'no baseline of the same seeds')
        print(f"{label} ({v['seeds']} seed{'s' * (v['seeds'] > 1)}): " + '; '.join(
            f"{name} {v[key][0]:.2f} = {100 * v[key][0] / teacher[key][0]:.1f}% of the teacher "
            f"({teacher[key][0]:.2f}), {versus(key)}"
            for name, key in (('kNN@1', 'knn_top1'), ('linear@1', 'linear_top1')) if v[key] and teacher[key]))
    print(f"plots: {', '.join(str(q) for q in comparison_plots(rows, out))}")

if __name__ == '__main__': main()
