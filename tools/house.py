"""The house rules, measured: module lengths, cell lengths, long lines, and pointers to files a reader cannot open.

    python tools/house.py          # prints the figures; exit 1 if a rule is broken

Rules: no module over 400 lines (the generated `_modidx.py` aside), no line over 120 characters in the library,
notebooks, tests, benchmarks and tools (nbdev's generated `__all__` lists aside), and no reference to documents
outside the repository.
"""
import json, re, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_MODULE, MAX_LINE = 400, 120
# internal planning documents that never ship with sslkd: a reader who follows such a pointer finds nothing
LORE = re.compile(r'references\.md|shared/notes|design notes|\bseed 00\d|\bthe seed\b|our CI machines', re.I)

def modules(): return [p for p in sorted((ROOT / 'sslkd').glob('*.py')) if p.name != '_modidx.py']

def notebooks(): return sorted((ROOT / 'nbs').glob('*.ipynb'))

def cells(nb):
    "Source of every cell of notebook `nb`."
    return [''.join(c['source']) for c in json.loads(nb.read_text())['cells']]

def texts():
    "(name, text) of every file a reader sees: library, notebooks, tests, benchmarks, tools, README."
    out = [(str(p.relative_to(ROOT)), p.read_text()) for d in ('sslkd', 'tests', 'benchmarks', 'tools')
           for p in sorted((ROOT / d).glob('*.py')) if p.name != '_modidx.py']
    out += [(str(nb.relative_to(ROOT)), '\n'.join(cells(nb))) for nb in notebooks()]
    return out + [('README.md', (ROOT / 'README.md').read_text())]

def long_lines():
    "(file, line) of every line over MAX_LINE characters (nbdev's generated `__all__` lists aside)."
    strip = lambda t: re.sub(r'^__all__ = \[.*?\]$', '', t, flags=re.S | re.M)
    return [(name, l) for name, t in texts() for l in strip(t).splitlines() if len(l) > MAX_LINE and 'http' not in l]

def lore(): return [(name, m.group(0)) for name, t in texts() for m in LORE.finditer(t) if name != 'tools/house.py']

def longest_cell():
    return max(((len(c.splitlines()), nb.name) for nb in notebooks() for c in cells(nb)), default=(0, ''))

def report():
    "Print the figures; return the broken rules."
    mods = sorted(((len(p.read_text().splitlines()), p.name) for p in modules()), reverse=True)
    ll, lo = long_lines(), lore()
    print(f"longest modules: {', '.join(f'{n} ({k})' for k, n in mods[:3])}")
    print(f"longest cell: {longest_cell()[0]} lines ({longest_cell()[1]})")
    print(f"lines over {MAX_LINE} characters: {len(ll)}; pointers to internal documents: {len(lo)}")
    for name, l in ll[:20]: print(f"  {name}: {l[:100]}...")
    for name, w in lo[:20]: print(f"  {name}: {w!r}")
    broken = [f'{n} has {k} lines' for k, n in mods if k > MAX_MODULE]
    return broken + [f'{n}: a line of {len(l)} characters' for n, l in ll] + [f'{n}: {w!r}' for n, w in lo]

if __name__ == '__main__': sys.exit(1 if report() else 0)
