"The offline docs build (tools/docs.py) and its browser test (tools/check_docs.py), on tiny inputs."
import base64, importlib.util, io, shutil, sys
from pathlib import Path
import pytest

root = Path(__file__).resolve().parent.parent

def _load(name):
    spec = importlib.util.spec_from_file_location(name, root / 'tools' / f'{name}.py')
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    return mod

docs, check_docs = _load('docs'), _load('check_docs')

def test_directives_and_front_matter():
    opts, src = docs.directives('#| echo: false\n#| output: asis\nshow_doc(f)')
    assert opts == {'echo': False, 'output': 'asis'} and src == 'show_doc(f)'
    nb = {'cells': [{'cell_type': 'raw', 'source': "---\ntitle: RKD\noutput-file: rkd.html\n---\n"}]}
    assert docs.front_matter(nb) == {'title': 'RKD', 'output-file': 'rkd.html'}
    assert docs.front_matter({'cells': [{'cell_type': 'markdown', 'source': '# hi'}]}) == {}

def test_quarto_attrs_and_ids():
    assert docs.strip_quarto_attrs('[source](https://x/y.py#L3){target="_blank" style="float:right"}') == '[source](https://x/y.py#L3)'
    assert docs.strip_quarto_attrs('a {b} [c](d)') == 'a {b} [c](d)'  # braces elsewhere are content
    # the ids nbdev's doc links (sslkd/_modidx.py) point at
    assert docs.heading_id('MultiCrop.n_global') == 'multicrop.n_global'
    assert docs.heading_id('The two potentials') == 'the-two-potentials'
    assert docs.heading_id('2. What to try <code>next</code>!') == 'what-to-try-next'

def test_links_become_relative():
    pages = {'12_rkd.ipynb': 'rkd.html', 'index.ipynb': 'index.html'}
    assert docs.rewrite_link('12_rkd.ipynb#angle', pages, '') == 'rkd.html#angle'
    assert docs.rewrite_link('./12_rkd.ipynb', pages, '') == 'rkd.html'
    assert docs.rewrite_link('https://sslkd.github.io/sslkd/rkd.html#rkd_angle_loss', pages, 'https://sslkd.github.io/sslkd') == 'rkd.html#rkd_angle_loss'
    assert docs.rewrite_link('https://pytorch.org/docs', pages, 'https://sslkd.github.io/sslkd') == 'https://pytorch.org/docs'
    assert docs.rewrite_link('#local', pages, '') == '#local'

def test_math_to_mathml():
    m = docs.tex_to_mathml(r'\frac{a}{b}', display=True)
    assert m.startswith('<math') and 'display="block"' in m and '<mfrac>' in m
    assert '<msub>' in docs.tex_to_mathml('x_i')

def _png():
    import matplotlib; matplotlib.use('Agg'); import matplotlib.pyplot as plt
    buf = io.BytesIO(); plt.figure(figsize=(1, 1)); plt.plot([0, 1]); plt.savefig(buf, format='png'); plt.close()
    return base64.b64encode(buf.getvalue()).decode()

def test_render_notebook():
    nb = {'nbformat': 4, 'nbformat_minor': 5, 'metadata': {}, 'cells': [
        {'cell_type': 'raw', 'metadata': {}, 'source': '---\ntitle: T\n---\n'},
        {'cell_type': 'markdown', 'metadata': {},
         'source': '## Loss\n\nThe loss $\\sum_i x_i$, see [RKD](12_rkd.ipynb#angle).\n\n$$\\frac{1}{N}$$'},
        {'cell_type': 'code', 'metadata': {}, 'execution_count': None,
         'source': '#| echo: false\n#| output: asis\nshow_doc(f)',
         'outputs': [{'output_type': 'display_data', 'metadata': {},
                      'data': {'text/markdown': '### f\n\n[source](https://github.com/x/y.py#L1){target="_blank"}', 'text/plain': 'f'}}]},
        {'cell_type': 'code', 'metadata': {}, 'execution_count': None, 'source': 'plot()',
         'outputs': [{'output_type': 'display_data', 'metadata': {},
                      'data': {'image/png': _png(), 'text/plain': 'fig'}}]},
        {'cell_type': 'code', 'metadata': {}, 'execution_count': None, 'source': '#| include: false\nsecret()',
         'outputs': []}]}
    body, toc = docs.render_notebook(nb, {'12_rkd.ipynb': 'rkd.html'})
    assert toc == [('loss', 'Loss')]
    assert body.count('<math') == 2 and '$' not in body
    assert 'href="rkd.html#angle"' in body
    assert 'show_doc' not in body and '#|' not in body and 'secret' not in body   # echo: false, include: false
    assert '<h3 id="f"' in body and '{target' not in body                         # the API entry, its anchor
    assert 'src="data:image/png;base64,' in body and '>plot<' in body             # the plot and its (highlighted) code
    assert 'title: T' not in body                                                 # front matter is not content

chromium = pytest.mark.skipif(check_docs.find_chromium() is None,
                              reason='needs Chromium (apt-get install chromium); .ci/run installs it')

def _site(tmp_path, pages):
    for name, body in pages.items():
        (tmp_path / name).write_text(f'<!doctype html><html><body><main>{body}</main></body></html>')
    return tmp_path

TEXT = 'Self-distillation trains a student to match an EMA teacher. ' * 5

@chromium
def test_browser_check_passes_a_good_site(tmp_path):
    site = _site(tmp_path, {
        'index.html': f'<h1 id="top">Home</h1><p>{TEXT}</p><a href="a.html#sec">a</a>'
                      '<a href="https://example.com/x">out</a>',
        'a.html': f'<h2 id="sec">A</h2><p>{TEXT}</p><a href="index.html#top">home</a>'
                  f'<img src="data:image/png;base64,{_png()}">'})
    pages, n_links, problems = check_docs.check(site, tmp_path / 'shots',
                                                shot_pages=(('index.html', False), ('a.html', True)))
    assert problems == [] and sorted(pages) == ['a.html', 'index.html'] and n_links == 2
    assert (tmp_path / 'shots' / 'index.png').exists() and (tmp_path / 'shots' / 'a.png').exists()

@chromium
def test_browser_check_finds_broken_links_and_blank_pages(tmp_path):
    site = _site(tmp_path, {
        'index.html': f'<p>{TEXT}</p><a href="missing.html">m</a><a href="a.html#nowhere">n</a>'
                      '<a href="blank.html">b</a>',
        'a.html': f'<p>{TEXT}</p>', 'blank.html': '', 'math.html': f'<p>{TEXT} $$x^2$$</p>'})
    _, _, problems = check_docs.check(site)
    text = '\n'.join(problems)
    assert 'broken link missing.html (no page missing.html)' in text
    assert 'broken link a.html#nowhere (no id "nowhere" in a.html)' in text
    assert 'blank.html: renders blank' in text
    assert 'math.html: unrendered display math' in text   # not linked from index: every page is opened anyway
    assert len(problems) == 4

def test_blank_and_trimmed_screenshots(tmp_path):
    import numpy as np, matplotlib.image as mpimg
    white = np.ones((400, 300, 3)); png = tmp_path / 'w.png'
    mpimg.imsave(png, white); assert check_docs.blank_image(png)
    white[50:80, 20:200] = 0; mpimg.imsave(png, white); assert not check_docs.blank_image(png)   # one line of "text"
    check_docs.trim_bottom(png, margin=10)
    assert mpimg.imread(png).shape[0] == 90   # cut 10 rows below the last non-white one
