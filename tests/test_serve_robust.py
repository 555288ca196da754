"""`covidcxr serve` under misbehaving and concurrent clients, on 127.0.0.1 only, with bounded request counts and deadlines.

The quick single-request cases (bad Content-Length, wrong Host, one stalled client, NaN) are tested in nbs/14_serve.ipynb;
these are the ones that need many connections or a real `covidcxr serve` process: 20 concurrent clients x 10 real
X-rays, 40 stalled clients released within the timeout, and a SIGTERM mid-request that leaves no upload on disk.
"""
import json, os, signal, socket, subprocess, sys, threading, time, urllib.parse, urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
import pytest

def _post(url, path:Path, timeout=120):
    req = urllib.request.Request(url + 'predict?name=' + urllib.parse.quote(path.name), data=path.read_bytes(), method='POST')
    with urllib.request.urlopen(req, timeout=timeout) as r: return r.status, json.loads(r.read(), parse_constant=lambda c: 1 / 0)

@pytest.fixture(scope='module')
def xrays(shared):
    "Two real shared X-rays of different classes."
    return [Path(shared[shared.label == l].path.iloc[0]) for l in ('covid', 'pneumonia')]

@pytest.fixture(scope='module')
def reference(model_dir, xrays):
    from covidcxr.serve import CXRPredictor
    p = CXRPredictor(model_dir)
    return {f.name: p.predict_file(f)['probabilities'] for f in xrays}

def test_concurrent_clients(model_dir, xrays, reference):
    "20 clients at once, 10 real X-rays each (alternating two files): no failure, and every answer is its own file's."
    from covidcxr.serve import serve
    srv = serve(model_dir, port=0, block=False, verbose=False)
    try:
        def client(i):
            out = []
            for k in range(10):
                f = xrays[(i + k) % 2]
                try:
                    code, j = _post(srv.url, f)
                    ok = code == 200 and j['file'] == f.name and all(abs(j['probabilities'][c] - v) < 1e-5 for c, v in reference[f.name].items())
                    out.append(None if ok else f'{code} {str(j)[:200]}')
                except Exception as e: out.append(f'{type(e).__name__}: {e}')
            return out
        t0 = time.monotonic()
        with ThreadPoolExecutor(20) as ex: results = [r for rs in ex.map(client, range(20)) for r in rs]
        took = time.monotonic() - t0
    finally: srv.shutdown(); srv.server_close()
    fails = [r for r in results if r is not None]
    assert len(results) == 200 and not fails, f'{len(fails)} of 200 failed in {took:.0f} s: {fails[:5]}'

def test_stalled_clients_released(model_dir, xrays):
    "40 stalled clients (20 silent, 20 with half a body) are all released within the timeout, and the server then answers."
    from covidcxr.serve import serve
    timeout = 2.
    srv = serve(model_dir, port=0, block=False, verbose=False, timeout=timeout)
    socks = []
    try:
        t0 = time.monotonic()
        for i in range(40):
            s = socket.create_connection(srv.server_address[:2], timeout=30)
            if i % 2: s.sendall(b'POST /predict?name=h.png HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000\r\n\r\n' + b'x' * 500)
            socks.append(s)
        released, answers = [], []
        for s in socks:  # each read returns when the server closes that connection
            got = b''
            while chunk := s.recv(65536): got += chunk
            released.append(time.monotonic() - t0); answers.append(got)
        code, j = _post(srv.url, xrays[0])
    finally:
        for s in socks: s.close()
        srv.shutdown(); srv.server_close()
    assert max(released) < timeout + 3, f'released after {min(released):.1f}-{max(released):.1f} s with a {timeout} s timeout'
    assert all(a == b'' for a in answers[0::2]), answers[0::2]  # silent: closed without an answer
    for a in answers[1::2]:  # half a body: 408, in JSON
        assert a.startswith(b'HTTP/1.0 408 '), a[:200]
        assert json.loads(a.partition(b'\r\n\r\n')[2])['error'].startswith('h.png: the upload did not arrive within 2 s'), a
    assert code == 200 and j['file'] == xrays[0].name

def _start(model_dir, tmp:Path, in_memory:bool):
    "`covidcxr serve --port 0` in a subprocess with TMPDIR=`tmp` (its uploads in memory or in temporary folders); (process, url)."
    code = ("import sys; import covidcxr.serve as s; s.IN_MEMORY_UPLOADS = %r; "
            "from covidcxr.cli import main; sys.exit(main(sys.argv[1:]))" % in_memory)
    env = dict(os.environ, TMPDIR=str(tmp), OMP_NUM_THREADS='1')
    p = subprocess.Popen([sys.executable, '-c', code, 'serve', '--model', str(model_dir), '--port', '0'], env=env,
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = p.stdout.readline()  # the first line says where it listens (or the process ended: '')
    if not (line.startswith('serving ') and ' at http://127.0.0.1:' in line):
        p.kill(); raise AssertionError(f'no "serving" line: {line!r}\n{p.communicate(timeout=30)[1][-3000:]}')
    return p, line.split(' at ')[1].split()[0]

@pytest.mark.parametrize('in_memory', [True, False], ids=['memfd', 'tempdir'])
def test_sigterm_mid_request_leaves_no_upload(model_dir, xrays, tmp_path, in_memory):
    "SIGTERM while uploads are being decoded: the server exits 0 within seconds, and no covidcxr-upload-* folder is left."
    from PIL import Image
    tmp = tmp_path/'tmp'; tmp.mkdir()
    big = tmp_path/'big.png'  # a real X-ray at 5000 x 5000 px: slow enough to decode that a request is caught in the middle
    Image.open(xrays[0]).convert('L').resize((5000, 5000)).save(big)
    p, url = _start(model_dir, tmp, in_memory)
    stop, done, errors, seen = threading.Event(), [], [], set()
    def client(f):
        for _ in range(40):  # bounded
            if stop.is_set(): return
            try: done.append(_post(url, f, timeout=60)[0])
            except Exception as e: errors.append(type(e).__name__); return
    threads = [threading.Thread(target=client, args=(f,)) for f in (big, big, xrays[0])]
    half = None
    try:
        card = urllib.request.urlopen(url + 'model', timeout=60).read().decode()
        assert json.loads(card)['model'] == model_dir.parent.name  # the run's name ...
        for path in {str(model_dir), str(model_dir.resolve()), str(model_dir.parent.resolve())}: assert path not in card  # ... never its path
        host, port = urllib.parse.urlsplit(url).netloc.split(':')
        half = socket.create_connection((host, int(port)), timeout=30)  # and a request stalled mid-body at SIGTERM
        half.sendall(b'POST /predict?name=h.png HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100000\r\n\r\n' + b'x' * 1000)
        for t in threads: t.start()
        t_end = time.monotonic() + 120
        while time.monotonic() < t_end and p.poll() is None and not errors:
            now = {x.name for x in tmp.glob('covidcxr-upload-*')}; seen |= now
            if len(done) >= 3 and (now or in_memory): break  # on disk: SIGTERM while an upload's folder exists
            time.sleep(0.002)
        assert len(done) >= 3 and (seen or in_memory), (done, errors, seen)
        p.send_signal(signal.SIGTERM); t0 = time.monotonic()
        out, err = p.communicate(timeout=60)
        took = time.monotonic() - t0
    finally:
        stop.set()
        if p.poll() is None: p.kill(); p.wait(30)
        for t in threads:
            if t.is_alive(): t.join(120)
        if half is not None: half.close()
    assert p.returncode == 0 and 'stopped (SIGTERM)' in out, (p.returncode, out, err[-3000:])
    assert took < 20, f'took {took:.1f} s to stop'
    assert set(done) == {200}, done  # the requests in progress were finished, not cut off
    assert not list(tmp.glob('covidcxr-upload-*')), list(tmp.iterdir())
    if in_memory: assert not seen, seen  # nothing was ever written
