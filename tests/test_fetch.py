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
