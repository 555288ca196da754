"Download edge cases for covidcxr.fetch against a loopback HTTP server (127.0.0.1 only; no internet)."
import hashlib, os, re, threading
from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler
from pathlib import Path
import pytest
from covidcxr.fetch import download, DownloadError, archive_url, base_url, SOURCES

DATA = os.urandom(300_000)

class Handler(BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def do_GET(self):
        s = self.server; s.log.append((self.path, self.headers.get('Range')))
        if self.path != '/f.zip': return self.send_error(404)
        start = 0
        m = re.match(r'bytes=(\d+)-$', self.headers.get('Range') or '')
        if m and s.ranges:
            start = int(m.group(1))
            if start >= len(DATA): return self.send_error(416)
            self.send_response(206); self.send_header('Content-Range', f'bytes {start}-{len(DATA)-1}/{len(DATA)}')
        else: self.send_response(200)
        self.send_header('Content-Length', str(len(DATA) - start)); self.end_headers()
        body = DATA[start:]
        if s.drops: body = body[:s.drops.pop(0)]; self.close_connection = True
        s.served += len(body)  # counted before writing: the client may finish reading before this thread resumes
        self.wfile.write(body)

@pytest.fixture
def server():
    srv = ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    srv.log, srv.drops, srv.served, srv.ranges = [], [], 0, True
    t = threading.Thread(target=srv.serve_forever, daemon=True); t.start()
    yield srv, f'http://127.0.0.1:{srv.server_address[1]}/f.zip'
    srv.shutdown(); srv.server_close()

def sha(b): return hashlib.sha256(b).hexdigest()

def test_download_and_no_second_request(server, tmp_path):
    srv, url = server
    p = download(url, tmp_path/'f.zip', sha256=sha(DATA), progress=False)
    assert p.read_bytes() == DATA and len(srv.log) == 1
    download(url, tmp_path/'f.zip', sha256=sha(DATA), progress=False)
    assert len(srv.log) == 1  # finished and verified: not requested again
    assert not (tmp_path/'f.zip.part').exists()

def test_resume_within_one_call(server, tmp_path):
    srv, url = server
    srv.drops = [70_000, 50_000]
    p = download(url, tmp_path/'f.zip', retries=3, progress=False)
    assert p.read_bytes() == DATA
    assert [r for _,r in srv.log] == [None, 'bytes=70000-', 'bytes=120000-']
    assert srv.served == len(DATA)  # nothing sent twice

def test_interrupted_then_rerun(server, tmp_path):
    srv, url = server
    srv.drops = [100_000]
    with pytest.raises(DownloadError, match='run again to resume'): download(url, tmp_path/'f.zip', retries=0, progress=False)
    assert (tmp_path/'f.zip.part').stat().st_size == 100_000
    download(url, tmp_path/'f.zip', retries=0, progress=False)
    assert (tmp_path/'f.zip').read_bytes() == DATA and srv.log[-1][1] == 'bytes=100000-'

def test_server_ignoring_range_restarts(server, tmp_path):
    srv, url = server
    srv.ranges = False
    (tmp_path/'f.zip.part').write_bytes(b'x' * 1000)  # stale partial file
    download(url, tmp_path/'f.zip', progress=False)
    assert (tmp_path/'f.zip').read_bytes() == DATA

def test_complete_part_gets_416(server, tmp_path):
    srv, url = server
    (tmp_path/'f.zip.part').write_bytes(DATA)
    download(url, tmp_path/'f.zip', sha256=sha(DATA), progress=False)
    assert (tmp_path/'f.zip').read_bytes() == DATA and srv.served == 0

def test_checksum_mismatch(server, tmp_path):
    srv, url = server
    with pytest.raises(DownloadError, match='does not match'): download(url, tmp_path/'f.zip', sha256='0'*64, progress=False)
    assert not (tmp_path/'f.zip').exists() and not (tmp_path/'f.zip.part').exists()

def test_http_error_names_url(server, tmp_path):
    srv, url = server
    with pytest.raises(DownloadError, match='HTTP 404'): download(url.replace('f.zip', 'nope.zip'), tmp_path/'n.zip', progress=False)

def test_base_url_overrides(monkeypatch):
    monkeypatch.delenv('COVIDCXR_FETCH_BASE', raising=False); monkeypatch.delenv('COVIDCXR_FETCH_BASE_NIH', raising=False)
    assert base_url('nih') == 'https://github.com'
    monkeypatch.setenv('COVIDCXR_FETCH_BASE', 'http://mirror/')
    assert base_url('nih') == 'http://mirror'
    monkeypatch.setenv('COVIDCXR_FETCH_BASE_NIH', 'http://nih-mirror')
    assert base_url('nih') == 'http://nih-mirror' and base_url('ieee8023') == 'http://mirror'
    assert base_url('nih', {'nih': 'http://arg'}) == 'http://arg'
    assert archive_url('ieee8023', 'http://x').endswith(f"/ieee8023/covid-chestxray-dataset/archive/{SOURCES['ieee8023']['commit']}.zip")

ROOT = Path(__file__).resolve().parents[1]

def closed_port_url():
    "A real address where nothing listens (connections are refused at once)."
    import socket
    s = socket.socket(); s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]; s.close()
    return f'http://127.0.0.1:{port}'

def test_make_run_data_step_without_data_or_network(tmp_path):
    "`make run`'s data step on a machine with no dataset and no network: exit non-zero, say exactly what to do, write nothing."
    import subprocess, sys, shutil
    if not shutil.which('make'): pytest.skip('make is not installed')
    dead = closed_port_url()
    env = {k:v for k,v in os.environ.items() if not k.startswith(('PIP_', 'COVIDCXR_'))}
    env.update(COVIDCXR_HOME=str(tmp_path/'home'), COVIDCXR_FETCH_BASE=dead, PIP_INDEX_URL=f'{dead}/simple/',
               PIP_CONFIG_FILE=os.devnull, PIP_RETRIES='1', PIP_TIMEOUT='5', PIP_NO_CACHE_DIR='1')
    venv = Path(sys.executable).parent.parent  # the venv running these tests (make's `install` step is not rerun)
    r = subprocess.run(['make', '--no-print-directory', '-o', 'install', 'data', f'VENV={venv}', 'COVIDCXR_DATA='],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert r.returncode != 0, r.stdout + r.stderr
    assert 'No chest X-ray dataset found: fetching the public sources into' in r.stdout, r.stdout
    err = r.stderr
    assert 'covidcxr: no chest X-ray dataset, and fetching one into' in err and 'failed: pip could not download torchxrayvision==' in err, err
    assert dead.split('//')[1] in err, err  # the address that could not be reached is named
    for todo in ['connect this machine to the internet', 'make run COVIDCXR_DATA=DIR', 'COVIDCXR_FETCH_BASE=URL', 'COVIDCXR_TXV_WHEEL=',
                 'covidcxr prepare --from-folders ROOT --out DIR']:
        assert todo in err, (todo, err)
    assert 'Error 3' in err, err  # ensure_data's exit code: data not found
    assert not (tmp_path/'home'/'data'/'metadata.csv').exists()
    assert not list((tmp_path/'home').rglob('*.whl'))

def test_make_run_data_step_with_data(tmp_path):
    "With a dataset (here the shared one), the data step only says where it is, and downloads nothing."
    import subprocess, sys, shutil
    if not shutil.which('make'): pytest.skip('make is not installed')
    from covidcxr.core import data_root
    env = {k:v for k,v in os.environ.items() if not k.startswith('COVIDCXR_')}
    env.update(COVIDCXR_HOME=str(tmp_path/'home'), COVIDCXR_FETCH_BASE=closed_port_url())
    venv = Path(sys.executable).parent.parent
    r = subprocess.run(['make', '--no-print-directory', '-o', 'install', 'data', f'VENV={venv}', f'COVIDCXR_DATA={data_root()}'],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == f'data: {data_root()}', r.stdout
    assert not (tmp_path/'home').exists()
