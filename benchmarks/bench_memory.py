#!/usr/bin/env python
"""Peak memory of reading one very large image (figures, not a test).

Writes a synthetic 16-bit grayscale PNG of N x N pixels (default 9400: just under Pillow's pixel limit, a few MB on
disk) and a 16-bit DICOM of the same size into a temporary folder, then measures in separate processes, each with
`/usr/bin/time -v` (maximum resident set size):
  - the baseline: a Python that only imports covidcxr.dicom (torch and fastai come with it);
  - `read_cxr` on each file (the one reading function every covidcxr path uses);
  - with a run folder (`--run RUN`): where the PyTorch engine's floor comes from (`import torch` alone, with and without
    the interpreter's teardown; timm, which brings torchvision; fastai; the engine with its network built), then
    `covidcxr predict --model RUN` on the PNG and on a real shared film (the process's own baseline: torch, timm and the
    model), and the same PNG through the fastai path the PyTorch engine took before (`load_model`, the learner's
    `test_dl`) for comparison.

Usage: .venv/bin/python benchmarks/bench_memory.py [--run RUN [--onnx]] [--size 9400] [--film FILE]
"""
import argparse, os, re, shutil, subprocess, sys, tempfile
from pathlib import Path
import numpy as np
from PIL import Image

def peak(cmd:list)->tuple:
    "(peak RSS in MB, wall seconds, last stderr line) of `cmd` under /usr/bin/time -v."
    r = subprocess.run(['/usr/bin/time', '-v', *cmd], capture_output=True, text=True)
    rss = int(re.search(r'Maximum resident set size \(kbytes\): (\d+)', r.stderr).group(1)) / 1024
    wall = re.search(r'Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)', r.stderr).group(1)
    secs = sum(float(x) * 60**i for i, x in enumerate(reversed(wall.split(':'))))
    lines = [l for l in r.stderr.splitlines() if l.strip() and not l.startswith('\t') and 'Command being timed' not in l]
    return rss, secs, (r.stdout.strip().splitlines() or [''])[-1] + ' | ' + (lines[-1] if lines else '') + f' (exit {r.returncode})'

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--run', help='a run folder (covidcxr train --out) to measure `covidcxr predict` with')
    ap.add_argument('--size', type=int, default=9400, help='side of the synthetic images (default 9400)')
    ap.add_argument('--onnx', action='store_true', help='also export the run to ONNX and measure `predict --engine onnx`')
    ap.add_argument('--film', help='a normal-sized film for the predict baseline (default: the first in $COVIDCXR_DATA)')
    a = ap.parse_args()
    py, cli = sys.executable, str(Path(sys.executable).with_name('covidcxr'))
    tmp = Path(tempfile.mkdtemp(prefix='covidcxr-bench-mem-'))
    try:
        n = a.size
        arr = (np.add.outer(np.arange(n, dtype=np.uint32), np.arange(n, dtype=np.uint32)) * 4095 // (2 * n)).astype(np.uint16) * 16
        Image.fromarray(arr).save(tmp/'big16.png')
        from covidcxr.test_utils import array_to_dicom
        array_to_dicom((arr >> 8).astype(np.uint8), tmp/'big16.dcm', bits=16)
        del arr
        print(f'{n} x {n} = {n*n/1e6:.1f} MP; PNG {os.path.getsize(tmp/"big16.png")/1e6:.1f} MB, DICOM {os.path.getsize(tmp/"big16.dcm")/1e6:.0f} MB on disk')
        rows = [('import covidcxr.dicom only', peak([py, '-c', 'import covidcxr.dicom']))]
        for f in ('big16.png', 'big16.dcm'):
            code = f"from covidcxr.dicom import read_cxr; im = read_cxr({str(tmp/f)!r}); print(im.size, im.info)"
            rows.append((f'read_cxr {f}', peak([py, '-c', code])))
        if a.run:
            film = a.film
            if film is None:
                import pandas as pd
                from covidcxr.core import data_root
                root = data_root(); film = str(root/pd.read_csv(root/'metadata.csv').file.iloc[0])
            floor = [('import torch', 'import torch'),
                     ('import torch, then os._exit (no teardown)', 'import torch, os; os._exit(0)'),
                     ('import timm (torch, torchvision)', 'import timm'),
                     ('import timm, triton kept out (vision_imports)', 'from covidcxr.savedmodel import vision_imports; vision_imports()'),
                     ('import fastai.vision.all', 'import fastai.vision.all'),
                     ('PyTorch engine, network built', f'from covidcxr.predict import load_engine; load_engine({a.run!r}).load()')]
            rows += [(name, peak([py, '-c', code])) for name, code in floor]
            rows.append((f'covidcxr predict {Path(film).name[:30]}', peak([cli, 'predict', '--model', a.run, film])))
            rows.append(('covidcxr predict big16.png', peak([cli, 'predict', '--model', a.run, str(tmp/'big16.png')])))
            before = (f"from covidcxr.predict import TorchEngine, predict_files\nfrom covidcxr.learner import load_model\n"
                      f"from covidcxr.guard import OODGuard\ne = TorchEngine(load_model({a.run!r}), OODGuard.load({a.run!r})); e.pipe = None\n"
                      f"print(predict_files(e, [{str(tmp/'big16.png')!r}]).iloc[0].tolist()[1:])")
            rows.append(('fastai path (before) big16.png', peak([py, '-c', before])))
            if a.onnx:   # the exported model: ONNX Runtime, neither torch nor fastai in the process
                subprocess.run([cli, 'export', '--model', a.run, '--format', 'onnx'], check=True, capture_output=True)
                rows.append((f'predict --engine onnx {Path(film).name[:20]}', peak([cli, 'predict', '--model', a.run, '--engine', 'onnx', film])))
                rows.append(('predict --engine onnx big16.png', peak([cli, 'predict', '--model', a.run, '--engine', 'onnx', str(tmp/'big16.png')])))
        print(f"{'what':45s} {'peak RSS MB':>12s} {'seconds':>8s}  output")
        for name, (rss, secs, out) in rows: print(f'{name:45s} {rss:12.0f} {secs:8.1f}  {out[:100]}')
    finally: shutil.rmtree(tmp, ignore_errors=True)

if __name__ == '__main__': main()
