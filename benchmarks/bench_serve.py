#!/usr/bin/env python
"""Latency of `covidcxr serve` per uploaded X-ray, with and without the Grad-CAM overlay (prints figures; not a test).

It fine-tunes nothing: an EfficientNet-Lite0 with its offline ImageNet weights and an untrained 2-class head is saved
as a model folder (the compute per upload is the same as for a trained one), served on 127.0.0.1 on a free port, and
real shared X-rays are POSTed to /predict one at a time, as the page does. For each setting it prints the median and
90th-percentile seconds per upload (the first upload is a warm-up and not counted) and the peak memory of the process.

Usage (from the repository root):
    COVIDCXR_DATA=/path/to/cxr .venv/bin/python benchmarks/bench_serve.py            # 224 px, 20 uploads per setting
    COVIDCXR_DATA=/path/to/cxr .venv/bin/python benchmarks/bench_serve.py --size 128 --n 10
"""
import argparse, json, os, resource, tempfile, time, urllib.request, urllib.parse
from pathlib import Path
import numpy as np

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--size', type=int, default=224, help='model input size (default: 224)')
    ap.add_argument('--n', type=int, default=20, help='uploads per setting (default: 20)')
    a = ap.parse_args()
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
