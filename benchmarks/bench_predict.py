#!/usr/bin/env python
"""Images/s of `covidcxr predict` (PyTorch and ONNX engines) against a plain PyTorch loop, and ONNX Runtime against eager
PyTorch at batch 1 (latency) and batch 32 (throughput), all in one run so the ratios are comparable (prints figures; not a test).

The model: --model RUN (a run or model folder; exported to ONNX first if it has no model.onnx), or by default an
EfficientNet-Lite0 with its offline ImageNet weights and an untrained 2-class head at --size px, with a guard fitted on
12 real films (the compute per film is that of a trained model). The films: the shared dataset's (all 1,285, or the
first --limit of a seeded shuffle).

What is timed, each after a warm-up on the first batch (and every file read once before, so that all are in the page
cache and no engine pays for the disk):
  predict/torch   `predict_files(load_engine(m, 'torch'), files)`: decode (read_cxr), cheap checks, the test-time
                  preprocessing without fastai (film_to_input + film_batch), forward, guard, one CSV row per file (what
                  `covidcxr predict` does, minus writing the CSV)
  predict/fastai  the same through the learner's own fastai `test_dl` (`load_model`; what the PyTorch engine did before
                  it ran without fastai), for comparison
  predict/onnx    the same with the ONNX engine (PIL resize, ONNX Runtime)
  predict/onnx w2 the same, decoding on 2 threads (`workers=2`): does parallel decoding help here?
  plain loop      a for-loop over batches: read_cxr, the model's border crop and histogram equalisation if it has them
                  (PIL), PIL resize to the presize, torch tensor, /255, bilinear resize, normalise, `model(x)`, softmax:
                  no checks, no guard, no rows; the floor `predict` is measured against
  eager b1 / ort b1     one film at a time through the same graph (`onnx_graph`: resize, normalise, network, softmax,
                        guard score): eager PyTorch vs ONNX Runtime, median latency over --reps
  eager b32 / ort b32   batches of 32 preprocessed films: images/s

Usage (from the repository root):
    COVIDCXR_DATA=/path/to/cxr .venv/bin/python benchmarks/bench_predict.py                 # 224 px, all 1,285 films
    COVIDCXR_DATA=/path/to/cxr .venv/bin/python benchmarks/bench_predict.py --limit 40 --size 224
    COVIDCXR_DATA=/path/to/cxr .venv/bin/python benchmarks/bench_predict.py --model runs/146 --json figures.json
"""
import argparse, json, os, shutil, statistics, sys, tempfile, time
from pathlib import Path
import numpy as np

def build_model(out:Path, size:int, shared, intensity=None)->Path:
    "An EfficientNet-Lite0 model folder (offline ImageNet weights, untrained head; `intensity` normalisation) with a guard fitted on 12 real films."
    import pandas as pd
    from covidcxr.data import patient_split, cxr_dls
    from covidcxr.learner import build_learner, save_model
    from covidcxr.guard import OODGuard
    small = pd.concat([shared[shared.label == l].drop_duplicates('patient_id').head(6) for l in ('covid', 'pneumonia')])
    learn = build_learner(cxr_dls(patient_split(small, pcts=(0.67, 0.33, 0.), seed=0), size=size, bs=4, intensity=intensity), 'efficientnet_lite0')
    OODGuard.fit(learn).save(save_model(learn, out/'model'))
    return out/'model'

def rate(fn, n:int)->float:
    "Images/s of `fn()` processing `n` images."
    t0 = time.perf_counter(); fn(); return n / (time.perf_counter() - t0)

def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--model', help='run or model folder (default: build an EfficientNet-Lite0 one)')
    ap.add_argument('--size', type=int, default=224, help='image size of the built model (default: 224)')
    ap.add_argument('--histeq', action='store_true', help="build the model with histogram equalisation (as the 146 preset's)")
    ap.add_argument('--limit', type=int, help='only this many films (default: all)')
    ap.add_argument('--bs', type=int, default=16, help="predict's batch size (default: 16, as `covidcxr predict`)")
    ap.add_argument('--reps', type=int, default=20, help='batch-1 latency repetitions (default: 20)')
    ap.add_argument('--json', help='also write the figures here')
    a = ap.parse_args()
    import torch, torch.nn.functional as F
    from PIL import Image
    from covidcxr.data import load_dataset
    from covidcxr.dicom import read_cxr, crop_border, equalize_film
    from covidcxr.predict import load_engine, predict_files, export_onnx, onnx_graph, inference_pipeline, model_folder, TorchEngine
    from covidcxr.learner import load_model
    threads = torch.get_num_threads()
    shared = load_dataset()
    files = list(shared.sample(frac=1, random_state=0).path)[:a.limit]
    tmp = Path(tempfile.mkdtemp(prefix='covidcxr-bench-predict-'))
    try:
        mdir = model_folder(a.model) if a.model else build_model(tmp, a.size, shared, 'histeq' if a.histeq else None)
        if not (mdir/'model.onnx').is_file(): export_onnx(mdir)
        te, oe = load_engine(mdir, 'torch'), load_engine(mdir, 'onnx', threads=threads)
        learn, guard = load_model(mdir), te.guard
        fe = TorchEngine(learn, guard); fe.pipe = None   # the fastai path: the learner's test_dl makes each batch
        pipe = inference_pipeline(learn)
        n, P = len(files), pipe['presize']
        print(f'{n} films, model {learn.config["arch"]} at {pipe["size"][0]} px (presize {P}, intensity {pipe["intensity"]}, border {pipe["border"]}), '
              f'guard {"yes" if guard else "no"}, torch threads {threads}, ONNX Runtime threads {threads}, '
              f'load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores')
        fig = dict(n=n, size=pipe['size'][0], threads=threads, loadavg_before=os.getloadavg()[0])
        for f in files: Path(f).read_bytes()   # every file in the page cache first: no engine pays for the disk
        warm = files[:a.bs]
        predict_files(te, warm, bs=a.bs); predict_files(oe, warm, bs=a.bs); predict_files(fe, warm, bs=a.bs)
        fig['predict_torch'] = rate(lambda: predict_files(te, files, bs=a.bs), n)
        fig['predict_fastai'] = rate(lambda: predict_files(fe, files, bs=a.bs), n)
        fig['predict_onnx'] = rate(lambda: predict_files(oe, files, bs=a.bs), n)
        fig['predict_onnx_w2'] = rate(lambda: predict_files(oe, files, bs=a.bs, workers=2), n)
        model, mean, std = learn.model.eval(), torch.tensor(pipe['mean']).view(1, -1, 1, 1), torch.tensor(pipe['std']).view(1, -1, 1, 1)
        t = float(getattr(learn, 'temperature', None) or 1.)
        def plain(fs):
            for i in range(0, len(fs), a.bs):
                ims = [crop_border(read_cxr(f), pipe['border']) for f in fs[i:i + a.bs]]
                if pipe['intensity'] == 'histeq': ims = [equalize_film(im) for im in ims]
                x = torch.from_numpy(np.stack([np.asarray(im.resize((P, P), Image.BILINEAR))[None] for im in ims]))
                x = F.interpolate(x.float() / 255., size=pipe['size'], mode='bilinear', align_corners=True)
                with torch.no_grad(): torch.softmax(model((x - mean) / std) / t, 1)
        plain(warm)
        fig['plain_loop'] = rate(lambda: plain(files), n)
        # the graph alone: eager PyTorch vs ONNX Runtime on preprocessed films
        net = onnx_graph(learn, guard)
        xs = oe.inputs([read_cxr(f) for f in files[:32]])
        if len(xs) < 32: xs = np.concatenate([xs] * (32 // len(xs) + 1))[:32]
        xt = torch.from_numpy(xs)
        def eager(x):
            with torch.no_grad(): net(x)
        ort = lambda x: oe.session.run(None, {'image': x})
        lat = {}
        for name, fn, x in (('eager_b1', eager, xt[:1]), ('ort_b1', ort, xs[:1])):
            fn(x); ts = []
            for _ in range(a.reps):
                t0 = time.perf_counter(); fn(x); ts.append(time.perf_counter() - t0)
            lat[name] = statistics.median(ts)
        for name, fn, x in (('eager_b32', eager, xt), ('ort_b32', ort, xs)):
            fn(x); fig[name] = rate(lambda: [fn(x) for _ in range(3)], 96)
        fig.update({f'{k}_ms': v * 1000 for k, v in lat.items()}, loadavg_after=os.getloadavg()[0])
        print(f"\n{'what':<34}{'figure':>12}{'ratio':>28}")
        rows = [('predict, PyTorch engine (img/s)', fig['predict_torch'], f"{fig['predict_torch'] / fig['plain_loop']:.2f}x the plain loop"),
                ('predict, fastai path (img/s)', fig['predict_fastai'], f"{fig['predict_fastai'] / fig['plain_loop']:.2f}x the plain loop"),
                ('predict, ONNX engine (img/s)', fig['predict_onnx'], f"{fig['predict_onnx'] / fig['plain_loop']:.2f}x the plain loop"),
                ('predict, ONNX, 2 decode threads', fig['predict_onnx_w2'], f"{fig['predict_onnx_w2'] / fig['predict_onnx']:.2f}x 1 thread"),
                ('plain PyTorch loop (img/s)', fig['plain_loop'], ''),
                ('batch-1 latency, eager (ms)', fig['eager_b1_ms'], ''),
                ('batch-1 latency, ONNX RT (ms)', fig['ort_b1_ms'], f"{fig['eager_b1_ms'] / fig['ort_b1_ms']:.2f}x faster than eager"),
                ('batch-32 throughput, eager (img/s)', fig['eager_b32'], ''),
                ('batch-32 throughput, ONNX RT (img/s)', fig['ort_b32'], f"{fig['ort_b32'] / fig['eager_b32']:.2f}x eager")]
        for what, v, r in rows: print(f'{what:<34}{v:>12.1f}{r:>28}')
        print(f"load average {fig['loadavg_before']:.1f} before, {fig['loadavg_after']:.1f} after")
        if a.json: Path(a.json).write_text(json.dumps(fig, indent=1))
    finally: shutil.rmtree(tmp, ignore_errors=True)

if __name__ == '__main__': main()
