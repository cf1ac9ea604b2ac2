"""Browser test of the built docs site: headless Chromium opens every page and follows every internal link.

    python tools/docs.py && python tools/check_docs.py [--site _docs] [--shots _docs/_screenshots]

The site is served over HTTP on localhost (as a reader would get it, so a missing page is a 404, not a folder
listing). From `index.html`, each page is loaded in Chromium (`--dump-dom`: the DOM after the browser has parsed
and laid out the page) and fails if it is missing, renders blank (less than `--min-text` characters of visible
text in its <main>), or shows unrendered math; each internal link must reach an existing page and, with a
`#fragment`, an element with that id. Every HTML file of the site is opened too, linked or not. Screenshots of
the index (its first screen) and of the whole attention-map page (viz.html) are saved and must not be blank.
Exit status 1 on any problem.
Chromium: Debian's `chromium` (apt-get install chromium), run headless with the flags in `FLAGS` below.
"""
import argparse, shutil, subprocess, sys, tempfile, threading, time
from functools import partial
from html.parser import HTMLParser
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking',
         '--disable-component-update', '--disable-sync', '--hide-scrollbars']

def find_chromium():
    for name in ('chromium', 'chromium-browser', 'google-chrome', 'chrome'):
        if path := shutil.which(name): return path

class Page(HTMLParser):
    "What the check needs from a DOM: links, ids, the visible text of <main>, math elements."
    def __init__(self):
        super().__init__(); self.links, self.ids, self.main_text, self.n_math, self.n_img = [], set(), [], 0, 0
        self._skip, self._main, self.has_main = 0, 0, False
    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if 'id' in a: self.ids.add(a['id'])
        if tag == 'a' and a.get('href'): self.links.append(a['href'])
        if tag in ('script', 'style'): self._skip += 1
        if tag == 'main': self._main += 1; self.has_main = True
        if tag == 'math': self.n_math += 1
        if tag == 'img':
            self.n_img += 1
            if not a.get('src', '').startswith('data:'):
                self.links.append(a.get('src', ''))  # an image file must exist too
    def handle_endtag(self, tag):
        if tag in ('script', 'style'): self._skip -= 1
        if tag == 'main': self._main -= 1
    def handle_data(self, data):
        if self._main and not self._skip: self.main_text.append(data)
    @property
    def text(self): return ' '.join(' '.join(self.main_text).split())

def chromium(browser, *args, timeout=60):
    with tempfile.TemporaryDirectory() as profile:
        r = subprocess.run([browser, *FLAGS, f'--user-data-dir={profile}', *args], capture_output=True, text=True,
                           timeout=timeout)
    return r.stdout

def serve(site):
    "An HTTP server for `site` on a free localhost port, in a thread; returns (server, base url)."
    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *a): pass
    class Server(ThreadingHTTPServer):
        # the browser closing a connection early is not a site error
        def handle_error(self, request, client_address): pass
    srv = Server(('127.0.0.1', 0), partial(Quiet, directory=str(site)))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f'http://127.0.0.1:{srv.server_address[1]}/'

def check(site, shots=None, browser=None, min_text=200, shot_pages=(('index.html', False), ('viz.html', True))):
    "Open every page of `site` in Chromium; returns (pages checked, links checked, problems)."
    site, browser = Path(site), browser or find_chromium()
    if browser is None: sys.exit('no Chromium found: install it (apt-get install -y chromium) or pass --chromium PATH')
    if not (site / 'index.html').exists():
        sys.exit(f'{site}/index.html not found: build the site first with `python tools/docs.py`')
    srv, base = serve(site)
    try:
        pages, problems, n_links = {}, [], 0
        todo = ['index.html'] + sorted(str(p.relative_to(site)) for p in site.rglob('*.html') if p.name != 'index.html')
        links = []  # (from page, href, resolved page, fragment)
        while todo:
            name = todo.pop(0)
            if name in pages: continue
            if not (site / name).is_file(): pages[name] = None; continue
            p = Page(); p.feed(chromium(browser, '--dump-dom', base + name)); pages[name] = p
            if not p.has_main or len(p.text) < min_text:
                problems.append(f'{name}: renders blank ({len(p.text)} characters of text in <main>)')
            if '$$' in p.text: problems.append(f'{name}: unrendered display math ($$ in the page text)')
            for href in p.links:
                url = urljoin(base + name, href)
                parts = urlsplit(url)
                if not url.startswith(base) or parts.scheme not in ('http', 'https'): continue  # external: not ours to check
                target = unquote(parts.path[len(urlsplit(base).path):]) or 'index.html'
                links.append((name, href, target, parts.fragment))
                if target.endswith('.html') and target not in pages: todo.append(target)
        for src, href, target, frag in links:
            n_links += 1
            page = pages.get(target)
            if target.endswith('.html'):
                if page is None: problems.append(f'{src}: broken link {href} (no page {target})')
                elif frag and frag not in page.ids:
                    problems.append(f'{src}: broken link {href} (no id "{frag}" in {target})')
            elif not (site / target).is_file(): problems.append(f'{src}: broken link {href} (no file {target})')
        if shots:
            shots = Path(shots); shots.mkdir(parents=True, exist_ok=True)
            for name, full in shot_pages:  # (page, whole page?) the whole page is cut below its last non-white row
                if pages.get(name) is None: problems.append(f'screenshot: no page {name}'); continue
                png = shots / (Path(name).stem + '.png')
                chromium(browser, f'--screenshot={png.resolve()}', f'--window-size=1280,{16000 if full else 1600}',
                         base + name)
                if not png.exists(): problems.append(f'screenshot of {name} was not written'); continue
                if full: trim_bottom(png)
                if blank_image(png): problems.append(f'screenshot of {name} is blank')
        return pages, n_links, problems
    finally: srv.shutdown()

def trim_bottom(png, margin=40):
    "Cut a whole-page screenshot (taken in a window taller than the page) below its last non-white row."
    import numpy as np, matplotlib.image as mpimg
    img = mpimg.imread(png)
    rows = np.where((img[..., :3] < 0.98).any(axis=(1, 2)))[0]
    if len(rows): mpimg.imsave(png, img[:min(len(img), rows[-1] + 1 + margin)])

def blank_image(png):
    "A screenshot is blank when (almost) every pixel has the same colour."
    import numpy as np, matplotlib.image as mpimg
    img = mpimg.imread(png)[..., :3].reshape(-1, 3)
    return (np.abs(img - np.median(img, 0)).max(1) > 0.05).mean() < 0.001  # 0.1%: a few lines of text pass

if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--site', default='_docs'); p.add_argument('--shots', default='_docs/_screenshots')
    p.add_argument('--chromium', help='the browser (default: chromium on PATH)')
    p.add_argument('--min-text', type=int, default=200, help='fewest characters of text a page must show')
    a = p.parse_args()
    t0 = time.time()
    pages, n_links, problems = check(a.site, a.shots, a.chromium, a.min_text)
    ok = [n for n, pg in pages.items() if pg is not None]
    print(f'{len(ok)} pages opened in Chromium, {n_links} internal links followed, {len(problems)} problems, '
          f'{time.time() - t0:.0f} s; screenshots in {a.shots}')
    for n in ok: print(f'  {n:28s} {len(pages[n].text):6d} chars  {pages[n].n_img:3d} images  '
                       f'{pages[n].n_math:3d} formulas  {len(pages[n].links):4d} links')
    for pr in problems: print('PROBLEM', pr)
    sys.exit(1 if problems else 0)
