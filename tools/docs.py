"""Build the docs site offline, from the notebooks: nbdev's own processing, then HTML with nbconvert.

    python tools/docs.py                # writes the site to _docs/ (settings.ini's doc_path); open _docs/index.html
    python tools/check_docs.py          # then the browser test: every page and internal link in headless Chromium

`nbdev_docs` renders the processed notebooks with Quarto, which cannot be installed offline. This script keeps
nbdev's half of that job (`nbdev.serve.proc_nbs`: directives, hidden cells, `show_doc` for every exported
function and class, links from backticked names to their docs) and replaces Quarto's half: nbconvert turns each
processed notebook into HTML, LaTeX becomes MathML (latex2mathml; browsers draw it without scripts or network),
and the navigation, titles and site name come from the same `nbs/sidebar.yml`, `nbs/nbdev.yml` and notebook front
matter that `nbdev_docs` reads, so the two builds agree on pages, titles and order. Plots are the PNG outputs saved
in the notebooks.
"""
import argparse, html, json, re, shutil, sys, time
from pathlib import Path
from urllib.parse import urlsplit

import yaml

root = Path(__file__).resolve().parent.parent

# ---- front matter, directives and Quarto-only markdown

def front_matter(nb):
    "The YAML front matter nbdev puts in the first raw cell of a processed notebook ({} if there is none)."
    cells = nb['cells']
    if cells and cells[0]['cell_type'] == 'raw':
        src = cells[0]['source']
        m = re.match(r'\s*---\n(.*?)\n---', ''.join(src) if isinstance(src, list) else src, re.S)
        if m: return yaml.safe_load(m.group(1)) or {}
    return {}

def directives(source):
    "Quarto cell options (`#| echo: false`) as a dict, and the source without them."
    opts, lines = {}, source.splitlines()
    while lines and lines[0].startswith('#|'):
        key, _, val = lines.pop(0)[2:].partition(':')
        val = val.strip().lower()
        opts[key.strip()] = {'false': False, 'true': True}.get(val, val or True)
    return opts, '\n'.join(lines)

def strip_quarto_attrs(md):
    "`[text](url){target=\"_blank\" style=...}` is Quarto (Pandoc) syntax; plain markdown shows the braces."
    return re.sub(r'(\]\([^)\s]*\))\{[^}\n]*\}', r'\1', md)

# ---- ids and links, as Quarto makes them

def heading_id(text):
    "Pandoc's auto identifier: lower case, punctuation other than `_ - .` dropped, spaces to hyphens."
    text = re.sub(r'[^\w\s.-]', '', html.unescape(re.sub(r'<[^>]+>', '', text))).strip().lower()
    return re.sub(r'\s+', '-', re.sub(r'^[^a-z]+', '', text)) or 'section'

def rewrite_link(url, pages, site_url):
    "Links into this site become relative: `12_rkd.ipynb#x` -> `rkd.html#x`, `{site_url}/rkd.html` -> `rkd.html`."
    if site_url and url.startswith(site_url.rstrip('/') + '/'): url = url[len(site_url.rstrip('/')) + 1:]
    parts = urlsplit(url)
    if parts.scheme or parts.netloc: return url
    path = parts.path.lstrip('./')
    if path.endswith('.ipynb'): path = pages.get(Path(path).name, path)
    return path + (f'#{parts.fragment}' if parts.fragment else '')

def fix_ids_and_links(body, pages, site_url):
    "Give headings Quarto's ids (nbdev's doc links point at them) and make site links relative."
    def head(m):
        level, attrs, inner = m.groups()
        attrs = re.sub(r'\s*id="[^"]*"', '', attrs)
        inner = re.sub(r'<a class="anchor-link"[^>]*>.*?</a>', '', inner, flags=re.S)
        hid = heading_id(inner)
        return f'<h{level} id="{hid}"{attrs}>{inner}<a class="anchor-link" href="#{hid}">¶</a></h{level}>'
    body = re.sub(r'<h([1-6])([^>]*)>(.*?)</h\1>', head, body, flags=re.S)
    # nbdev links every backticked name it indexes, private helpers too, but only public ones get a doc entry
    body = re.sub(r'<a href="[^"#]*#_\w*"[^>]*>(.*?)</a>', r'\1', body, flags=re.S)
    return re.sub(r'href="([^"]*)"',
                  lambda m: f'href="{html.escape(rewrite_link(html.unescape(m.group(1)), pages, site_url))}"', body)

# ---- math and the nbconvert exporter

def tex_to_mathml(tex, display=False):
    "LaTeX to MathML; a formula latex2mathml cannot read stays visible as code rather than breaking the page."
    from latex2mathml.converter import convert
    try: return convert(tex.strip(), display='block' if display else 'inline')
    except Exception as e:
        print(f'  warning: could not render ${tex}$ ({e})', file=sys.stderr)
        return f'<code>{html.escape(tex)}</code>'

def make_exporter():
    from jinja2 import pass_context
    from nbconvert import HTMLExporter
    from nbconvert.filters.markdown_mistune import IPythonRenderer, MarkdownWithMath

    class Renderer(IPythonRenderer):
        def block_math(self, body): return tex_to_mathml(body, display=True)
        def inline_math(self, body): return tex_to_mathml(body)

    class Exporter(HTMLExporter):
        @pass_context  # as in HTMLExporter: the cell (and its attachments) come with the template context
        def markdown2html(self, context, source):
            cell = context.get('cell', {})
            r = Renderer(escape=False, attachments=cell.get('attachments', {}),  # images: files copied beside
                         **self.lexer_options)
            return MarkdownWithMath(renderer=r).render(strip_quarto_attrs(source))

    return Exporter(template_name='basic', exclude_input_prompt=True, exclude_output_prompt=True, embed_images=True)

def prepare(nb):
    "Apply the cell options Quarto would (echo, output, include) and drop the front-matter cell."
    import nbformat
    nb = {**nb, 'cells': [dict(c) for c in nb['cells']]}
    join = lambda v: ''.join(v) if isinstance(v, list) else v  # .ipynb files store multi-line strings as lists of lines
    for c in nb['cells']:
        c['source'] = join(c['source'])
        for o in c.get('outputs', []):
            if 'text' in o: o['text'] = join(o['text'])
            if 'data' in o: o['data'] = {k: join(v) for k, v in o['data'].items()}
    cells = []
    for c in nb['cells'][1:] if front_matter(nb) else nb['cells']:
        if c['cell_type'] == 'code':
            opts, c['source'] = directives(c['source'])
            if opts.get('include') is False: continue
            if opts.get('echo') is False or not c['source'].strip():
                c.setdefault('metadata', {})['transient'] = {'remove_source': True}
            if opts.get('output') is False: c['outputs'] = []
            if not c['source'].strip() and not c.get('outputs'): continue
        cells.append(c)
    for i, c in enumerate(cells): c.setdefault('id', f'cell-{i}')  # nbformat 4.5 requires ids
    nb['cells'], nb['nbformat_minor'] = cells, max(nb.get('nbformat_minor', 5), 5)
    return nbformat.from_dict(nb)

def render_notebook(nb, pages, site_url='', exporter=None):
    "A processed notebook (dict) as an HTML fragment, and its table of contents [(id, h2 text)]."
    body, _ = (exporter or make_exporter()).from_notebook_node(prepare(nb))
    body = fix_ids_and_links(body, pages, site_url)
    toc = [(i, html.unescape(re.sub(r'<[^>]+>|¶', '', t)).strip())
           for i, t in re.findall(r'<h2 id="([^"]+)"[^>]*>(.*?)</h2>', body, re.S)]
    return body, toc

# ---- the page around the notebook

def sidebar_entries(contents):
    "Flatten sidebar.yml's contents into (section or None, notebook file name)."
    for item in contents:
        if isinstance(item, dict):
            for sub in item.get('contents', []): yield item.get('section'), sub
        else: yield None, item

CSS = """
body { margin: 0; font: 16px/1.55 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #212529; }
header { background: #2780e3; color: white; padding: .6rem 1.2rem; display: flex; gap: 1.5rem; align-items: baseline; }
header a { color: white; text-decoration: none; } header .title { font-size: 1.25rem; font-weight: 600; }
.layout { display: flex; align-items: flex-start; }
nav.sidebar { width: 250px; flex: none; padding: 1rem; position: sticky; top: 0; max-height: 100vh; \
overflow-y: auto; font-size: .92rem; }
nav.sidebar .section { font-weight: 600; margin: .9rem 0 .2rem; color: #555; }
nav.sidebar a { display: block; padding: .12rem .4rem; color: #333; text-decoration: none; border-radius: 4px; }
nav.sidebar a.active { background: #e7f1fc; color: #2780e3; font-weight: 600; }
main { flex: 1; min-width: 0; max-width: 980px; padding: 1rem 2rem 4rem; }
main h1.title { margin-bottom: .2rem; } \
p.description { font-style: italic; opacity: .75; font-size: 1.15rem; margin-top: 0; }
nav.toc { border-left: 3px solid #e7f1fc; padding-left: .8rem; margin: 1rem 0 1.5rem; font-size: .92rem; }
nav.toc a { display: block; color: #2780e3; text-decoration: none; }
a.anchor-link { margin-left: .4rem; font-size: .8em; opacity: .25; text-decoration: none; }
pre, code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: .88em; }
.jp-InputArea pre, .highlight pre { background: #f6f8fa; padding: .6rem .8rem; border-radius: 4px; overflow-x: auto; \
margin: .4rem 0; }
.jp-OutputArea-output pre { margin: .2rem 0 .6rem .8rem; padding-left: .6rem; border-left: 2px solid lightsalmon; \
overflow-x: auto; }
.jp-OutputArea-output img { max-width: 100%; height: auto; }
.jp-RenderedHTMLCommon table, main table { border-collapse: collapse; margin: .6rem 0; }
main th, main td { border-bottom: 1px solid #dee2e6; padding: .25rem .6rem; text-align: right; }
main th { border-bottom: 2px solid #adb5bd; }
math[display="block"] { margin: .8rem 0; font-size: 1.1em; }
hr { border: none; border-top: 1px solid #dee2e6; margin: 1.5rem 0; }
footer { color: #777; font-size: .85rem; padding: 1rem 2rem; border-top: 1px solid #eee; }
"""

def page(title, description, body, nav, toc, site, active):
    links, last = [], None
    for section, (fname, href, label) in nav:
        if section and section != last: links.append(f'<div class="section">{html.escape(section)}</div>')
        last = section
        cls = ' class="active"' if href == active else ''
        links.append(f'<a href="{href}"{cls}>{html.escape(label)}</a>')
    toc_html = ''.join(f'<a href="#{i}">{html.escape(t)}</a>' for i, t in toc)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)} – {html.escape(site['title'])}</title>
<meta name="description" content="{html.escape(description or '')}">
<link rel="stylesheet" href="site.css"></head>
<body><header><a class="title" href="index.html">{html.escape(site['title'])}</a>
<span>{html.escape(site.get('description', ''))}</span>
{f'<a href="{site["repo"]}">source</a>' if site.get('repo') else ''}</header>
<div class="layout"><nav class="sidebar">{''.join(links)}</nav>
<main><h1 class="title">{html.escape(title)}</h1>
{f'<p class="description">{html.escape(description)}</p>' if description else ''}
{f'<nav class="toc">{toc_html}</nav>' if len(toc) > 1 else ''}
{body}</main></div>
<footer>Built from the notebooks by tools/docs.py (nbdev processing, nbconvert, MathML).</footer></body></html>
"""

# ---- the build

def build(out=None, n_workers=2, force=False):
    from nbdev.config import get_config
    from nbdev.serve import proc_nbs
    from pygments.formatters import HtmlFormatter
    t0 = time.time()
    cfg = get_config()
    nbs, out = Path(cfg.nbs_path), Path(out or cfg.doc_path)
    sidebar = yaml.safe_load((nbs / 'sidebar.yml').read_text())['website']['sidebar']['contents']
    nbdev_yml = yaml.safe_load((nbs / 'nbdev.yml').read_text()).get('website', {})
    site = {'title': nbdev_yml.get('title', cfg.lib_name), 'description': nbdev_yml.get('description', ''),
            'repo': nbdev_yml.get('repo-url', cfg.git_url), 'url': nbdev_yml.get('site-url', '')}
    proc = Path(proc_nbs(n_workers=n_workers, force=force))
    notebooks = {p.name: json.loads(p.read_text()) for p in sorted(proc.glob('*.ipynb'))}
    meta = {name: front_matter(nb) for name, nb in notebooks.items()}
    pages = {name: m.get('output-file') or Path(name).with_suffix('.html').name for name, m in meta.items()}
    pages['index.ipynb'] = 'index.html'
    missing = [f for _, f in sidebar_entries(sidebar) if f not in notebooks]
    if missing: sys.exit(f'nbs/sidebar.yml lists notebooks that do not exist: {missing}; fix the sidebar or add them')
    nav = [(section, (f, pages[f], meta[f].get('title') or f)) for section, f in sidebar_entries(sidebar)]
    unlisted = sorted(set(notebooks) - {f for _, (f, _, _) in nav})
    nav += [('Other pages', (f, pages[f], meta[f].get('title') or f)) for f in unlisted]
    if out.exists(): shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / 'site.css').write_text(CSS + HtmlFormatter().get_style_defs('.highlight') + '\n'
                                  + (nbs / 'styles.css').read_text())
    for f in proc.rglob('*'):  # images and other files the notebooks link to
        if f.is_file() and f.suffix not in ('.ipynb', '.yml', '.css'):
            (out / f.relative_to(proc)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, out / f.relative_to(proc))
    exporter = make_exporter()
    for name, nb in notebooks.items():
        m = meta[name]
        body, toc = render_notebook(nb, pages, site['url'], exporter)
        (out / pages[name]).write_text(page(m.get('title') or name, m.get('description', ''), body, nav, toc, site,
                                            pages[name]))
    print(f"built {len(notebooks)} pages into {out} in {time.time() - t0:.0f} s "
          f"(nbdev processing + nbconvert, navigation from {nbs}/sidebar.yml)")
    return out

if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out', help="output folder (default: settings.ini's doc_path, _docs)")
    p.add_argument('--workers', type=int, default=2, help='processes for nbdev processing')
    p.add_argument('--force', action='store_true',
                   help="re-process every notebook (nbdev caches _proc/ by modification time)")
    a = p.parse_args()
    build(a.out, a.workers, a.force)
