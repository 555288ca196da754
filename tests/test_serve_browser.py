"""The upload page in a real headless Chromium, driven through the Chrome DevTools Protocol by a small Node script.

The notebook tests `POST /predict` over HTTP; this checks what a user sees: the page's own JavaScript sends the file picked
in `<input type=file>`, and shows the prediction (class, percentages, Grad-CAM picture) or the server's error.
Skipped when chromium or a Node with a global WebSocket (>= 22, or 20/21 with --experimental-websocket) is not installed.
"""
import json, os, shutil, signal, subprocess, time
from pathlib import Path
import pandas as pd, pytest

CHROMES = ('chromium', 'chromium-browser', 'google-chrome', 'google-chrome-stable')

def _chrome():
    return next((p for p in map(shutil.which, CHROMES) if p), None)

def _node_cmd():
    "The command that runs Node with a global WebSocket, or the reason there is none."
    node = shutil.which('node')
    if not node: return None, 'node is not on PATH'
    try: v = subprocess.run([node, '--version'], capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e: return None, f'node does not run: {e}'
    try: major = int(v.lstrip('v').split('.')[0])
    except ValueError: return None, f'cannot read the node version from {v!r}'
    if major < 20: return None, f'node {v} is too old (needs >= 20)'
    cmd = [node] if major >= 22 else [node, '--experimental-websocket']
    r = subprocess.run(cmd + ['-e', "process.exit(typeof WebSocket === 'function' ? 0 : 1)"], capture_output=True, text=True, timeout=30)
    if r.returncode: return None, f'node {v} has no global WebSocket with {cmd[1:]} ({r.stderr.strip()[:200]})'
    return cmd, None

@pytest.fixture(scope='module')
def tools():
    chrome = _chrome()
    if not chrome: pytest.skip(f"no headless browser: none of {', '.join(CHROMES)} is on PATH")
    node, why = _node_cmd()
    if not node: pytest.skip(why)
    return chrome, node

# Connects to an already running Chromium (argv[2]: its DevTools port), and for each upload in the JSON list argv[3]
# ({path, name}) opens the page argv[4] afresh, puts the file in <input id=file> as a user's pick would, and waits for
# the answer. Prints one JSON list of what the page shows. Every wait has a deadline, so it cannot hang.
CDP_JS = r"""
import fs from 'node:fs';
const [port, uploads, url] = [process.argv[2], JSON.parse(process.argv[3]), process.argv[4]];
const sleep = ms => new Promise(r => setTimeout(r, ms));
const deadline = (what, ms) => { const t = Date.now() + ms; return () => { if (Date.now() > t) throw new Error(`timeout after ${ms} ms: ${what}`); }; };

async function pageTarget() {
  const check = deadline('a page target at /json', 30000);
  for (;;) {
    try {
      const tabs = await (await fetch(`http://127.0.0.1:${port}/json`, {signal: AbortSignal.timeout(5000)})).json();
      const t = tabs.find(t => t.type === 'page' && t.webSocketDebuggerUrl);
      if (t) return t;
    } catch (e) {}
    check(); await sleep(200);
  }
}

const target = await pageTarget();
const ws = new WebSocket(target.webSocketDebuggerUrl);
await new Promise((ok, fail) => { ws.onopen = ok; ws.onerror = () => fail(new Error('cannot connect to ' + target.webSocketDebuggerUrl));
                                  setTimeout(() => fail(new Error('timeout connecting to the page')), 10000); });
let id = 0; const pending = new Map(), exceptions = [];
ws.onmessage = m => {
  const d = JSON.parse(m.data);
  if (d.id && pending.has(d.id)) { pending.get(d.id)(d); pending.delete(d.id); }
  else if (d.method === 'Runtime.exceptionThrown') exceptions.push(d.params.exceptionDetails.exception?.description || d.params.exceptionDetails.text);
};
ws.onclose = () => { for (const r of pending.values()) r({error: {message: 'DevTools connection closed'}}); pending.clear(); };
const send = (method, params = {}, ms = 30000) => new Promise((ok, fail) => {
  const i = ++id; const t = setTimeout(() => { pending.delete(i); fail(new Error(`timeout after ${ms} ms: ${method}`)); }, ms);
  pending.set(i, d => { clearTimeout(t); d.error ? fail(new Error(`${method}: ${d.error.message}`)) : ok(d.result); });
  ws.send(JSON.stringify({id: i, method, params}));
});
const evaluate = async (expression, ms) => {
  const r = await send('Runtime.evaluate', {expression, awaitPromise: true, returnByValue: true}, ms);
  if (r.exceptionDetails) throw new Error('in the page: ' + (r.exceptionDetails.exception?.description || r.exceptionDetails.text));
  return r.result.value;
};

await send('Page.enable'); await send('Runtime.enable');
const results = [];
for (const up of uploads) {
  await evaluate('window.__stale = true');  // so the old document is not mistaken for the new one
  const nav = await send('Page.navigate', {url});
  if (nav.errorText) throw new Error(`cannot open ${url}: ${nav.errorText}`);
  const loaded = deadline('the page to load', 30000);
  const fresh = () => evaluate("!window.__stale && document.readyState === 'complete' && !!document.getElementById('file')", 5000).catch(() => false);
  while (!(await fresh())) { loaded(); await sleep(100); }  // (evaluating while the document changes may fail: try again)
  const b64 = fs.readFileSync(up.path).toString('base64');
  await evaluate(`(() => {
    const bin = atob('${b64}'), u = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) u[i] = bin.charCodeAt(i);
    const dt = new DataTransfer(); dt.items.add(new File([u], ${JSON.stringify(up.name)}));
    const input = document.getElementById('file'); input.files = dt.files;
    input.dispatchEvent(new Event('change'));
  })()`);
  // done: an answer with its Grad-CAM picture decoded (or none sent), or an error shown
  const state = `(() => {
    const out = document.getElementById('out'), err = document.getElementById('err'), img = out.querySelector('img');
    const h3 = out.querySelector('h3');
    return {done: !!(err.textContent || (h3 && (!img || (img.complete && img.naturalWidth > 0)))),
            out: out.innerText, err: err.textContent, h3: h3 ? h3.textContent : null,
            rows: [...out.querySelectorAll('table tr')].map(r => [...r.cells].map(c => c.textContent)),
            img_width: img ? img.naturalWidth : null, img_height: img ? img.naturalHeight : null};
  })()`;
  const answered = deadline(`an answer for ${up.name}`, 60000);
  let s;
  for (;;) { s = await evaluate(state); if (s.done) break; answered(); await sleep(200); }
  delete s.done; results.push({name: up.name, ...s});
}
ws.close();
console.log(JSON.stringify({results, exceptions}));
process.exit(0);
"""

def _start_chrome(chrome, profile:Path, log:Path):
    "Headless Chromium in its own process group, DevTools on a port it picks; returns (process, port)."
    profile.mkdir()
    p = subprocess.Popen([chrome, '--headless=new', '--no-sandbox', '--disable-gpu', '--remote-debugging-port=0',
                          f'--user-data-dir={profile}', '--no-first-run', '--no-default-browser-check', '--disable-extensions',
                          '--disable-background-networking', '--disable-component-update', '--window-size=1000,1400', 'about:blank'],
                         stdin=subprocess.DEVNULL, stdout=log.open('wb'), stderr=subprocess.STDOUT, start_new_session=True)
    port_file, t = profile/'DevToolsActivePort', time.monotonic() + 30
    while time.monotonic() < t:  # Chromium writes the port it listens on here (race-free, unlike guessing a free port)
        if p.poll() is not None: break
        words = port_file.read_text().split() if port_file.is_file() else []
        if len(words) >= 2: return p, int(words[0])  # "PORT\n/devtools/browser/ID", complete
        time.sleep(0.1)
    _stop(p)
    raise AssertionError(f'{chrome} gave no DevTools port within 30 s (exit code {p.returncode}):\n{log.read_text(errors="replace")[-2000:]}')

def _stop(p):
    "End the Chromium we started and its helper processes (its process group)."
    if p.poll() is None:
        try: os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError: pass
        try: p.wait(10)
        except subprocess.TimeoutExpired: os.killpg(p.pid, signal.SIGKILL); p.wait(10)
    try: os.killpg(p.pid, signal.SIGKILL)  # helpers that outlived the browser process
    except (ProcessLookupError, PermissionError): pass

def test_upload_page_in_chromium(tools, shared, model_dir, tmp_path):
    "Pick a real X-ray on the page: it shows the same class and percentages as `CXRPredictor.predict_file`, and the Grad-CAM; a bad file's error is shown."
    from covidcxr.serve import serve, CXRPredictor
    chrome, node = tools
    xray = Path(shared.path.iloc[0])
    want = CXRPredictor(model_dir).predict_file(xray)
    (tmp_path/'notes.png').write_text('meeting notes, not an X-ray\n')
    uploads = [dict(path=str(xray), name=xray.name), dict(path=str(tmp_path/'notes.png'), name='notes.png'),
               dict(path=str(tmp_path/'notes.png'), name='report.pdf')]
    (tmp_path/'cdp.mjs').write_text(CDP_JS)
    srv = serve(model_dir, port=0, block=False, verbose=False)
    browser = None
    try:
        browser, port = _start_chrome(chrome, tmp_path/'profile', tmp_path/'chrome.log')
        r = subprocess.run(node + [str(tmp_path/'cdp.mjs'), str(port), json.dumps(uploads), srv.url],
                           capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, f'node failed ({r.returncode}):\n{r.stderr[-3000:]}\n{r.stdout[-1000:]}'
    finally:
        if browser is not None: _stop(browser)
        srv.shutdown(); srv.server_close()
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got['exceptions'] == [], got['exceptions']
    ok, bad, pdf = got['results']
    assert ok['err'] == '' and ok['h3'] == f"{xray.name}: {want['predicted']}", ok
    assert ok['rows'] == [[c, '', f'{100*p:.1f}%'] for c, p in want['probabilities'].items()], (ok['rows'], want['probabilities'])
    assert (ok['img_width'], ok['img_height']) == (64, 64), ok  # the Grad-CAM PNG decoded in the browser, at the model's size
    assert bad['h3'] is None and bad['out'] == '' and bad['err'].startswith('notes.png: ') and len(bad['err']) > len('notes.png: '), bad
    assert pdf['h3'] is None and pdf['err'].startswith("report.pdf: unsupported file type '.pdf'"), pdf
