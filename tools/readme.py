"""Write README.md from nbs/index.ipynb (nbdev_readme needs Quarto, which cannot be installed offline).

Markdown cells are copied; code cells become ```python blocks with their text outputs; cells marked
`#| hide` are left out, and nbdev directives are stripped. `--check` fails if README.md is stale.
"""
import json, re, sys
from pathlib import Path

root = Path(__file__).resolve().parent.parent

def _from_root(md):
    """Links and images relative to nbs/ (`02_vit.ipynb`, `images/x.png`) as seen from the repository root, where
    README.md is."""
    return re.sub(r'(\]\()(?![a-z]+:|#|/)([^)\s]+)', lambda m: m.group(1) + (
        'nbs/' + m.group(2) if (root/'nbs'/m.group(2).split('#')[0]).exists() else m.group(2)), md)

def render(nb_path):
    nb, out = json.loads(Path(nb_path).read_text()), []
    for c in nb['cells']:
        src = ''.join(c['source'])
        if re.search(r'^#\|\s*hide\s*$', src, re.M): continue
        if c['cell_type'] == 'markdown': out.append(_from_root(src.strip())); continue
        code = '\n'.join(l for l in src.splitlines() if not l.startswith('#|')).strip()
        if code: out.append(f'```python\n{code}\n```')
        text = ''.join(''.join(o.get('text', '')) for o in c.get('outputs', []) if o.get('output_type') == 'stream')
        if text.strip(): out.append(f'```\n{text.rstrip()}\n```')
    return ('<!-- generated from nbs/index.ipynb by tools/readme.py: edit the notebook, not this file -->\n\n'
            + '\n\n'.join(out) + '\n')

if __name__ == '__main__':
    text, dest = render(root/'nbs'/'index.ipynb'), root/'README.md'
    if '--check' in sys.argv:
        if not dest.exists() or dest.read_text() != text:
            sys.exit('README.md is out of date: run `python tools/readme.py`')
    else: dest.write_text(text); print('wrote', dest)
