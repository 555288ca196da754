#!/usr/bin/env python
"""Latency of `covidcxr serve` per uploaded X-ray, with and without the Grad-CAM overlay; or, with --load, under concurrent and stalled clients (prints figures; not a test).

It fine-tunes nothing: an EfficientNet-Lite0 with its offline ImageNet weights and an untrained 2-class head is saved
as a model folder (the compute per upload is the same as for a trained one), served on 127.0.0.1 on a free port, and
real shared X-rays are POSTed to /predict one at a time, as the page does. For each setting it prints the median and
90th-percentile seconds per upload (the first upload is a warm-up and not counted) and the peak memory of the process.

--load serves the model from a separate `serve()` process (so its memory is the server's own), sends
--clients x --requests predictions (20 x 10) from concurrent clients and prints failures, p50/p95 latency and the
server's resident memory before and after; then opens --stalled (40) connections that stall (half send nothing, half
half a body) and prints how soon the server released them, against its --timeout (2 s), and how long a real
prediction sent meanwhile took. Everything goes to 127.0.0.1; every count and wait is bounded.

Usage (from the repository root):
    COVIDCXR_DATA=/path/to/cxr .venv/bin/python benchmarks/bench_serve.py            # 224 px, 20 uploads per setting
    COVIDCXR_DATA=/path/to/cxr .venv/bin/python benchmarks/bench_serve.py --size 128 --n 10
    COVIDCXR_DATA=/path/to/cxr .venv/bin/python benchmarks/bench_serve.py --load     # 200 predictions from 20 clients, 40 stalled
    COVIDCXR_DATA=/path/to/cxr .venv/bin/python benchmarks/bench_serve.py --load --clients 2 --requests 2 --stalled 0 --big 8   # 8 huge uploads at once
"""
import argparse, json, os, resource, shutil, signal, socket, subprocess, sys, tempfile, time, urllib.request, urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
import numpy as np

SERVER = ("import sys; from covidcxr.serve import serve; "
          "serve(sys.argv[1], port=0, cam=sys.argv[2] == '1', timeout=float(sys.argv[3]), workers=int(sys.argv[4]))")

def _rss_mib(pid:int)->dict:
    "Resident (VmRSS) and peak resident (VmHWM) memory of a process, MiB."
    st = dict(l.split(':', 1) for l in Path(f'/proc/{pid}/status').read_text().splitlines() if ':' in l)
    return {k: int(st[k].split()[0]) / 1024 for k in ('VmRSS', 'VmHWM')}

def _post(url:str, f:Path, timeout:float=120.)->float:
    "Seconds for one prediction; raises unless it is a 200 with probabilities."
    req = urllib.request.Request(url + 'predict?name=' + urllib.parse.quote(f.name), data=f.read_bytes(), method='POST')
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=timeout) as r: j = json.loads(r.read())
    assert r.status == 200 and 'probabilities' in j, j
    return time.perf_counter() - t0

def stalled_test(url:str, pid:int, files:list, a):
    "Stalled connections against the running server; prints how soon they were released."
    host, port = urllib.parse.urlsplit(url).netloc.split(':')
    t0, socks = time.monotonic(), []
    for i in range(a.stalled):
        s = socket.create_connection((host, int(port)), timeout=a.timeout * 5 + 30)
        if i % 2: s.sendall(b'POST /predict?name=h.png HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100000\r\n\r\n' + b'x' * 50000)
        socks.append(s)
    with ThreadPoolExecutor(1) as ex:
        during = ex.submit(_post, url, files[1])
        released, answered = [], 0
        for s in socks:
            got = b''
            try:
                while chunk := s.recv(65536): got += chunk
            except OSError: pass
            released.append(time.monotonic() - t0); answered += got.startswith(b'HTTP/1.0 408')
            s.close()
        try: t_during = f'{during.result():.2f} s'
        except Exception as e: t_during = f'failed ({type(e).__name__}: {e})'
    r = np.array(released)
    print(f"stalled: {a.stalled} clients ({a.stalled // 2} silent, {a.stalled - a.stalled // 2} with half a body), server timeout {a.timeout:g} s: "
          f"released after {r.min():.2f}-{r.max():.2f} s (median {np.median(r):.2f} s), {answered} half bodies answered 408")
    print(f"  a real prediction sent while they stalled took {t_during}; one after: {_post(url, files[2]):.2f} s")
    print(f"  server memory after: RSS {_rss_mib(pid)['VmRSS']:.0f} MiB")

def big_test(url:str, pid:int, tmp:Path, n:int, side:int=9400):
    "`n` concurrent uploads of a synthetic `side` x `side` 16-bit PNG; prints the answers and the server's peak memory."
    from PIL import Image
    arr = (np.add.outer(np.arange(side, dtype=np.uint32), np.arange(side, dtype=np.uint32)) * 4095 // (2 * side)).astype(np.uint16) * 16
    f = tmp/'big16.png'; Image.fromarray(arr).save(f); del arr
    before = _rss_mib(pid)
    def one(i):
        req = urllib.request.Request(url + f'predict?name=big{i}.png', data=f.read_bytes(), method='POST')
        t0 = time.perf_counter()
        try:
            with urllib.request.urlopen(req, timeout=300) as r: j = json.loads(r.read()); return r.status, j.get('classified'), time.perf_counter() - t0
        except urllib.error.HTTPError as e: return e.code, None, time.perf_counter() - t0
    t0 = time.perf_counter()
    with ThreadPoolExecutor(n) as ex: res = list(ex.map(one, range(n)))
    after = _rss_mib(pid)
    print(f"big uploads: {n} concurrent {side}x{side} 16-bit PNGs ({f.stat().st_size / 1e6:.1f} MB each): statuses {sorted(r[0] for r in res)}, "
          f"{time.perf_counter() - t0:.1f} s wall; server RSS {before['VmRSS']:.0f} MiB before, peak {after['VmHWM']:.0f} MiB")

def load_test(mdir:Path, files:list, a):
    "Concurrent predictions, then stalled clients, against a `serve()` subprocess; prints the figures."
    log = Path(mdir).parent/'server.log'
    p = subprocess.Popen([sys.executable, '-c', SERVER, str(mdir), '1' if a.cam else '0', str(a.timeout), str(a.workers)],
                         stdout=subprocess.PIPE, stderr=log.open('wb'), stdin=subprocess.DEVNULL, text=True)
    try:
        line = p.stdout.readline()
        if ' at http://127.0.0.1:' not in line: raise SystemExit(f'the server did not start: {line!r}\n{log.read_text()[-2000:]}')
        url = line.split(' at ')[1].split()[0]
        _post(url, files[0])  # warm-up
        before = _rss_mib(p.pid)
        n = a.clients * a.requests
        def client(i):
            out = []
            for k in range(a.requests):
                try: out.append(_post(url, files[(i * a.requests + k) % len(files)]))
                except Exception as e: out.append(f'{type(e).__name__}: {e}')
            return out
        t0 = time.perf_counter()
        with ThreadPoolExecutor(a.clients) as ex: res = [r for rs in ex.map(client, range(a.clients)) for r in rs]
        wall = time.perf_counter() - t0
        after = _rss_mib(p.pid)
        lat = np.array([r for r in res if isinstance(r, float)])
        fails = [r for r in res if not isinstance(r, float)]
        print(f"load: {n} predictions from {a.clients} concurrent clients x {a.requests} ({a.size} px, Grad-CAM {'on' if a.cam else 'off'}, "
              f"{a.workers} server workers): {len(fails)} failures, {wall:.1f} s wall, {n / wall:.1f} predictions/s")
        if len(lat): print(f"  latency per prediction: p50 {np.median(lat):.2f} s, p95 {np.quantile(lat, 0.95):.2f} s, max {lat.max():.2f} s")
        for f in fails[:5]: print('  failure:', f[:200])
        print(f"  server memory: RSS {before['VmRSS']:.0f} MiB before (after one warm-up), {after['VmRSS']:.0f} MiB after, "
              f"peak {after['VmHWM']:.0f} MiB")
        if a.stalled: stalled_test(url, p.pid, files, a)
        if a.big: big_test(url, p.pid, Path(mdir).parent, a.big)
        t0 = time.monotonic(); p.send_signal(signal.SIGTERM); p.wait(60)
        print(f"SIGTERM: exit code {p.returncode} after {time.monotonic() - t0:.2f} s")
    finally:
        if p.poll() is None: p.kill(); p.wait(30)

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--size', type=int, default=224, help='model input size (default: 224)')
    ap.add_argument('--n', type=int, default=20, help='uploads per setting (default: 20)')
    ap.add_argument('--load', action='store_true', help='concurrent and stalled clients instead of one upload at a time')
    ap.add_argument('--clients', type=int, default=20, help='--load: concurrent clients (default: 20)')
    ap.add_argument('--requests', type=int, default=10, help='--load: predictions per client (default: 10)')
    ap.add_argument('--stalled', type=int, default=40, help='--load: stalled clients (default: 40)')
    ap.add_argument('--timeout', type=float, default=2., help="--load: the server's request timeout, s (default: 2)")
    ap.add_argument('--big', type=int, default=0, help='--load: then this many concurrent uploads of a 9400x9400 16-bit PNG (peak memory)')
    ap.add_argument('--workers', type=int, default=16, help="--load: the server's worker threads (default: 16)")
    ap.add_argument('--no-cam', dest='cam', action='store_false', help='--load: no Grad-CAM (default: on, as `covidcxr serve`)')
    a = ap.parse_args()
    if a.load and not (0 < a.clients <= 64 and 0 < a.requests <= 50 and 0 <= a.stalled <= 200 and 0 < a.timeout <= 30):
        ap.error('--load is kept small: at most 64 clients x 50 requests, 200 stalled, a timeout of 30 s')
    os.environ.setdefault('COVIDCXR_OFFLINE', '1')
    import torch
    from covidcxr.data import load_dataset, patient_split, cxr_dls
    from covidcxr.learner import build_learner, save_model
    from covidcxr.serve import serve
    df = load_dataset()
    small = patient_split(df.groupby('label').head(8)[lambda d: d.label.isin(['covid', 'pneumonia'])], pcts=(0.5, 0.5, 0.), seed=0)
    learn = build_learner(cxr_dls(small, size=a.size, bs=8), 'efficientnet_lite0')
    mdir = save_model(learn, Path(tempfile.mkdtemp(prefix='covidcxr-bench-'))/'model', size=a.size)
    files = [Path(p) for p in df.path.sample(a.n + 1, random_state=0)]
    if a.load:
        print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
        try: return load_test(mdir, files, a)
        finally: shutil.rmtree(mdir.parent, ignore_errors=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {a.size} px, {a.n} uploads per setting "
          f"(mean file size {np.mean([f.stat().st_size for f in files]) / 1e3:.0f} kB)")
    for cam in (False, True):
        srv = serve(mdir, port=0, cam=cam, block=False, verbose=False)
        times = []
        for f in files:
            req = urllib.request.Request(srv.url + 'predict?name=' + urllib.parse.quote(f.name), data=f.read_bytes(), method='POST')
            t0 = time.perf_counter()
            with urllib.request.urlopen(req) as r: json.loads(r.read())
            times.append(time.perf_counter() - t0)
        srv.shutdown(); srv.server_close()
        t = np.array(times[1:])
        print(f"  Grad-CAM {'on ' if cam else 'off'}: median {np.median(t):.3f} s, p90 {np.quantile(t, 0.9):.3f} s per upload "
              f"({1 / np.median(t):.1f} uploads/s)")
    print(f"peak memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")

if __name__ == '__main__': main()
